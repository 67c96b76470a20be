//! In-flight bookkeeping for backends whose broker hands a consumer whole partitions (Kafka
//! partitions, RabbitMQ partition queues): the records received and not yet acked, which of
//! them may be handed out now, and the offset that is safe to commit. Not needed by
//! applications.
//!
//! Rules, per partition:
//! - Records with the same key are handed out one at a time, in offset order: the next one
//!   waits until the previous is acked (or dead-lettered). Records of other keys, and records
//!   without a key, are handed out concurrently.
//! - A nacked or timed-out record is handed out again before anything that follows it on its
//!   key, with its attempt count increased.
//! - The committed offset is the lowest offset not yet acked (or, when everything received
//!   was acked, the offset after the last one received): Kafka never records progress past
//!   unfinished work, whatever order acks arrive in.
//! - A partition carries an epoch, renewed on every assignment. Acks of deliveries from an
//!   earlier epoch (the partition was revoked meanwhile) change nothing: the new owner
//!   resumes from the committed offset and delivers them again.
//! - Beside the committed offset, a partition's [`Progress`] says what its next owner should
//!   know: which offsets past the committed one were acked already (it skips them) and how
//!   many times handlers received each unacked one (its attempt goes on from there). A backend
//!   stores it with the commit (Kafka: the commit's metadata) and hands it to
//!   [`State::assign_with`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::Result;
use crate::message::Message;
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Waiting to be handed out (it is, or will be, in `ready`).
    Queued,
    /// Nacked with a delay: queued again at this instant.
    Delayed(Instant),
    /// Handed out; comes back after the deadline unless settled.
    InFlight { tag: u64, deadline: Instant },
}

#[derive(Debug)]
struct Entry {
    message: Arc<Message>,
    attempt: u32,
    status: Status,
}

impl Entry {
    /// How many times a handler received it: its attempt while out, the one before when
    /// waiting for its next hand-out.
    fn receptions(&self) -> u32 {
        match self.status {
            Status::InFlight { .. } => self.attempt,
            Status::Queued | Status::Delayed(_) => self.attempt.saturating_sub(1),
        }
    }
}

#[derive(Debug, Default)]
struct Partition {
    epoch: u64,
    /// Offsets the previous owner acked past its commit point: skipped when received.
    done: BTreeSet<i64>,
    /// Handler receptions of offsets the previous owner held unacked.
    seen: HashMap<i64, u32>,
    /// Bumped whenever the partition's [`Progress`] may have changed.
    changes: u64,
    /// `changes` at the last commit.
    committed_changes: u64,
    /// Received and not acked, by offset.
    entries: BTreeMap<i64, Entry>,
    /// Not-acked offsets per key, in offset order: only the front may be in flight.
    keys: HashMap<String, VecDeque<i64>>,
    /// The offset after the last record received (-1 before the first).
    next_offset: i64,
    /// The last offset committed or known committed (-1 when unknown).
    committed: i64,
    /// Revoked and waiting for in-flight deliveries to settle: nothing more is handed out.
    draining: bool,
}

/// What the next owner of a partition should know about it (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The lowest offset not acked: where the next owner resumes (Kafka's committed offset).
    pub commit: i64,
    /// Offset ranges (`start..end`, ascending, all at or past `commit`) already acked: the
    /// next owner skips them.
    pub acked: Vec<(i64, i64)>,
    /// Offsets at or past `commit`, not acked, with how many times a handler received them:
    /// the next owner hands them out with the attempt after that.
    pub seen: Vec<(i64, u32)>,
}

impl Progress {
    /// Nothing known beyond the committed offset.
    pub fn at(commit: i64) -> Self {
        Self {
            commit,
            ..Self::default()
        }
    }
}

