//! A member of a consumer group: partition leases, recovery, reads, acks and redelivery.
//!
//! A background task heartbeats the member — core's ownership engine
//! (`busbar_core::raw::ownership`) over the lease store of [`membership`] takes and hands over
//! partitions — recovers the pending entries of a newly owned partition
//! (XPENDING + XCLAIM, in ID order, before any new entry), redelivers deliveries whose ack
//! timeout expired (XPENDING IDLE + XCLAIM) and moves due delayed messages. `next()` hands
//! out redeliveries first, then buffered entries of owned partitions, and reads new entries
//! (XREADGROUP `>`) on a connection of its own.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::raw::ownership::{HandOver, Ownership};
use busbar_core::raw::{self, coalesce::Coalescer, Ack};
use busbar_core::{
    Delivery, Error, ErrorKind, Event, Message, Result, SubscribeOptions, Subscriber,
};
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod membership;
mod pending;

use crate::codec::{array_of, entries_of, int_of, string_of, RawEntry};
use crate::error::{decode, map};
use crate::scripts::MOVE_DUE;
use crate::{Inner, BACKEND};

#[derive(Clone)]
pub(crate) struct Entry {
    partition: u32,
    stream_id: String,
    pub(crate) message: Arc<Message>,
    attempt: u32,
    /// Why busbar could not decode it (then `message` holds what could be read, and the
    /// bus in front dead-letters it).
    undecodable: Option<Arc<str>>,
}

struct Part {
    buffer: VecDeque<Entry>,
    /// Being handed over: nothing more is read or handed out from it.
    draining: bool,
}

#[derive(Default)]
struct State {
    parts: BTreeMap<u32, Part>,
    /// Redeliveries, by due time and sequence.
    retry: BTreeMap<(Instant, u64), Entry>,
    /// Handed-out deliveries and their ack deadlines.
    inflight: HashMap<(u32, String), Instant>,
    /// Partitions an XREADGROUP of `next()` is reading right now. Such a partition is not
    /// released until the read returned: an entry it brings would otherwise become pending on
    /// this member after the next owner recovered the partition, and that owner would read
    /// newer entries of the key first.
    reading: Vec<u32>,
    /// Entries read ahead of partitions being handed over, never handed out: their delivery
    /// counts are put back when the partition is given up.
    unseen: Vec<Entry>,
    seq: u64,
    cursor: usize,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Removes and returns the redeliveries queued for partition `p`.
    fn take_retries(&mut self, p: u32) -> Vec<Entry> {
        let keys: Vec<(Instant, u64)> = self
            .retry
            .iter()
            .filter(|(_, e)| e.partition == p)
            .map(|(k, _)| *k)
            .collect();
        keys.iter().filter_map(|k| self.retry.remove(k)).collect()
    }

    /// Entries of the given partitions waiting to be handed out (buffered or queued for
    /// redelivery): no handler holds them.
    fn waiting_in(&self, parts: &[u32]) -> Vec<Entry> {
        let buffered = self
            .parts
            .iter()
            .filter(|(p, _)| parts.contains(p))
            .flat_map(|(_, part)| part.buffer.iter().cloned());
        let retrying = self
            .retry
            .values()
            .filter(|e| parts.contains(&e.partition))
            .cloned();
        buffered.chain(retrying).collect()
    }

    fn drop_partition(&mut self, p: u32) {
        self.parts.remove(&p);
        self.retry.retain(|_, e| e.partition != p);
        self.unseen.retain(|e| e.partition != p);
    }

    fn inflight_in(&self, p: u32) -> usize {
        self.inflight.keys().filter(|(q, _)| *q == p).count()
    }

    fn buffered(&self) -> usize {
        self.parts.values().map(|p| p.buffer.len()).sum::<usize>() + self.retry.len()
    }

