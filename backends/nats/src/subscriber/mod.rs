//! A member of a consumer group: one puller per owned partition, acks and redelivery by
//! JetStream. Which partitions it owns is core's ownership engine
//! (`busbar_core::raw::ownership`) over the leases of [`membership`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull, Consumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{stream, Message as JsMessage};
use async_trait::async_trait;
use busbar_core::raw::{self, Ack};
use busbar_core::{
    Delivery, Error, ErrorKind, Event, Message, Result, SubscribeOptions, Subscriber,
};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod membership;

use busbar_core::raw::ownership::{HandOver, Ownership};
use membership::Member;

use crate::config::{consumer_name, encode_topic};
use crate::error::{map, request_kind};
use crate::{codec, Inner, BACKEND};

/// Messages a puller fetches per pull request.
const PULL_BATCH: usize = 64;

struct Part {
    /// Set when the partition is being handed over (or its lease lapsed): its puller stops,
    /// messages still arriving from it are kept for the hand-over, and the engine releases
    /// the lease once the puller finished and its handed-out deliveries are settled.
    draining: bool,
    stop: Arc<AtomicBool>,
    puller_done: Arc<AtomicBool>,
    /// Set while the partition waits for (or fetches) what the previous owner left unacked:
    /// until it is cleared, handing the partition over must make the next owner wait too.
    recovering: Arc<AtomicBool>,
    /// Messages forwarded by the puller and not yet taken from the channel.
    queued: Arc<AtomicUsize>,
    puller: JoinHandle<()>,
    /// Messages that arrived while draining, in arrival order: nacked together once the
    /// puller finished (nacking earlier would let JetStream redeliver them into the pull
    /// still open, out of order).
    returned: Vec<JsMessage>,
    /// Deliveries of this partition no handler saw (see [`Unseen`]).
    unseen: Unseen,
}

/// JetStream counts every delivery to a member, also those no handler received: messages a
/// member had pulled but not handed out when it left or handed its partition over, and
/// deliveries the consumer runner released unhandled at shutdown. busbar counts them per
/// stream sequence and takes them off `attempt` (JetStream's `num_delivered`), so `attempt`
/// says how many times a handler received the message. The counts of a partition travel
/// with it: loaded from the `BUSBAR_UNSEEN` store when a member takes the partition, written
/// back when it gives it up (a crashed member writes nothing: what it had pulled unseen then
/// counts, once). Entries below the consumer's ack floor are dropped.
#[derive(Debug, Default)]
struct Unseen {
    counts: BTreeMap<u64, u32>,
    /// The store's sequence of the entry this was read from (0: none).
    store_seq: u64,
    dirty: bool,
}

impl Unseen {
    fn add(&mut self, seq: u64) {
        *self.counts.entry(seq).or_default() += 1;
        self.dirty = true;
    }

    fn done(&mut self, seq: u64) {
        if self.counts.remove(&seq).is_some() {
            self.dirty = true;
        }
    }

    /// `delivered` (JetStream's count) less the deliveries no handler saw.
    fn attempt(&self, seq: u64, delivered: u64) -> u32 {
        let unseen = u64::from(self.counts.get(&seq).copied().unwrap_or(0));
        u32::try_from(delivered.saturating_sub(unseen).max(1)).unwrap_or(u32::MAX)
    }
}

/// A delivery handed out and not settled.
#[derive(Debug)]
struct Held {
    partition: u32,
    /// The message's reply subject (acks and nacks go there).
    reply: String,
    /// Its stream sequence.
    seq: u64,
    /// Released unhandled ([`Delivery::release`]): counted as unseen at once, left to
    /// JetStream (its ack wait redelivers it) while this member keeps pulling — a nack now
    /// would bring it back behind messages of its key this member already pulled — and nacked
    /// in hand-out order when the member hands its partition over or leaves.
    released: bool,
}

impl Drop for Part {
    fn drop(&mut self) {
        self.puller.abort();
    }
}

#[derive(Default)]
struct State {
    parts: BTreeMap<u32, Part>,
    /// Handed-out deliveries by tag; tags grow in hand-out order.
    inflight: BTreeMap<u64, Held>,
}

impl State {
    /// Deliveries of partition `p` a handler still holds (released ones excepted).
    fn inflight_in(&self, p: u32) -> usize {
        self.inflight
            .values()
            .filter(|h| h.partition == p && !h.released)
            .count()
    }