/// A record handed out to the application.
#[derive(Debug, Clone)]
pub struct Handed {
    /// Partition it came from.
    pub partition: i32,
    /// Its offset (or delivery tag) in the partition.
    pub offset: i64,
    /// The partition's assignment epoch.
    pub epoch: u64,
    /// Identifies this hand-out (a redelivery gets a new tag).
    pub tag: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Delivery attempt, 1 on the first.
    pub attempt: u32,
}

/// Identifies one handed-out delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Partition.
    pub partition: i32,
    /// Offset (or delivery tag).
    pub offset: i64,
    /// Assignment epoch.
    pub epoch: u64,
    /// Hand-out tag.
    pub tag: u64,
}

impl Handed {
    /// The delivery of this hand-out on `topic`, settled through `acker` (which holds
    /// [`Handed::token`]).
    pub fn into_delivery(
        self,
        topic: Arc<str>,
        acker: Box<dyn crate::raw::Ack>,
    ) -> crate::Delivery {
        let event = crate::Event::from_shared(topic, self.message, self.attempt);
        crate::raw::delivery(event, acker)
    }

    /// The token that settles this hand-out.
    pub fn token(&self) -> Token {
        Token {
            partition: self.partition,
            offset: self.offset,
            epoch: self.epoch,
            tag: self.tag,
        }
    }
}

/// The bookkeeping of one subscriber (see the module docs).
#[derive(Debug)]
pub struct State {
    parts: HashMap<i32, Partition>,
    ready: VecDeque<(i32, i64)>,
    delayed: BTreeSet<(Instant, i32, i64)>,
    deadlines: BTreeSet<(Instant, i32, i64, u64)>,
    in_flight: usize,
    buffered: usize,
    next_tag: u64,
    next_epoch: u64,
    ack_timeout: Duration,
    max_in_flight: usize,
}

impl State {
    /// Empty bookkeeping with the subscriber's ack timeout and in-flight limit.
    pub fn new(ack_timeout: Duration, max_in_flight: usize) -> Self {
        Self {
            parts: HashMap::new(),
            ready: VecDeque::new(),
            delayed: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            in_flight: 0,
            buffered: 0,
            next_tag: 1,
            next_epoch: 1,
            ack_timeout,
            max_in_flight,
        }
    }

    /// Records received and not acked, over all partitions.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Deliveries handed out and not settled.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts owning `partition` (a fresh epoch; anything left from an earlier assignment
    /// is dropped).
    pub fn assign(&mut self, partition: i32) {
        self.assign_with(partition, None);
    }

    /// Starts owning `partition`, knowing what its previous owner recorded with its commit.
    pub fn assign_with(&mut self, partition: i32, progress: Option<Progress>) {
        self.drop_partition(partition);
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let mut p = Partition {
            epoch,
            next_offset: -1,
            committed: -1,
            ..Partition::default()
        };
        if let Some(progress) = progress {
            p.committed = progress.commit;
            for (start, end) in progress.acked {
                // Bounded: a range past a sane size is not trusted (a foreign note).
                if start >= progress.commit && end > start && end - start <= 1_000_000 {
                    p.done.extend(start..end);
                }
            }
            p.seen = progress
                .seen
                .into_iter()
                .filter(|(o, n)| *o >= progress.commit && *n > 0)
                .collect();
        }
        self.parts.insert(partition, p);
    }

    /// What the next owner of `partition` should know, if it is owned.
    pub fn progress(&self, partition: i32) -> Option<Progress> {
        let p = self.parts.get(&partition)?;
        let commit = match (p.entries.keys().next().copied(), p.next_offset) {
            (Some(o), _) => o,
            (None, n) if n >= 0 => n,
            // Nothing received yet: what the previous owner left stands.
            (None, _) => p.committed,
        };
        let mut acked: Vec<(i64, i64)> = Vec::new();
        let mut push = |o: i64| match acked.last_mut() {
            Some((_, end)) if *end == o => *end += 1,
            _ => acked.push((o, o + 1)),
        };
        // Received past the commit point and no longer held: acked.
        if p.next_offset > commit {
            for o in commit..p.next_offset {
                if !p.entries.contains_key(&o) {
                    push(o);
                }
            }
        }
        // Not received yet but acked by an earlier owner.
        for &o in p.done.range(commit.max(p.next_offset)..) {
            push(o);
        }
        let mut seen: Vec<(i64, u32)> = p
            .entries
            .iter()
            .filter_map(|(&o, e)| {
                let n = e.receptions();
                (n > 0).then_some((o, n))
            })
            .collect();
        seen.extend(
            p.seen
                .iter()
                .filter(|(o, _)| **o >= commit.max(p.next_offset))
                .map(|(o, n)| (*o, *n)),
        );
        seen.sort_unstable();
        Some(Progress {
            commit,
            acked,
            seen,
        })
    }