    /// Up to `max` deliveries to hand out, in order: due redeliveries first, then the first
    /// buffered entries of `serving` partitions (taken in turn) whose key is not held back by
    /// a pending redelivery.
    fn pick(&mut self, now: Instant, serving: &HashSet<u32>, max: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        if max == 0 {
            return out;
        }
        let due: Vec<(Instant, u64)> = self
            .retry
            .iter()
            .filter(|((due, _), e)| *due <= now && serving.contains(&e.partition))
            .map(|(k, _)| *k)
            .take(max)
            .collect();
        out.extend(due.iter().filter_map(|k| self.retry.remove(k)));
        let held: HashSet<&str> = self
            .retry
            .values()
            .filter_map(|e| e.message.key.as_deref())
            .collect();
        let owned: Vec<u32> = self
            .parts
            .iter()
            .filter(|(n, p)| serving.contains(n) && !p.buffer.is_empty())
            .map(|(n, _)| *n)
            .collect();
        let mut i = 0;
        let mut idle = 0;
        while out.len() < max && !owned.is_empty() && idle < owned.len() {
            let p = owned[(self.cursor + i) % owned.len()];
            i += 1;
            let Some(part) = self.parts.get_mut(&p) else {
                idle += 1;
                continue;
            };
            let pos = part
                .buffer
                .iter()
                .position(|e| e.message.key.as_deref().is_none_or(|k| !held.contains(k)));
            match pos.and_then(|pos| part.buffer.remove(pos)) {
                Some(e) => {
                    idle = 0;
                    out.push(e);
                }
                None => idle += 1,
            }
        }
        self.cursor = self.cursor.wrapping_add(i);
        out
    }
}

pub(crate) struct SubShared {
    inner: Arc<Inner>,
    topic: Arc<str>,
    options: SubscribeOptions,
    member: String,
    state: Mutex<State>,
    closed: AtomicBool,
    wake: Notify,
    wake_bg: Notify,
    /// Acks of concurrently finishing handlers, sent as one XACK per partition.
    acks: Coalescer<u32, String>,
    /// Which partitions this member owns: core's engine over [`membership`]'s lease store.
    ownership: Ownership<i64>,
}

impl SubShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stream(&self, p: u32) -> String {
        self.inner.config.stream_key(&self.topic, p)
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_open()?;
        if self.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::closed("redis subscriber").with_backend(BACKEND));
        }
        Ok(())
    }

    fn sweep_interval(&self) -> Duration {
        (self.options.ack_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// The partitions deliveries may be handed out from now (owned, not being handed over,
    /// lease trusted).
    fn serving(&self, now: Instant) -> HashSet<u32> {
        self.ownership
            .owned()
            .into_iter()
            .filter(|p| self.ownership.serving(*p, now))
            .collect()
    }

    /// `next()`'s read returned: a partition it held back from a hand-over may go now.
    fn read_done(&self) {
        let mut st = self.lock();
        let draining = st
            .reading
            .iter()
            .any(|p| st.parts.get(p).is_some_and(|part| part.draining));
        st.reading.clear();
        drop(st);
        if draining {
            self.wake_bg.notify_one();
        }
    }

    /// A delivery was settled: forget it, and let a draining partition go when it is empty.
    fn settled(&self, entry: &Entry) {
        let mut st = self.lock();
        st.inflight
            .remove(&(entry.partition, entry.stream_id.clone()));
        let draining = st.parts.get(&entry.partition).is_some_and(|p| p.draining);
        if draining && st.inflight_in(entry.partition) == 0 {
            self.wake_bg.notify_one();
        }
        drop(st);
        self.wake.notify_waiters();
    }
}

async fn background(shared: Arc<SubShared>) {
    let hb = shared.lease_ttl() / 3;
    let sweep_every = shared.sweep_interval();
    let move_every = Duration::from_millis(250);
    let mut next_hb = Instant::now() + hb;
    let mut next_sweep = Instant::now() + sweep_every;
    let mut next_move = Instant::now();
    let mut generation = shared.generation().await.unwrap_or_default();
    loop {
        let wake_at = next_hb.min(next_sweep).min(next_move);
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(wake_at) => false,
            _ = shared.wake_bg.notified() => true,
        };
        if shared.closed.load(AtomicOrdering::Acquire) || shared.inner.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut membership_changed = false;
        if now >= next_move {
            // Cheap poll: rebalance as soon as a member joins or leaves.
            if let Ok(g) = shared.generation().await {
                membership_changed = g != generation;
                generation = g;
            }
        }
        if woken || membership_changed || now >= next_hb {
            next_hb = match shared.heartbeat().await {
                Ok(true) => Instant::now() + Duration::from_millis(250),
                Ok(false) => Instant::now() + hb,
                Err(e) => {
                    tracing::warn!(topic = %shared.topic, error = %e, "redis: heartbeat failed; retrying");
                    Instant::now() + Duration::from_millis(500)
                }
            };
        }
        if now >= next_sweep {
            if let Err(e) = shared.sweep().await {
                tracing::warn!(topic = %shared.topic, error = %e, "redis: redelivery sweep failed");
            }
            next_sweep = Instant::now() + sweep_every;
        }
        if now >= next_move {
            if let Err(e) = shared.move_due().await {
                tracing::warn!(topic = %shared.topic, error = %e, "redis: moving delayed messages failed");
            }
            next_move = Instant::now() + move_every;
        }
    }
}