    /// Deliveries a handler still holds (released ones excepted).
    fn holding(&self) -> usize {
        self.inflight.values().filter(|h| !h.released).count()
    }

    /// Removes and returns the released deliveries of partition `p`, in hand-out order.
    fn take_released(&mut self, p: u32) -> Vec<Held> {
        let tags: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, h)| h.partition == p && h.released)
            .map(|(t, _)| *t)
            .collect();
        tags.into_iter()
            .filter_map(|t| self.inflight.remove(&t))
            .collect()
    }

    fn unseen(&mut self, p: u32) -> Option<&mut Unseen> {
        self.parts.get_mut(&p).map(|part| &mut part.unseen)
    }

    /// Starts handing partition `p` over: its puller stops after its current pull.
    fn drain(&mut self, p: u32) {
        if let Some(part) = self.parts.get_mut(&p) {
            part.draining = true;
            part.stop.store(true, AtomicOrdering::Release);
        }
    }
}

/// A message on its way from a puller to `next()`, with its partition's queue counter.
type Forwarded = (u32, Arc<AtomicUsize>, JsMessage);

pub(crate) struct SubShared {
    inner: Arc<Inner>,
    stream: stream::Stream,
    topic: Arc<str>,
    options: SubscribeOptions,
    member: String,
    state: Mutex<State>,
    /// Which partitions this member owns (leases in [`membership`]).
    ownership: Ownership<u64>,
    closed: AtomicBool,
    tags: AtomicU64,
    wake: Notify,
    wake_bg: Notify,
    tx: mpsc::Sender<Forwarded>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl SubShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key_prefix(&self) -> String {
        format!(
            "{}.{}",
            encode_topic(&self.topic),
            encode_topic(&self.options.group)
        )
    }

    fn lease_key(&self, p: u32) -> String {
        format!("{}.p{p}", self.key_prefix())
    }