    /// The records of `partition` not acked, with how many times a handler received each:
    /// `(offset, message, receptions)`, in offset order.
    pub fn unsettled(&self, partition: i32) -> Vec<(i64, Arc<Message>, u32)> {
        let Some(p) = self.parts.get(&partition) else {
            return Vec::new();
        };
        p.entries
            .iter()
            .map(|(&o, e)| (o, e.message.clone(), e.receptions()))
            .collect()
    }

    /// Stops handing out records of `partition`; deliveries already out may still settle.
    pub fn start_draining(&mut self, partition: i32) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.draining = true;
        }
    }

    /// Deliveries of `partition` handed out, not settled and not yet past their deadline.
    pub fn live_in_flight(&self, partition: i32, now: Instant) -> usize {
        self.parts.get(&partition).map_or(0, |p| {
            p.entries
                .values()
                .filter(|e| matches!(e.status, Status::InFlight { deadline, .. } if deadline > now))
                .count()
        })
    }

    /// Forgets `partition` (revoked): later acks of its deliveries change nothing.
    pub fn drop_partition(&mut self, partition: i32) {
        if let Some(p) = self.parts.remove(&partition) {
            self.buffered -= p.entries.len();
            let out = p
                .entries
                .values()
                .filter(|e| matches!(e.status, Status::InFlight { .. }))
                .count();
            self.in_flight -= out;
        }
    }

    /// Adds a received record. Records of partitions not owned, and offsets already seen
    /// (a re-fetch), are ignored. Returns whether it was added.
    pub fn receive(&mut self, partition: i32, offset: i64, message: Message) -> bool {
        self.receive_attempt(partition, offset, message, 1)
    }

    /// The epoch of `partition`'s current assignment, if owned.
    pub fn epoch_of(&self, partition: i32) -> Option<u64> {
        self.parts.get(&partition).map(|p| p.epoch)
    }

    /// As [`State::receive`], for a record the broker already delivered `attempt - 1` times
    /// (a redelivery after a consumer left, say).
    pub fn receive_attempt(
        &mut self,
        partition: i32,
        offset: i64,
        message: Message,
        attempt: u32,
    ) -> bool {
        let Some(p) = self.parts.get_mut(&partition) else {
            return false;
        };
        if offset < p.next_offset || p.draining {
            return false;
        }
        p.next_offset = offset + 1;
        if p.done.remove(&offset) {
            // Acked by the partition's previous owner: not delivered again.
            p.changes += 1;
            return false;
        }
        let attempt = match p.seen.remove(&offset) {
            Some(n) => attempt.max(n.saturating_add(1)),
            None => attempt,
        };
        let eligible = match &message.key {
            Some(k) => {
                let q = p.keys.entry(k.clone()).or_default();
                q.push_back(offset);
                q.len() == 1
            }
            None => true,
        };
        p.entries.insert(
            offset,
            Entry {
                message: Arc::new(message),
                attempt: attempt.max(1),
                status: Status::Queued,
            },
        );
        self.buffered += 1;
        if eligible {
            self.ready.push_back((partition, offset));
        }
        true
    }

    /// Moves due delayed records and timed-out deliveries back to the front of the queue.
    fn promote(&mut self, now: Instant) {
        while let Some(&(at, part, offset)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            let Some(e) = self
                .parts
                .get_mut(&part)
                .and_then(|p| p.entries.get_mut(&offset))
            else {
                continue;
            };
            if e.status == Status::Delayed(at) {
                e.status = Status::Queued;
                self.ready.push_front((part, offset));
            }
        }
        while let Some(&(deadline, part, offset, tag)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(e) = self
                .parts
                .get_mut(&part)
                .and_then(|p| p.entries.get_mut(&offset))
            else {
                continue;
            };
            if e.status == (Status::InFlight { tag, deadline }) {
                tracing::debug!(
                    partition = part,
                    offset,
                    attempt = e.attempt,
                    "kafka: ack timeout; delivering again"
                );
                e.status = Status::Queued;
                e.attempt += 1;
                self.in_flight -= 1;
                self.ready.push_front((part, offset));
            }
        }
    }

    /// Hands out the next eligible record, if the in-flight limit allows.
    pub fn take(&mut self, now: Instant) -> Option<Handed> {
        self.promote(now);
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some((part, offset)) = self.ready.pop_front() {
            let Some(p) = self.parts.get_mut(&part) else {
                continue;
            };
            let Some(e) = p.entries.get_mut(&offset) else {
                continue;
            };
            if e.status != Status::Queued {
                continue;
            }
            if p.draining {
                skipped.push((part, offset));
                continue;
            }
            let tag = self.next_tag;
            self.next_tag += 1;
            let deadline = now + self.ack_timeout;
            e.status = Status::InFlight { tag, deadline };
            p.changes += 1;
            self.deadlines.insert((deadline, part, offset, tag));
            self.in_flight += 1;
            found = Some(Handed {
                partition: part,
                offset,
                epoch: p.epoch,
                tag,
                message: e.message.clone(),
                attempt: e.attempt,
            });
            break;
        }
        for s in skipped.into_iter().rev() {
            self.ready.push_front(s);
        }
        found
    }

    /// When `take` may have something new without a record arriving or a delivery settling.
    pub fn next_wake(&self) -> Option<Instant> {
        let d = self.delayed.first().map(|x| x.0);
        let t = self.deadlines.first().map(|x| x.0);
        match (d, t) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn entry(&mut self, t: Token) -> Option<(&mut Partition, i64)> {
        let p = self.parts.get_mut(&t.partition)?;
        (p.epoch == t.epoch && p.entries.contains_key(&t.offset)).then_some((p, t.offset))
    }

    fn holds(&self, t: Token) -> bool {
        self.parts
            .get(&t.partition)
            .filter(|p| p.epoch == t.epoch)
            .and_then(|p| p.entries.get(&t.offset))
            .is_some_and(|e| matches!(e.status, Status::InFlight { tag, .. } if tag == t.tag))
    }

    /// The message and attempt of a delivery still held under `t`.
    pub fn held(&self, t: Token) -> Option<(Arc<Message>, u32)> {
        if !self.holds(t) {
            return None;
        }
        let e = self.parts.get(&t.partition)?.entries.get(&t.offset)?;
        Some((e.message.clone(), e.attempt))
    }

    /// Acks a delivery. A stale ack (it timed out and waits to be delivered again) still
    /// counts: the record was processed. An ack from an earlier epoch, or of a record already
    /// delivered again, changes nothing. Returns whether anything changed.
    pub fn ack(&mut self, t: Token) -> bool {
        let held = self.holds(t);
        let Some((p, offset)) = self.entry(t) else {
            return false;
        };
        let Some(e) = p.entries.get(&offset) else {
            return false;
        };
        let was_out = match e.status {
            Status::InFlight { .. } if !held => return false,
            Status::InFlight { .. } => true,
            Status::Queued | Status::Delayed(_) => false,
        };
        let key = e.message.key.clone();
        p.entries.remove(&offset);
        p.changes += 1;
        let mut next_ready = None;
        if let Some(k) = key {
            if let Some(q) = p.keys.get_mut(&k) {
                let was_front = q.front() == Some(&offset);
                q.retain(|o| *o != offset);
                if q.is_empty() {
                    p.keys.remove(&k);
                } else if was_front {
                    next_ready = q.front().copied();
                }
            }
        }
        self.buffered -= 1;
        if was_out {
            self.in_flight -= 1;
        }
        if let Some(next) = next_ready {
            self.ready.push_back((t.partition, next));
        }
        true
    }

    /// Hands a held delivery back: queued again at once, or at `not_before`.
    pub fn nack(&mut self, t: Token, not_before: Option<Instant>) -> bool {
        if !self.holds(t) {
            return false;
        }
        let Some(e) = self
            .parts
            .get_mut(&t.partition)
            .and_then(|p| p.entries.get_mut(&t.offset))
        else {
            return false;
        };
        e.attempt += 1;
        match not_before {
            Some(at) => {
                e.status = Status::Delayed(at);
                self.delayed.insert((at, t.partition, t.offset));
            }
            None => {
                e.status = Status::Queued;
                self.ready.push_front((t.partition, t.offset));
            }
        }
        self.in_flight -= 1;
        true
    }

    /// Hands a held delivery back as if it had never been handed out: queued again at once,
    /// first on its key, with the same attempt.
    pub fn release(&mut self, t: Token) -> bool {
        if !self.nack(t, None) {
            return false;
        }
        if let Some(e) = self
            .parts
            .get_mut(&t.partition)
            .and_then(|p| p.entries.get_mut(&t.offset))
        {
            e.attempt = e.attempt.saturating_sub(1).max(1);
        }
        true
    }

    /// Moves the deadline of a held delivery to `until`.
    pub fn extend(&mut self, t: Token, until: Instant) -> bool {
        if !self.holds(t) {
            return false;
        }
        let Some((p, offset)) = self.entry(t) else {
            return false;
        };
        if let Some(e) = p.entries.get_mut(&offset) {
            e.status = Status::InFlight {
                tag: t.tag,
                deadline: until,
            };
            self.deadlines.insert((until, t.partition, offset, t.tag));
        }
        true
    }

    /// The offsets to commit now: per owned partition, the lowest unacked offset (or the one
    /// after the last received), where that is past what was committed.
    pub fn commit_points(&self) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .filter_map(|(&part, p)| {
                let point = p.entries.keys().next().copied().unwrap_or(p.next_offset);
                (point >= 0 && point > p.committed).then_some((part, point))
            })
            .collect()
    }

    /// What to commit now, with the progress to store beside it: every owned partition whose
    /// commit point advanced or whose [`Progress`] changed since its last commit. The `u64` is
    /// the change count to hand back to [`State::committed_progress`].
    pub fn progress_to_commit(&self) -> Vec<(i32, Progress, u64)> {
        self.parts
            .iter()
            .filter_map(|(&part, p)| {
                let progress = self.progress(part)?;
                let advanced = progress.commit > p.committed;
                (progress.commit >= 0 && (advanced || p.changes != p.committed_changes))
                    .then_some((part, progress, p.changes))
            })
            .collect()
    }

    /// Records that `offset` was committed for `partition`.
    pub fn committed(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.committed = p.committed.max(offset);
        }
    }

    /// Records that `progress`, taken at change count `changes`, was committed.
    pub fn committed_progress(&mut self, partition: i32, progress: &Progress, changes: u64) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.committed = p.committed.max(progress.commit);
            p.committed_changes = p.committed_changes.max(changes);
        }
    }
}