/// Most ids one XACK carries.
const XACK_BATCH: usize = 256;

/// One XACK per partition for the acks waiting together (see [`Coalescer`]).
fn xack_coalescer(inner: Arc<Inner>, topic: String, group: String) -> Coalescer<u32, String> {
    Coalescer::spawn(XACK_BATCH, move |p: u32, ids: Vec<String>| {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(inner.config.stream_key(&topic, p))
            .arg(&group)
            .arg(ids);
        let mut conn = inner.conn.clone();
        async move {
            cmd.query_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| map(e, "acking"))
        }
    })
}

pub(crate) struct RedisSubscriber {
    shared: Arc<SubShared>,
    read_conn: ConnectionManager,
    task: JoinHandle<()>,
}

impl RedisSubscriber {
    pub(crate) async fn start(
        inner: Arc<Inner>,
        topic: String,
        options: SubscribeOptions,
        partitions: u32,
    ) -> Result<Self> {
        let read_conn = inner.dedicated_connection().await?;
        let acks = xack_coalescer(inner.clone(), topic.clone(), options.group.clone());
        let member = uuid::Uuid::new_v4().simple().to_string();
        // A drain that outlasts the ack timeout is handed over anyway (the next owner claims
        // what is still pending).
        let ownership = Ownership::new(
            member.clone(),
            partitions,
            inner.config.lease_ttl,
            options.ack_timeout,
        );
        let shared = Arc::new(SubShared {
            acks,
            ownership,
            inner,
            topic: topic.into(),
            options,
            member,
            state: Mutex::new(State::default()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
            wake_bg: Notify::new(),
        });
        shared.heartbeat().await?;
        let task = tokio::spawn(background(shared.clone()));
        Ok(Self {
            shared,
            read_conn,
            task,
        })
    }

    fn deliver(&self, entry: Entry) -> Delivery {
        let event = Event::from_shared(
            self.shared.topic.clone(),
            entry.message.clone(),
            entry.attempt,
        );
        let undecodable = entry.undecodable.clone();
        let acker = Box::new(RedisAck {
            shared: self.shared.clone(),
            entry,
        });
        match undecodable {
            None => raw::delivery(event, acker),
            Some(error) => raw::undecodable(event, acker, &*error),
        }
    }

    /// New entries of the given partitions (XREADGROUP `>`), blocking up to `block`.
    async fn read(
        &mut self,
        parts: &[u32],
        count: usize,
        block: Duration,
    ) -> Result<Vec<(u32, RawEntry)>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.shared.options.group)
            .arg(&self.shared.member)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS");
        for p in parts {
            cmd.arg(self.shared.stream(*p));
        }
        for _ in parts {
            cmd.arg(">");
        }
        let reply: Value = cmd
            .query_async(&mut self.read_conn)
            .await
            .map_err(|e| map(e, "reading new entries"))?;
        let by_stream: HashMap<String, u32> =
            parts.iter().map(|p| (self.shared.stream(*p), *p)).collect();
        let mut out = Vec::new();
        for stream in array_of(reply)? {
            let mut it = array_of(stream)?.into_iter();
            let name = string_of(it.next().ok_or_else(|| decode("short XREADGROUP reply"))?)?;
            let p = *by_stream
                .get(&name)
                .ok_or_else(|| decode(format!("XREADGROUP answered for unknown stream {name}")))?;
            let entries = entries_of(it.next().unwrap_or(Value::Nil))?;
            out.extend(entries.into_iter().map(|e| (p, e)));
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1).await?.pop())
    }

    async fn next_batch(&mut self, want: usize) -> Result<Vec<Delivery>> {
        let want = want.max(1);
        loop {
            if self.shared.closed.load(AtomicOrdering::Acquire) || self.shared.inner.is_closed() {
                return Ok(Vec::new());
            }
            let shared = self.shared.clone();
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let max = self.shared.options.max_in_flight;
            let now = Instant::now();
            let serving = self.shared.serving(now);
            let (picked, plan, next_due) = {
                let mut st = self.shared.lock();
                let room = want.min(max.saturating_sub(st.inflight.len()));
                let picked = st.pick(now, &serving, room);
                let deadline = now + self.shared.options.ack_timeout;
                for e in &picked {
                    st.inflight
                        .insert((e.partition, e.stream_id.clone()), deadline);
                }
                let room = max.saturating_sub(st.inflight.len() + st.buffered());
                let plan: Vec<u32> = if picked.is_empty() && room > 0 {
                    st.parts
                        .iter()
                        .filter(|(p, part)| {
                            !part.draining && serving.contains(p) && part.buffer.is_empty()
                        })
                        .map(|(p, _)| *p)
                        .collect()
                } else {
                    Vec::new()
                };
                let next_due = st.retry.keys().next().map(|k| k.0);
                st.reading.clone_from(&plan);
                (picked, (plan, room), next_due)
            };
            if !picked.is_empty() {
                return Ok(picked.into_iter().map(|e| self.deliver(e)).collect());
            }
            let (parts, room) = plan;
            if !parts.is_empty() {
                let mut block = self.shared.inner.config.block;
                if let Some(due) = next_due {
                    block = block.min(due.saturating_duration_since(Instant::now()));
                }
                let count = room.min(self.shared.inner.config.fetch_count);
                let fetched = self
                    .read(&parts, count, block)
                    .await
                    .inspect_err(|_| self.shared.read_done())?;
                let decoded: Vec<Entry> = fetched
                    .into_iter()
                    .map(|(p, raw)| to_entry(p, raw, 1))
                    .collect();
                {
                    let serving = self.shared.serving(Instant::now());
                    let mut st = self.shared.lock();
                    for e in decoded {
                        // Entries of a partition being handed over stay pending for its next
                        // owner, which recovers them (the partition is released only now).
                        if let Some(part) = st
                            .parts
                            .get_mut(&e.partition)
                            .filter(|p| !p.draining && serving.contains(&e.partition))
                        {
                            part.buffer.push_back(e);
                        }
                    }
                }
                self.shared.read_done();
                continue;
            }
            let wait = next_due
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        if self.shared.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        self.task.abort();
        let interrupted_read = !self.shared.lock().reading.is_empty();
        if interrupted_read {
            // A `next()` was dropped during its blocking read: Redis may still hand that read
            // entries (pending on this member) until its block time is over. Let it end before
            // the next owners recover the partitions.
            tokio::time::sleep(self.shared.inner.config.block + Duration::from_millis(50)).await;
        }
        let (owned, unseen) = {
            let st = self.shared.lock();
            let owned: Vec<u32> = st.parts.keys().copied().collect();
            let mut unseen = st.waiting_in(&owned);
            unseen.extend(st.unseen.iter().cloned());
            (owned, unseen)
        };
        // Unacked deliveries stay pending in Redis; the next owner of each partition claims
        // them at once. Those no handler received are not counted as delivered.
        self.shared.recount(unseen).await;
        if interrupted_read {
            let lost = self.shared.lost_reads(&owned).await;
            self.shared.set_counts(lost).await;
        }
        // The next owners claim whatever is still pending at once (Redis has no hold to
        // pass on), so every lease goes as a hold.
        let result = self
            .shared
            .ownership
            .leave(self.shared.as_ref(), |_| HandOver::Hold)
            .await;
        self.shared.lock().parts.clear();
        self.shared.wake.notify_waiters();
        result
    }
}