    fn members_key(&self) -> String {
        format!("{}.members", self.key_prefix())
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_open()?;
        if self.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::closed("nats subscriber").with_backend(BACKEND));
        }
        Ok(())
    }

    /// Heartbeat and rebalance (core's ownership engine); returns whether the next one
    /// should come soon.
    async fn heartbeat(self: &Arc<Self>) -> Result<bool> {
        self.ownership
            .round(self.as_ref(), &Member(self.clone()))
            .await
    }

    /// Gives partition `p` up (its puller finished, or the drain is stuck): what arrived while
    /// draining and what handlers released is nacked in order on a clean hand-over (no older
    /// delivery is still out), or left to JetStream's ack wait on a hold — nacking newer
    /// messages then would queue them before the unsettled ones. Either way JetStream counted
    /// a delivery nobody saw: the unseen counts go to the store before the lease is released.
    async fn give_up(&self, p: u32, how: HandOver) {
        let (mut part, released) = {
            let mut st = self.lock();
            let released = st.take_released(p);
            let Some(part) = st.parts.remove(&p) else {
                return;
            };
            (part, released)
        };
        let returned = std::mem::take(&mut part.returned);
        for m in &returned {
            part.unseen.add(stream_seq(m));
        }
        if how == HandOver::Clean {
            // In hand-out order: released deliveries came before what arrived while draining.
            let client = self.inner.js.client();
            for h in released.iter().filter(|h| !h.reply.is_empty()) {
                let _ = client
                    .request(h.reply.clone(), Bytes::from_static(b"-NAK"))
                    .await;
            }
            nack_in_order(returned).await;
        }
        self.save_unseen(p, &part.unseen).await;
    }

    /// Starts delivering from partition `p`. Unless the previous owner handed it over
    /// cleanly, unacked deliveries it may have left make the new owner wait one ack wait
    /// first, so that JetStream redelivers them before anything newer.
    async fn acquire(self: &Arc<Self>, p: u32, may_hold: bool) -> Result<()> {
        let name = consumer_name(&self.options.group, p);
        let mut consumer: Consumer<pull::Config> =
            self.stream.get_consumer(&name).await.map_err(|e| {
                let k = request_kind(&e);
                map(k, e, "opening the partition's consumer")
            })?;
        let info = consumer.info().await.map_err(|e| {
            let k = request_kind(&e);
            map(k, e, "reading the partition's consumer")
        })?;
        let hold = if may_hold && info.num_ack_pending > 0 {
            info.config.ack_wait
        } else {
            Duration::ZERO
        };
        // Deliveries handed back by earlier owners wait in JetStream's redelivery queue in
        // the order they were nacked, not in stream order: a member that left after taking
        // back only some of them nacked those behind the others. So whenever something is
        // pending, the new owner fetches all of it first and hands it out in stream order.
        let recover_first = info.num_ack_pending > 0;
        let unseen = self.load_unseen(p, info.ack_floor.stream_sequence).await;
        let shared = self.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        let recovering = Arc::new(AtomicBool::new(recover_first));
        let (st, dn, q, rc) = (
            stop.clone(),
            done.clone(),
            queued.clone(),
            recovering.clone(),
        );
        let puller = tokio::spawn(async move {
            shared.pull(p, consumer, hold, &st, &q, &rc).await;
            dn.store(true, AtomicOrdering::Release);
            shared.wake_bg.notify_one();
        });
        self.lock().parts.insert(
            p,
            Part {
                draining: false,
                stop,
                puller_done: done,
                recovering,
                queued,
                puller,
                returned: Vec::new(),
                unseen,
            },
        );
        tracing::debug!(topic = %self.topic, partition = p, ?hold, "nats: partition acquired");
        self.wake.notify_waiters();
        Ok(())
    }

    /// Pulls partition `p` into the subscriber's channel until `stop` is set; the pull in
    /// progress is finished (its messages forwarded), so none is stranded in a dead inbox.
    async fn pull(
        &self,
        p: u32,
        mut consumer: Consumer<pull::Config>,
        hold: Duration,
        stop: &AtomicBool,
        queued: &Arc<AtomicUsize>,
        recovering: &AtomicBool,
    ) {
        let until = Instant::now() + hold;
        while Instant::now() < until {
            if stop.load(AtomicOrdering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        }
        // `recovering` starts set when earlier owners left deliveries pending.
        if recovering.load(AtomicOrdering::Acquire) {
            if !self.recover(p, &mut consumer, queued).await {
                return;
            }
            recovering.store(false, AtomicOrdering::Release);
        }
        while !stop.load(AtomicOrdering::Acquire) {
            let batch = consumer
                .batch()
                .max_messages(PULL_BATCH)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, partition = p, error = %e, "nats: pull failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) => {
                        queued.fetch_add(1, AtomicOrdering::AcqRel);
                        if self.tx.send((p, queued.clone(), m)).await.is_err() {
                            queued.fetch_sub(1, AtomicOrdering::AcqRel);
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(topic = %self.topic, partition = p, error = %e, "nats: pull batch ended");
                        break;
                    }
                }
            }
        }
    }

    /// When a member takes a partition, every delivery earlier owners left unacked is due
    /// for redelivery (nacked at a clean hand-over, or its ack wait over after a hold), but
    /// JetStream queues them in the order they were nacked or their ack waits expired (an
    /// in-progress ack moves that), not in stream order. Fetch them all in one batch and
    /// forward them in stream-sequence order. Returns false when the subscriber is gone.
    async fn recover(
        &self,
        p: u32,
        consumer: &mut Consumer<pull::Config>,
        queued: &Arc<AtomicUsize>,
    ) -> bool {
        let pending = match consumer.info().await {
            Ok(info) => info.num_ack_pending,
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = p, error = %e, "nats: reading pending deliveries failed");
                return true;
            }
        };
        if pending == 0 {
            return true;
        }
        let mut recovered = Vec::new();
        if let Ok(mut batch) = consumer
            .batch()
            .max_messages(pending.min(10_000))
            .expires(Duration::from_secs(2))
            .messages()
            .await
        {
            while let Some(Ok(m)) = batch.next().await {
                recovered.push(m);
            }
        }
        recovered.sort_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX));
        tracing::debug!(topic = %self.topic, partition = p, pending, recovered = recovered.len(), "nats: recovered a partition's unacked deliveries in stream order");
        for m in recovered {
            queued.fetch_add(1, AtomicOrdering::AcqRel);
            if self.tx.send((p, queued.clone(), m)).await.is_err() {
                queued.fetch_sub(1, AtomicOrdering::AcqRel);
                return false;
            }
        }
        true
    }

    /// Whether partition `p` is owned and not being handed over.
    fn owns(&self, p: u32) -> bool {
        self.lock().parts.contains_key(&p) && self.ownership.serving(p, Instant::now())
    }

    fn settled(&self, tag: u64) {
        let mut st = self.lock();
        if let Some(Held { partition: p, .. }) = st.inflight.remove(&tag) {
            let draining = st.parts.get(&p).is_some_and(|part| part.draining);
            if draining && st.inflight_in(p) == 0 {
                self.wake_bg.notify_one();
            }
        }
        drop(st);
        self.wake.notify_waiters();
    }

    /// Reads partition `p`'s unseen counts from the store, dropping entries at or below the
    /// consumer's ack floor.
    async fn load_unseen(&self, p: u32, ack_floor: u64) -> Unseen {
        let read = async {
            let store = self.inner.unseen().await?;
            store.get(&self.lease_key(p)).await
        };
        match read.await {
            Ok(current) => {
                let counts: BTreeMap<u64, u32> =
                    serde_json::from_slice(&current.value).unwrap_or_default();
                let before = counts.len();
                let counts: BTreeMap<u64, u32> =
                    counts.into_iter().filter(|(s, _)| *s > ack_floor).collect();
                let dirty = counts.len() != before;
                Unseen {
                    counts,
                    store_seq: current.seq,
                    dirty,
                }
            }
            Err(e) => {
                tracing::debug!(topic = %self.topic, partition = p, error = %e, "nats: cannot read the unseen-delivery counts; attempts may count hand-backs");
                Unseen::default()
            }
        }
    }

    /// Writes partition `p`'s unseen counts back for its next owner (when they changed).
    async fn save_unseen(&self, p: u32, unseen: &Unseen) {
        if !unseen.dirty {
            return;
        }
        let value = Bytes::from(serde_json::to_vec(&unseen.counts).unwrap_or_default());
        let write = async {
            let store = self.inner.unseen().await?;
            store
                .put_if(&self.lease_key(p), value, unseen.store_seq)
                .await
        };
        match write.await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::debug!(topic = %self.topic, partition = p, "nats: the unseen-delivery counts changed meanwhile; not overwritten")
            }
            Err(e) => {
                tracing::debug!(topic = %self.topic, partition = p, error = %e, "nats: cannot write the unseen-delivery counts; attempts may count hand-backs")
            }
        }
    }

    /// Leaves the group: hands back what this member holds and releases its leases.
    async fn leave(&self, rx: &mut mpsc::Receiver<Forwarded>) {
        let stops: Vec<Arc<AtomicBool>> = {
            let mut st = self.lock();
            let ps: Vec<u32> = st.parts.keys().copied().collect();
            for p in ps {
                st.drain(p);
            }
            st.parts
                .values()
                .map(|part| part.puller_done.clone())
                .collect()
        };
        let forwarded = wait_for_pullers(rx, &stops).await;
        let Leaving {
            clean,
            held,
            returned,
            mut unseen,
        } = self.take_all();
        // Oldest first: deliveries the application still holds (or released), then what was
        // stashed, then what the pullers forwarded last. Only the first ones were seen.
        let client = self.inner.js.client();
        for h in held.iter().filter(|h| !h.reply.is_empty()) {
            // A request, so the server confirms the nack (as a double ack does).
            let _ = client
                .request(h.reply.clone(), Bytes::from_static(b"-NAK"))
                .await;
        }
        // Pulled, never handed out: unseen.
        for (p, m) in returned.iter().chain(&forwarded) {
            if let Some(u) = unseen.get_mut(p) {
                u.add(stream_seq(m));
            }
        }
        nack_in_order(returned.into_iter().map(|(_, m)| m).collect()).await;
        nack_in_order(forwarded.into_iter().map(|(_, m)| m).collect()).await;
        for (p, u) in &unseen {
            self.save_unseen(*p, u).await;
        }
        let how = |p: u32| {
            if clean.get(&p).copied().unwrap_or(false) {
                HandOver::Clean
            } else {
                HandOver::Hold
            }
        };
        if let Err(e) = self.ownership.leave(self, how).await {
            tracing::debug!(error = %e, "nats: leaving the member list failed; it expires by itself");
        }
    }

    /// Takes everything out of the member's state when it leaves.
    fn take_all(&self) -> Leaving {
        let mut st = self.lock();
        // Clean only when the puller finished and was not waiting for the previous
        // owner's unacked deliveries.
        let clean: BTreeMap<u32, bool> = st
            .parts
            .iter()
            .map(|(p, part)| {
                (
                    *p,
                    part.puller_done.load(AtomicOrdering::Acquire)
                        && !part.recovering.load(AtomicOrdering::Acquire),
                )
            })
            .collect();
        let returned: Vec<(u32, JsMessage)> = st
            .parts
            .iter_mut()
            .flat_map(|(p, part)| {
                std::mem::take(&mut part.returned)
                    .into_iter()
                    .map(|m| (*p, m))
            })
            .collect();
        let unseen: BTreeMap<u32, Unseen> = st
            .parts
            .iter_mut()
            .map(|(p, part)| (*p, std::mem::take(&mut part.unseen)))
            .collect();
        st.parts.clear();
        // In hand-out order, so that a key's deliveries come back in their order.
        let held: Vec<Held> = std::mem::take(&mut st.inflight).into_values().collect();
        Leaving {
            clean,
            held,
            returned,
            unseen,
        }
    }

    /// Fencing: only partitions this member owns, with a fresh lease, that are not being
    /// handed over are delivered: the message back with its attempt. A message of a
    /// partition being handed over is kept to be nacked in arrival order (so JetStream
    /// redelivers it first) and the partition drains; one of a partition this member no longer
    /// owns is left unacked (its new owner waits for JetStream's redelivery, the lease was not
    /// released cleanly).
    fn fence(
        &self,
        p: u32,
        queued: &AtomicUsize,
        msg: JsMessage,
        tag: u64,
        seq: u64,
    ) -> Option<(JsMessage, u32)> {
        let delivered = msg.info().map(|i| i.delivered.max(0) as u64).unwrap_or(1);
        let mut st = self.lock();
        match st.parts.get(&p) {
            Some(part) if !part.draining && self.ownership.serving(p, Instant::now()) => {
                queued.fetch_sub(1, AtomicOrdering::AcqRel);
                let reply = msg
                    .reply
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                let attempt = part.unseen.attempt(seq, delivered);
                // A released delivery came back (its ack wait ran out): the old hand-out is
                // gone.
                st.inflight
                    .retain(|_, h| !(h.released && h.partition == p && h.seq == seq));
                st.inflight.insert(
                    tag,
                    Held {
                        partition: p,
                        reply,
                        seq,
                        released: false,
                    },
                );
                Some((msg, attempt))
            }
            Some(_) => {
                st.drain(p);
                self.ownership.drain(p);
                if let Some(part) = st.parts.get_mut(&p) {
                    part.returned.push(msg);
                }
                queued.fetch_sub(1, AtomicOrdering::AcqRel);
                self.wake_bg.notify_one();
                None
            }
            None => {
                queued.fetch_sub(1, AtomicOrdering::AcqRel);
                None
            }
        }
    }

    /// A pulled message as a delivery, if fencing lets it through ([`SubShared::fence`]).
    fn hand_out(
        self: &Arc<Self>,
        p: u32,
        queued: &AtomicUsize,
        msg: JsMessage,
    ) -> Option<Delivery> {
        let tag = self.tags.fetch_add(1, AtomicOrdering::Relaxed);
        let seq = stream_seq(&msg);
        let (msg, attempt) = self.fence(p, queued, msg, tag, seq)?;
        let (message, undecodable) = self.decode(&msg, seq);
        let event = Event::from_shared(self.topic.clone(), Arc::new(message), attempt);
        let acker = Box::new(NatsAck {
            partition: p,
            seq,
            shared: self.clone(),
            msg,
            tag,
        });
        Some(match undecodable {
            None => raw::delivery(event, acker),
            Some(error) => raw::undecodable(event, acker, error),
        })
    }

    /// The busbar message in `msg`. Published by another program: delivered with what can be
    /// read, under an id from its place in the stream (the same on every delivery). Not
    /// decodable as busbar's: its raw payload and subject, with the reason (the bus in front
    /// dead-letters it).
    fn decode(&self, msg: &JsMessage, seq: u64) -> (Message, Option<String>) {
        let id = || format!("nats-{}-{seq}", self.topic);
        match codec::decode_message(msg.headers.as_ref(), msg.payload.clone(), id) {
            Ok(m) => (m, None),
            Err(e) => {
                let mut raw = Message::new(msg.payload.clone()).with_id(id());
                raw.headers
                    .insert("busbar-nats-subject", msg.subject.to_string());
                (raw, Some(e.to_string()))
            }
        }
    }
}