/// The `Subscriber::next` loop of a backend built on [`State`]: hands out the next eligible
/// record, or waits for `wake` (records arrived, a delivery settled) or the next delayed or
/// timed-out record. `ended` is asked before every attempt; `Some(result)` ends the wait with
/// it (the subscriber closed: `Ok(None)`; it failed: `Err`).
pub async fn next_handed(
    state: &Mutex<State>,
    wake: &Notify,
    mut ended: impl FnMut() -> Option<Result<Option<Handed>>>,
) -> Result<Option<Handed>> {
    let batch = next_handed_batch(state, wake, 1, || {
        ended().map(|r| r.map(|h| h.into_iter().collect()))
    })
    .await?;
    Ok(batch.into_iter().next())
}

/// The `Subscriber::next_batch` loop of a backend built on [`State`]: hands out up to `max`
/// eligible records at once (under one lock), or waits as [`next_handed`] does. `ended`'s
/// `Some(Ok(vec![]))` ends the subscription. Nothing is awaited once records are taken, so a
/// dropped call hands out nothing.
pub async fn next_handed_batch(
    state: &Mutex<State>,
    wake: &Notify,
    max: usize,
    mut ended: impl FnMut() -> Option<Result<Vec<Handed>>>,
) -> Result<Vec<Handed>> {
    loop {
        // Registered before looking, so a wake-up between the look and the wait is kept.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if let Some(result) = ended() {
            return result;
        }
        let now = Instant::now();
        let (handed, wake_at) = {
            let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
            let handed: Vec<Handed> = std::iter::from_fn(|| st.take(now))
                .take(max.max(1))
                .collect();
            (handed, st.next_wake())
        };
        if !handed.is_empty() {
            return Ok(handed);
        }
        let until = wake_at.unwrap_or(now + Duration::from_secs(1));
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: Option<&str>) -> Message {
        let m = Message::new("x");
        match key {
            Some(k) => m.with_key(k),
            None => m,
        }
    }

    fn state() -> State {
        let mut s = State::new(Duration::from_secs(10), 100);
        s.assign(0);
        s
    }

    #[test]
    fn one_key_at_a_time_other_keys_concurrently() {
        let mut s = state();
        let now = Instant::now();
        for (o, k) in [(0, "a"), (1, "a"), (2, "b"), (3, "a")] {
            assert!(s.receive(0, o, msg(Some(k))));
        }
        let first = s.take(now).expect("a@0");
        let second = s.take(now).expect("b@2");
        assert_eq!((first.offset, second.offset), (0, 2));
        assert!(s.take(now).is_none(), "a@1 waits for a@0");
        assert!(s.ack(second.token()));
        assert_eq!(
            s.commit_points(),
            vec![(0, 0)],
            "a@0 unfinished: commit stays at 0"
        );
        assert!(s.ack(first.token()));
        assert_eq!(s.take(now).expect("a@1").offset, 1);
        assert_eq!(s.commit_points(), vec![(0, 1)]);
    }

    #[test]
    fn nack_and_timeout_come_back_first_with_higher_attempt() {
        let mut s = state();
        let now = Instant::now();
        s.receive(0, 0, msg(Some("a")));
        s.receive(0, 1, msg(Some("a")));
        let d = s.take(now).expect("a@0");
        assert!(s.nack(d.token(), None));
        assert!(
            s.ack(d.token()),
            "a stale ack of a record waiting to be delivered again counts"
        );
        assert_eq!(s.buffered(), 1);
        let mut s = state();
        s.receive(0, 0, msg(Some("a")));
        let d = s.take(now).expect("first");
        assert!(s.take(now + Duration::from_secs(5)).is_none());
        let again = s
            .take(now + Duration::from_secs(11))
            .expect("after the ack timeout");
        assert_eq!((again.offset, again.attempt), (0, 2));
        assert!(
            !s.ack(d.token()),
            "the first delivery's ack is stale once delivered again"
        );
        assert!(s.ack(again.token()));
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn delayed_nack_waits() {
        let mut s = state();
        let now = Instant::now();
        s.receive(0, 0, msg(None));
        let d = s.take(now).expect("first");
        assert!(s.nack(d.token(), Some(now + Duration::from_secs(2))));
        assert!(s.take(now + Duration::from_secs(1)).is_none());
        assert_eq!(s.next_wake(), Some(now + Duration::from_secs(2)));
        let again = s.take(now + Duration::from_secs(2)).expect("due");
        assert_eq!(again.attempt, 2);
    }

    #[test]
    fn progress_says_what_was_acked_and_seen_past_the_commit_point() {
        let mut s = state();
        let now = Instant::now();
        for o in 10..15 {
            s.receive(0, o, msg(None));
        }
        let handed: Vec<Handed> = (0..4).filter_map(|_| s.take(now)).collect();
        // 10 unacked and in flight, 11 acked, 12 nacked (seen once, queued), 13 acked,
        // 14 never handed out.
        assert!(s.ack(handed[1].token()));
        assert!(s.nack(handed[2].token(), None));
        assert!(s.ack(handed[3].token()));
        let p = s.progress(0).expect("owned");
        assert_eq!(p.commit, 10);
        assert_eq!(p.acked, vec![(11, 12), (13, 14)]);
        assert_eq!(p.seen, vec![(10, 1), (12, 1)]);
        let to_commit = s.progress_to_commit();
        assert_eq!(to_commit.len(), 1);
        let (part, progress, changes) = to_commit[0].clone();
        s.committed_progress(part, &progress, changes);
        assert!(s.progress_to_commit().is_empty(), "nothing new since");
    }

    #[test]
    fn the_next_owner_skips_acked_records_and_goes_on_counting_attempts() {
        let mut s = state();
        s.assign_with(
            0,
            Some(Progress {
                commit: 10,
                acked: vec![(11, 12), (13, 14)],
                seen: vec![(10, 1), (12, 3)],
            }),
        );
        let now = Instant::now();
        let added: Vec<bool> = (10..15).map(|o| s.receive(0, o, msg(None))).collect();
        assert_eq!(added, vec![true, false, true, false, true]);
        let attempts: Vec<(i64, u32)> = std::iter::from_fn(|| s.take(now))
            .map(|h| (h.offset, h.attempt))
            .collect();
        assert_eq!(attempts, vec![(10, 2), (12, 4), (14, 1)]);
        // Before anything is received, the previous owner's note stands as it was.
        let mut fresh = state();
        let note = Progress {
            commit: 10,
            acked: vec![(11, 12)],
            seen: vec![(10, 2)],
        };
        fresh.assign_with(0, Some(note.clone()));
        assert_eq!(fresh.progress(0), Some(note));
    }

    #[test]
    fn revoked_partitions_ignore_old_acks() {
        let mut s = state();
        let now = Instant::now();
        s.receive(0, 5, msg(None));
        let d = s.take(now).expect("first");
        s.drop_partition(0);
        s.assign(0);
        assert!(!s.ack(d.token()));
        assert_eq!((s.in_flight(), s.buffered()), (0, 0));
        assert!(!s.receive(1, 0, msg(None)), "partition 1 is not owned");
    }

    #[test]
    fn draining_hands_out_nothing_more() {
        let mut s = state();
        let now = Instant::now();
        s.receive(0, 0, msg(None));
        s.receive(0, 1, msg(None));
        let d = s.take(now).expect("first");
        s.start_draining(0);
        assert!(s.take(now).is_none());
        assert_eq!(s.live_in_flight(0, now), 1);
        assert!(s.ack(d.token()));
        assert_eq!(s.live_in_flight(0, now), 0);
        assert_eq!(s.commit_points(), vec![(0, 1)]);
    }

    #[test]
    fn in_flight_limit() {
        let mut s = State::new(Duration::from_secs(10), 1);
        s.assign(0);
        let now = Instant::now();
        s.receive(0, 0, msg(None));
        s.receive(0, 1, msg(None));
        let d = s.take(now).expect("first");
        assert!(s.take(now).is_none());
        s.ack(d.token());
        assert!(s.take(now).is_some());
    }
}