impl Drop for RedisSubscriber {
    fn drop(&mut self) {
        // Without close, this behaves like a crash: the leases expire after their TTL and
        // the next owners claim what was pending.
        self.task.abort();
    }
}

struct RedisAck {
    shared: Arc<SubShared>,
    entry: Entry,
}

impl RedisAck {
    /// Takes the delivery back from the in-flight set and, while its partition is still owned
    /// (and `queue` holds), queues `entry` to be handed out again at `at`.
    fn hand_back(&self, at: Instant, entry: Entry, queue: bool) {
        let p = self.entry.partition;
        let mut st = self.shared.lock();
        st.inflight.remove(&(p, self.entry.stream_id.clone()));
        let owned = st.parts.get(&p).is_some_and(|part| !part.draining);
        if owned && queue {
            let seq = st.next_seq();
            st.retry.insert((at, seq), entry);
        }
        drop(st);
        self.shared.wake.notify_waiters();
    }
}

#[async_trait]
impl Ack for RedisAck {
    async fn ack(&self) -> Result<()> {
        self.shared.check_open()?;
        self.shared
            .acks
            .submit(self.entry.partition, self.entry.stream_id.clone())
            .await?;
        self.shared.settled(&self.entry);
        Ok(())
    }

    async fn redeliver(&self, delay: Duration) -> Result<()> {
        self.shared.check_open()?;
        let p = self.entry.partition;
        // XCLAIM counts the redelivery in Redis (the delivery counter other members see).
        let claimed = self
            .shared
            .claim(p, &[&self.entry.stream_id], 0, false)
            .await?;
        // The same entry: the message as decoded (and named) when it was first read.
        let again = Entry {
            attempt: self.entry.attempt + 1,
            ..self.entry.clone()
        };
        self.hand_back(Instant::now() + delay, again, !claimed.is_empty());
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        self.shared.check_open()?;
        // Not delivered after all: the counter goes back to what handlers received.
        self.shared.recount(vec![self.entry.clone()]).await;
        self.hand_back(Instant::now(), self.entry.clone(), true);
        Ok(())
    }

    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.shared.check_open()?;
        let key = (self.entry.partition, self.entry.stream_id.clone());
        {
            let mut st = self.shared.lock();
            match st.inflight.get_mut(&key) {
                Some(deadline) => *deadline = Instant::now() + by,
                None => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        "the delivery is no longer held: its ack timeout expired or its partition moved",
                    )
                    .with_backend(BACKEND))
                }
            }
        }
        self.shared
            .claim(self.entry.partition, &[&self.entry.stream_id], 0, true)
            .await
            .map(|_| ())
    }
}