/// A message's stream sequence (0 when its reply subject says none).
fn stream_seq(m: &JsMessage) -> u64 {
    m.info().map(|i| i.stream_sequence).unwrap_or(0)
}

/// Nacks messages one after another, each confirmed by the server, so JetStream queues
/// their redelivery in this order before the partition's lease is released.
async fn nack_in_order(messages: Vec<JsMessage>) {
    for m in messages {
        if let Err(e) = m.double_ack_with(AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "nats: nack failed; the message comes back after its ack wait");
        }
    }
}

fn fastrand_ms() -> u64 {
    5 + (now_ms() % 20)
}

async fn background(shared: Arc<SubShared>) {
    let hb = shared.inner.config.lease_ttl / 3;
    let poll = Duration::from_millis(250);
    let mut next_hb = Instant::now() + hb;
    let mut last_members_revision = 0u64;
    loop {
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(next_hb.min(Instant::now() + poll)) => false,
            _ = shared.wake_bg.notified() => true,
        };
        if shared.closed.load(AtomicOrdering::Acquire) || shared.inner.is_closed() {
            return;
        }
        // Cheap poll: rebalance as soon as the member list changes.
        let mut changed = false;
        if let Ok(kv) = shared.inner.leases().await {
            if let Ok(c) = kv.get(&shared.members_key()).await {
                changed = c.seq != last_members_revision;
                last_members_revision = c.seq;
            }
        }
        if woken || changed || Instant::now() >= next_hb {
            next_hb = match shared.heartbeat().await {
                Ok(true) => Instant::now() + poll,
                Ok(false) => Instant::now() + hb,
                Err(e) => {
                    tracing::warn!(topic = %shared.topic, error = %e, "nats: heartbeat failed; retrying");
                    Instant::now() + Duration::from_millis(500)
                }
            };
            if let Ok(kv) = shared.inner.leases().await {
                if let Ok(c) = kv.get(&shared.members_key()).await {
                    last_members_revision = c.seq;
                }
            }
        }
    }
}

