//! The data structures of the memory backend, without any locking or async.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::message::Message;
use crate::options::StartPosition;

/// The state's hash maps: keys, topic and group names hashed with foldhash (SipHash was a
/// tenth of the memory bus's time under load).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// How many blocked new messages one dispatch call moves aside before giving up the scan.
const MAX_SKIPPED_PER_DISPATCH: usize = 4096;

#[derive(Default)]
pub(super) struct State {
    topics: HashMap<String, Topic>,
    next_id: u64,
}

impl State {
    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn topic_mut(&mut self, name: &str) -> &mut Topic {
        if !self.topics.contains_key(name) {
            self.topics.insert(name.to_owned(), Topic::default());
        }
        self.topics.get_mut(name).expect("topic inserted above")
    }

    /// Messages of `topic` not received by `group` yet: past its cursor, or handed back and
    /// waiting for redelivery.
    pub(super) fn lag(&self, topic: &str, group: &str) -> u64 {
        let Some(t) = self.topics.get(topic) else {
            return 0;
        };
        t.groups.get(group).map_or(0, |g| {
            let g = lock(g);
            t.end().saturating_sub(g.cursor.max(t.base)) + g.waiting.len() as u64
        })
    }

    /// Up to `options.limit` messages of the log, oldest first (from a time: those whose
    /// time is at or after it).
    pub(super) fn browse(&self, topic: &str, options: &crate::BrowseOptions) -> Vec<Message> {
        let Some(t) = self.topics.get(topic) else {
            return Vec::new();
        };
        t.log
            .iter()
            .filter(|m| match options.from {
                crate::BrowseFrom::Time(at) => m.time >= at,
                _ => true,
            })
            .take(options.limit)
            .map(|m| Message::clone(m))
            .collect()
    }

    pub(super) fn all_notifies(&self) -> Vec<Arc<Notify>> {
        self.topics.values().map(|t| t.notify.clone()).collect()
    }
}

#[derive(Default)]
pub(super) struct Topic {
    /// Offset of `log[0]`.
    base: u64,
    log: VecDeque<Arc<Message>>,
    /// Messages published with a delay, by due time and publish sequence.
    scheduled: BTreeMap<(Instant, u64), Message>,
    scheduled_seq: u64,
    /// Each group behind a lock of its own: acks take only their group's lock (no topic or
    /// group lookup, no wait for publishers); whoever needs the topic too takes the state's
    /// lock first, then the group's.
    groups: HashMap<String, SharedGroup>,
    pub(super) notify: Arc<Notify>,
}

/// A consumer group, shared by the topic and the acks of its deliveries.
pub(super) type SharedGroup = Arc<Mutex<Group>>;

/// Locks a group (a poisoned lock is taken over: the state stays consistent between calls).
pub(super) fn lock(g: &SharedGroup) -> MutexGuard<'_, Group> {
    g.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Topic {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    pub(super) fn append(&mut self, message: Arc<Message>, retention: usize) {
        self.log.push_back(message);
        while self.log.len() > retention {
            self.log.pop_front();
            self.base += 1;
        }
        let base = self.base;
        for (name, g) in &self.groups {
            let mut g = lock(g);
            if g.cursor < base {
                tracing::warn!(
                    group = %name,
                    lost = base - g.cursor,
                    "memory retention dropped messages the group had not read"
                );
                g.cursor = base;
            }
        }
    }

    pub(super) fn schedule(&mut self, due: Instant, message: Message) {
        self.scheduled_seq += 1;
        self.scheduled.insert((due, self.scheduled_seq), message);
    }

    /// Appends scheduled messages whose time has come.
    pub(super) fn promote_due(&mut self, now: Instant, retention: usize) {
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let m = entry.remove();
            self.append(Arc::new(m), retention);
        }
    }

    /// Group `name` of the topic, created at `start` if new.
    pub(super) fn group(&mut self, name: &str, start: StartPosition) -> SharedGroup {
        if let Some(g) = self.groups.get(name) {
            return g.clone();
        }
        let cursor = match start {
            StartPosition::Earliest => self.base,
            StartPosition::Latest => self.end(),
        };
        let g = Arc::new(Mutex::new(Group::new(cursor)));
        self.groups.insert(name.to_owned(), g.clone());
        g
    }

    /// Hands up to `max` deliverable messages of `group` (options.group of this topic) to
    /// `member` (into `out`, in the order single hand-outs would take), and says how long to
    /// wait at most before trying again when there was nothing to hand out.
    pub(super) fn dispatch(
        &self,
        group: &SharedGroup,
        member: u64,
        now: Instant,
        ack_timeout: Duration,
        max: usize,
        out: &mut Vec<Handout>,
    ) -> Option<Instant> {
        let next_scheduled = self.scheduled.keys().next().map(|k| k.0);
        let (base, log) = (self.base, &self.log);
        let mut g = lock(group);
        let mut wake = None;
        while out.len() < max {
            match g.dispatch(member, now, ack_timeout, base, log) {
                Dispatch::Deliver(handout) => out.push(handout),
                Dispatch::Wait(w) => {
                    wake = w;
                    break;
                }
            }
        }
        min_instant(wake, next_scheduled)
    }
}