/// The entry as a delivery-to-be. An entry another program wrote is delivered with what
/// can be read, under the id `redis-<partition>-<entry id>`; a busbar entry with a broken
/// field is marked undecodable, with its payload (`d`) and every field as a
/// `busbar-redis-field-<name>` header (the bus in front dead-letters it).
pub(crate) fn to_entry(p: u32, raw: RawEntry, attempt: u32) -> Entry {
    let (error, fields) = match raw.decoded {
        Ok(d) => match d.message {
            Ok(mut m) => {
                if d.foreign {
                    m.id = format!("redis-{p}-{}", raw.stream_id);
                }
                return Entry {
                    partition: p,
                    stream_id: raw.stream_id,
                    message: Arc::new(m),
                    attempt,
                    undecodable: None,
                };
            }
            Err(e) => (e, d.fields),
        },
        Err(e) => (e, Vec::new()),
    };
    let mut m = Message::new(Vec::new()).with_id(format!("redis-{p}-{}", raw.stream_id));
    for (name, value) in fields {
        if name == "d" || name == "data" {
            m.payload = value.into();
        } else {
            m.headers.insert(
                format!("busbar-redis-field-{name}"),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    m.headers
        .insert("busbar-redis-stream-id", raw.stream_id.clone());
    Entry {
        partition: p,
        stream_id: raw.stream_id,
        message: Arc::new(m),
        attempt,
        undecodable: Some(error.to_string().into()),
    }
}