pub(crate) struct NatsSubscriber {
    shared: Arc<SubShared>,
    rx: mpsc::Receiver<Forwarded>,
    task: JoinHandle<()>,
}

impl NatsSubscriber {
    pub(crate) async fn start(
        inner: Arc<Inner>,
        stream: stream::Stream,
        topic: String,
        options: SubscribeOptions,
        partitions: u32,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(PULL_BATCH);
        let member = uuid::Uuid::new_v4().simple().to_string();
        // A drain stuck for an ack wait is handed over with a hold.
        let ownership = Ownership::new(
            member.clone(),
            partitions,
            inner.config.lease_ttl,
            options.ack_timeout,
        );
        let shared = Arc::new(SubShared {
            inner,
            stream,
            topic: topic.into(),
            options,
            member,
            state: Mutex::new(State::default()),
            ownership,
            closed: AtomicBool::new(false),
            tags: AtomicU64::new(0),
            wake: Notify::new(),
            wake_bg: Notify::new(),
            tx,
        });
        shared.heartbeat().await?;
        let task = tokio::spawn(background(shared.clone()));
        Ok(Self { shared, rx, task })
    }
}

/// What a leaving member held, taken out of its state ([`SubShared::take_all`]).
struct Leaving {
    /// Per partition: a clean hand-over (its puller finished and was not waiting for the
    /// previous owner's unacked deliveries).
    clean: BTreeMap<u32, bool>,
    /// Handed out and not settled, in hand-out order.
    held: Vec<Held>,
    /// Pulled and stashed to be nacked in order.
    returned: Vec<(u32, JsMessage)>,
    unseen: BTreeMap<u32, Unseen>,
}