fn min_instant(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One message handed to a member.
pub(super) struct Handout {
    pub(super) message: Arc<Message>,
    pub(super) offset: u64,
    pub(super) tag: u64,
    pub(super) attempt: u32,
}

/// The outcome of one [`Group::dispatch`].
enum Dispatch {
    /// Deliver this message.
    Deliver(Handout),
    /// Nothing deliverable now; try again when notified or at the instant, if any.
    Wait(Option<Instant>),
}

struct Pending {
    message: Arc<Message>,
    member: u64,
    tag: u64,
    deadline: Instant,
    attempts: u32,
}

struct Waiting {
    message: Arc<Message>,
    attempts: u32,
    not_before: Option<Instant>,
}

#[derive(Default)]
struct KeyState {
    /// The member holding unacked deliveries of this key.
    owner: Option<u64>,
    in_flight: usize,
    /// Offsets of this key waiting for (re)delivery.
    waiting: BTreeSet<u64>,
}

struct Member {
    in_flight: usize,
    max_in_flight: usize,
}

/// A consumer group: a cursor into the log plus what is unacked or waiting for redelivery.
pub(super) struct Group {
    cursor: u64,
    pending: HashMap<u64, Pending>,
    deadlines: BTreeSet<(Instant, u64)>,
    waiting: BTreeMap<u64, Waiting>,
    keys: HashMap<String, KeyState>,
    members: HashMap<u64, Member>,
    next_tag: u64,
}

impl Group {
    fn new(cursor: u64) -> Self {
        Self {
            cursor,
            pending: HashMap::default(),
            deadlines: BTreeSet::new(),
            waiting: BTreeMap::new(),
            keys: HashMap::default(),
            members: HashMap::default(),
            next_tag: 0,
        }
    }

    pub(super) fn join(&mut self, member: u64, max_in_flight: usize) {
        self.members.insert(
            member,
            Member {
                in_flight: 0,
                max_in_flight,
            },
        );
    }

    /// Removes `member`. With `release`, its unacked deliveries are handed back at once;
    /// otherwise they come back when their ack timeout expires (a crash).
    pub(super) fn leave(&mut self, member: u64, release: bool) {
        self.members.remove(&member);
        if release {
            let held: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.member == member)
                .map(|(o, _)| *o)
                .collect();
            for offset in held {
                self.hand_back(offset, None);
            }
        }
    }

    /// Moves a pending delivery back to waiting. Returns false if it was not pending.
    fn hand_back(&mut self, offset: u64, not_before: Option<Instant>) -> bool {
        let Some(p) = self.release(offset) else {
            return false;
        };
        if let Some(k) = &p.message.key {
            self.keys
                .entry(k.clone())
                .or_default()
                .waiting
                .insert(offset);
        }
        self.waiting.insert(
            offset,
            Waiting {
                message: p.message,
                attempts: p.attempts,
                not_before,
            },
        );
        true
    }

    /// Removes a pending entry and updates the member and key bookkeeping.
    fn release(&mut self, offset: u64) -> Option<Pending> {
        let p = self.pending.remove(&offset)?;
        self.deadlines.remove(&(p.deadline, offset));
        if let Some(m) = self.members.get_mut(&p.member) {
            m.in_flight = m.in_flight.saturating_sub(1);
        }
        if let Some(k) = &p.message.key {
            if let Some(ks) = self.keys.get_mut(k) {
                ks.in_flight = ks.in_flight.saturating_sub(1);
                if ks.in_flight == 0 {
                    ks.owner = None;
                    if ks.waiting.is_empty() {
                        self.keys.remove(k);
                    }
                }
            }
        }
        Some(p)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, offset)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if self
                .pending
                .get(&offset)
                .is_some_and(|p| p.deadline == deadline)
            {
                tracing::debug!(offset, "memory: ack timeout expired, redelivering");
                self.hand_back(offset, None);
            }
        }
    }

    fn owner_allows(&self, key: &str, member: u64) -> bool {
        self.keys
            .get(key)
            .and_then(|ks| ks.owner)
            .is_none_or(|o| o == member)
    }

    fn dispatch(
        &mut self,
        member: u64,
        now: Instant,
        ack_timeout: Duration,
        base: u64,
        log: &VecDeque<Arc<Message>>,
    ) -> Dispatch {
        self.expire(now);
        let mut wake = self.deadlines.first().map(|d| d.0);
        let Some(m) = self.members.get(&member) else {
            return Dispatch::Wait(wake);
        };
        if m.in_flight >= m.max_in_flight {
            return Dispatch::Wait(wake);
        }
        // 1. Redeliveries and held-back messages, in offset order.
        let mut blocked_keys: Vec<&str> = Vec::new();
        let mut chosen = None;
        for (&offset, w) in &self.waiting {
            let due = w.not_before.is_none_or(|t| t <= now);
            if !due {
                wake = min_instant(wake, w.not_before);
            }
            match w.message.key.as_deref() {
                None if due => {
                    chosen = Some(offset);
                    break;
                }
                None => {}
                Some(k) => {
                    if blocked_keys.contains(&k) {
                        continue;
                    }
                    if due && self.owner_allows(k, member) {
                        chosen = Some(offset);
                        break;
                    }
                    blocked_keys.push(k);
                }
            }
        }
        if let Some(offset) = chosen {
            let Some(w) = self.waiting.remove(&offset) else {
                return Dispatch::Wait(wake);
            };
            if let Some(k) = &w.message.key {
                if let Some(ks) = self.keys.get_mut(k) {
                    ks.waiting.remove(&offset);
                }
            }
            return self.deliver(member, offset, w.message, w.attempts, now, ack_timeout);
        }
        // 2. New messages from the cursor; those whose key is busy elsewhere are set aside.
        self.cursor = self.cursor.max(base);
        let mut skipped = 0;
        while let Some(message) = log.get((self.cursor - base) as usize) {
            let offset = self.cursor;
            self.cursor += 1;
            let free = match message.key.as_deref() {
                None => true,
                Some(k) => {
                    self.owner_allows(k, member)
                        && self.keys.get(k).is_none_or(|ks| ks.waiting.is_empty())
                }
            };
            if free {
                return self.deliver(member, offset, message.clone(), 0, now, ack_timeout);
            }
            if let Some(k) = &message.key {
                self.keys
                    .entry(k.clone())
                    .or_default()
                    .waiting
                    .insert(offset);
            }
            self.waiting.insert(
                offset,
                Waiting {
                    message: message.clone(),
                    attempts: 0,
                    not_before: None,
                },
            );
            skipped += 1;
            if skipped >= MAX_SKIPPED_PER_DISPATCH {
                break;
            }
        }
        Dispatch::Wait(wake)
    }

    fn deliver(
        &mut self,
        member: u64,
        offset: u64,
        message: Arc<Message>,
        attempts: u32,
        now: Instant,
        ack_timeout: Duration,
    ) -> Dispatch {
        self.next_tag += 1;
        let tag = self.next_tag;
        let deadline = now + ack_timeout;
        if let Some(k) = &message.key {
            if !self.keys.contains_key(k.as_str()) {
                // Owned key strings only for keys not tracked yet (no allocation per delivery).
                self.keys.insert(k.clone(), KeyState::default());
            }
            let ks = self.keys.get_mut(k.as_str()).expect("key inserted above");
            ks.owner = Some(member);
            ks.in_flight += 1;
        }
        if let Some(m) = self.members.get_mut(&member) {
            m.in_flight += 1;
        }
        self.deadlines.insert((deadline, offset));
        let attempt = attempts + 1;
        self.pending.insert(
            offset,
            Pending {
                message: message.clone(),
                member,
                tag,
                deadline,
                attempts: attempt,
            },
        );
        Dispatch::Deliver(Handout {
            message,
            offset,
            tag,
            attempt,
        })
    }

    fn holds(&self, offset: u64, tag: u64) -> bool {
        self.pending.get(&offset).is_some_and(|p| p.tag == tag)
    }

    /// Acks a delivery. A stale ack (the delivery timed out and is waiting for redelivery)
    /// still counts: the message was processed. Returns whether anything changed.
    pub(super) fn ack(&mut self, offset: u64, tag: u64) -> bool {
        if self.holds(offset, tag) {
            self.release(offset);
            return true;
        }
        if let Some(w) = self.waiting.remove(&offset) {
            if let Some(k) = &w.message.key {
                if let Some(ks) = self.keys.get_mut(k) {
                    ks.waiting.remove(&offset);
                    if ks.waiting.is_empty() && ks.in_flight == 0 {
                        self.keys.remove(k);
                    }
                }
            }
            return true;
        }
        false
    }

    /// Hands a held delivery back for redelivery, at once or from `not_before`.
    pub(super) fn nack(&mut self, offset: u64, tag: u64, not_before: Option<Instant>) -> bool {
        self.holds(offset, tag) && self.hand_back(offset, not_before)
    }

    /// Hands a held delivery back as if it had never been handed out: its next delivery
    /// carries the same attempt.
    pub(super) fn hand_back_unseen(&mut self, offset: u64, tag: u64) -> bool {
        if !(self.holds(offset, tag) && self.hand_back(offset, None)) {
            return false;
        }
        if let Some(w) = self.waiting.get_mut(&offset) {
            w.attempts = w.attempts.saturating_sub(1);
        }
        true
    }

    /// Moves the ack deadline of a held delivery to `at`.
    pub(super) fn extend(&mut self, offset: u64, tag: u64, at: Instant) -> bool {
        let Some(p) = self.pending.get_mut(&offset).filter(|p| p.tag == tag) else {
            return false;
        };
        self.deadlines.remove(&(p.deadline, offset));
        p.deadline = at;
        self.deadlines.insert((at, offset));
        true
    }
}