/// Lets the pullers finish their current pull (up to 3 s) and keeps what they forward, in
/// order.
async fn wait_for_pullers(
    rx: &mut mpsc::Receiver<Forwarded>,
    stops: &[Arc<AtomicBool>],
) -> Vec<(u32, JsMessage)> {
    let mut forwarded = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        while let Ok((p, q, m)) = rx.try_recv() {
            q.fetch_sub(1, AtomicOrdering::AcqRel);
            forwarded.push((p, m));
        }
        if stops.iter().all(|d| d.load(AtomicOrdering::Acquire)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while let Ok((p, q, m)) = rx.try_recv() {
        q.fetch_sub(1, AtomicOrdering::AcqRel);
        forwarded.push((p, m));
    }
    forwarded
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1).await?.pop())
    }

    /// The first message is awaited; the rest of the batch is what the pullers already
    /// queued (nothing awaited after the first, so a dropped call hands out nothing).
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let mut out = Vec::new();
        loop {
            if self.shared.closed.load(AtomicOrdering::Acquire) || self.shared.inner.is_closed() {
                return Ok(out);
            }
            let shared = self.shared.clone();
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let room = max.max(1).min(
                shared
                    .options
                    .max_in_flight
                    .saturating_sub(shared.lock().holding()),
            );
            if room == 0 {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let received = tokio::select! {
                m = self.rx.recv() => m,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            };
            let Some(first) = received else {
                return Ok(out);
            };
            let mut next = Some(first);
            while let Some((p, queued, msg)) = next.take() {
                if let Some(delivery) = shared.hand_out(p, &queued, msg) {
                    out.push(delivery);
                }
                if out.len() < room {
                    next = self.rx.try_recv().ok();
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        if self.shared.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        self.task.abort();
        // Buffered and held deliveries are nacked for immediate redelivery and the leases
        // released cleanly, so the next owner starts at once.
        self.shared.leave(&mut self.rx).await;
        self.rx.close();
        self.shared.wake.notify_waiters();
        Ok(())
    }
}

impl Drop for NatsSubscriber {
    fn drop(&mut self) {
        // Without close, this behaves like a crash: pullers stop, leases expire after their
        // TTL and JetStream redelivers what was unacked.
        self.task.abort();
        self.shared.lock().parts.clear();
    }
}

struct NatsAck {
    partition: u32,
    seq: u64,
    shared: Arc<SubShared>,
    msg: JsMessage,
    tag: u64,
}

impl NatsAck {
    fn ack_error(e: async_nats::Error, doing: &str) -> Error {
        let k = request_kind(&*e);
        Error::new(k, format!("{doing}: {e}"))
            .with_backend(BACKEND)
            .with_source(e)
    }
}

#[async_trait]
impl Ack for NatsAck {
    async fn ack(&self) -> Result<()> {
        self.shared.check_open()?;
        self.msg
            .double_ack()
            .await
            .map_err(|e| Self::ack_error(e, "acking"))?;
        if let Some(u) = self.shared.lock().unseen(self.partition) {
            u.done(self.seq);
        }
        self.shared.settled(self.tag);
        Ok(())
    }

    async fn redeliver(&self, after: Duration) -> Result<()> {
        self.shared.check_open()?;
        let kind = AckKind::Nak((!after.is_zero()).then_some(after));
        self.msg
            .ack_with(kind)
            .await
            .map_err(|e| Self::ack_error(e, "nacking"))?;
        self.shared.settled(self.tag);
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        self.shared.check_open()?;
        let mut st = self.shared.lock();
        let marked = match st.inflight.get_mut(&self.tag) {
            Some(h) if !h.released => {
                h.released = true;
                true
            }
            _ => false,
        };
        if marked {
            // JetStream will count its next delivery; no handler saw this one.
            if let Some(u) = st.unseen(self.partition) {
                u.add(self.seq);
            }
        }
        drop(st);
        self.shared.wake.notify_waiters();
        self.shared.wake_bg.notify_one();
        Ok(())
    }

    async fn extend_deadline(&self, _by: Duration) -> Result<()> {
        self.shared.check_open()?;
        if !self.shared.owns(self.partition) {
            // The partition is being handed over: extending would delay its redelivery past
            // newer messages at the next owner.
            return Err(Error::new(
                ErrorKind::Timeout,
                "the delivery's partition is being handed over; its deadline cannot be extended",
            )
            .with_backend(BACKEND));
        }
        // JetStream's in-progress ack restarts the consumer's ack wait.
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| Self::ack_error(e, "extending the ack deadline"))
    }
}
