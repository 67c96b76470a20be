//! What one member holds, without any SQS call: received messages per key (one handed out at
//! a time on FIFO queues), handed-out deliveries and their visibility deadlines, and the count
//! that bounds `max_in_flight`. Unit-tested below; `mod.rs` locks it and makes the SQS calls.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use busbar_core::{Error, Message};

/// A received message, not handed out yet.
pub(super) struct Received {
    pub(super) message: Message,
    pub(super) receipt: String,
    pub(super) attempt: u32,
    pub(super) received_at: Instant,
    /// Its key when messages are handed out one at a time per key (FIFO queues).
    pub(super) key: Option<String>,
    /// Why busbar could not decode it (see [`busbar_core::raw::undecodable`]).
    pub(super) undecodable: Option<String>,
}

struct Handed {
    key: Option<String>,
    receipt: String,
    /// When SQS makes it visible again (unless extended).
    deadline: Instant,
}

/// The member's bookkeeping (behind the subscriber's lock).
#[derive(Default)]
pub(super) struct State {
    /// Received and free to hand out (at most one per key).
    ready: VecDeque<Received>,
    /// Received behind a busy key, in order.
    waiting: HashMap<String, VecDeque<Received>>,
    /// Keys with a message in `ready` or handed out.
    busy: HashSet<String>,
    /// Handed out and not settled.
    handed: HashMap<u64, Handed>,
    /// No handed-out delivery is due before this (it may be earlier than the earliest real
    /// deadline, never later): `expire` scans `handed` only once it has passed.
    next_expiry: Option<Instant>,
    next_token: u64,
    /// Received (or being received) and not settled: bounds `max_in_flight`.
    pub(super) outstanding: usize,
    pub(super) errors: VecDeque<Error>,
    /// Nothing more is received or handed out.
    pub(super) closed: bool,
    /// The held messages were handed back (once).
    pub(super) released: bool,
}

impl State {
    /// Takes a received message in: ready, or waiting behind its busy key.
    pub(super) fn admit(&mut self, r: Received) {
        match r.key.clone() {
            Some(k) if self.busy.contains(&k) => self.waiting.entry(k).or_default().push_back(r),
            Some(k) => {
                self.busy.insert(k);
                self.ready.push_back(r);
            }
            None => self.ready.push_back(r),
        }
    }

    /// Hands the next ready message out: its token, and its deadline (received at +
    /// `visibility`) is watched.
    pub(super) fn hand_out(&mut self, visibility: Duration) -> Option<(Received, u64)> {
        let r = self.ready.pop_front()?;
        let token = self.next_token;
        self.next_token += 1;
        let deadline = r.received_at + visibility;
        self.watch(deadline);
        self.handed.insert(
            token,
            Handed {
                key: r.key.clone(),
                receipt: r.receipt.clone(),
                deadline,
            },
        );
        Some((r, token))
    }

    /// Hands the next ready message out only if it needs no SQS call first: received at most
    /// half its visibility ago (see `still_fresh` in `mod.rs`).
    pub(super) fn hand_out_young(
        &mut self,
        visibility: Duration,
        now: Instant,
    ) -> Option<(Received, u64)> {
        let young = self
            .ready
            .front()
            .is_some_and(|r| now.saturating_duration_since(r.received_at) <= visibility / 2);
        if young {
            self.hand_out(visibility)
        } else {
            None
        }
    }

    /// Whether `token` is handed out and not settled or expired.
    pub(super) fn is_handed(&self, token: u64) -> bool {
        self.handed.contains_key(&token)
    }

    /// Marks a handed-out delivery settled (`None` if it was not handed out). With
    /// `release_key`, the messages waiting behind its key are returned (to be made visible
    /// again) instead of handed out next.
    pub(super) fn settle(&mut self, token: u64, release_key: bool) -> Option<Vec<Received>> {
        let Handed { key, .. } = self.handed.remove(&token)?;
        self.outstanding -= 1;
        Some(match key {
            Some(k) if release_key => self.take_key(&k),
            Some(k) => {
                self.free_key(&k);
                Vec::new()
            }
            None => Vec::new(),
        })
    }

    /// Forgets deliveries past their deadline at `now` (SQS has made them visible again) and
    /// frees their keys. Returns whether any expired, the receipts of the messages that waited
    /// behind those keys (to be made visible again too), and when to look again. Scans only
    /// once the earliest watched deadline has passed.
    pub(super) fn expire(&mut self, now: Instant) -> (bool, Vec<String>, Option<Instant>) {
        if self.next_expiry.is_none_or(|at| now < at) {
            return (false, Vec::new(), self.next_expiry);
        }
        let overdue: Vec<u64> = self
            .handed
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        let mut receipts = Vec::new();
        for token in &overdue {
            if let Some(h) = self.handed.remove(token) {
                self.outstanding -= 1;
                if let Some(k) = h.key {
                    receipts.extend(self.take_key(&k).into_iter().map(|r| r.receipt));
                }
            }
        }
        self.next_expiry = self.handed.values().map(|h| h.deadline).min();
        (!overdue.is_empty(), receipts, self.next_expiry)
    }

    /// Moves the deadline of a handed-out delivery (extended, or its visibility restarted).
    pub(super) fn set_deadline(&mut self, token: u64, deadline: Instant) {
        if let Some(h) = self.handed.get_mut(&token) {
            h.deadline = deadline;
            // A deadline may also move earlier (extended by less than what was left).
            self.watch(deadline);
        }
    }

    /// Closes: returns the receipts of everything held (handed out, ready, waiting), once.
    pub(super) fn close_and_drain(&mut self) -> Option<Vec<String>> {
        self.closed = true;
        if self.released {
            return None;
        }
        self.released = true;
        let mut receipts: Vec<String> = self.handed.drain().map(|(_, h)| h.receipt).collect();
        receipts.extend(self.ready.drain(..).map(|r| r.receipt));
        receipts.extend(self.waiting.drain().flat_map(|(_, q)| q).map(|r| r.receipt));
        self.busy.clear();
        self.outstanding = 0;
        Some(receipts)
    }

    fn watch(&mut self, deadline: Instant) {
        self.next_expiry = Some(self.next_expiry.map_or(deadline, |at| at.min(deadline)));
    }

    /// The key's next waiting message becomes ready, or the key is free.
    fn free_key(&mut self, key: &str) {
        if let Some(queue) = self.waiting.get_mut(key) {
            if let Some(r) = queue.pop_front() {
                if queue.is_empty() {
                    self.waiting.remove(key);
                }
                self.ready.push_back(r);
                return;
            }
        }
        self.busy.remove(key);
    }

    /// Takes every message still waiting behind `key` and frees it.
    fn take_key(&mut self, key: &str) -> Vec<Received> {
        self.busy.remove(key);
        let rest: Vec<Received> = self.waiting.remove(key).into_iter().flatten().collect();
        self.outstanding -= rest.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VISIBILITY: Duration = Duration::from_secs(5);

    fn received(state: &mut State, receipt: &str, key: Option<&str>, at: Instant) {
        state.outstanding += 1;
        state.admit(Received {
            message: Message::new(receipt.to_owned()),
            receipt: receipt.to_owned(),
            attempt: 1,
            received_at: at,
            key: key.map(str::to_owned),
            undecodable: None,
        });
    }

    fn receipts(rs: Vec<Received>) -> Vec<String> {
        rs.into_iter().map(|r| r.receipt).collect()
    }

    #[test]
    fn one_message_per_key_is_handed_out_at_a_time_in_order() {
        let (mut st, now) = (State::default(), Instant::now());
        for (r, k) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")] {
            received(&mut st, r, Some(k), now);
        }
        let (a1, t1) = st.hand_out(VISIBILITY).expect("a1");
        let (b1, t2) = st.hand_out(VISIBILITY).expect("b1");
        assert_eq!((a1.receipt.as_str(), b1.receipt.as_str()), ("a1", "b1"));
        assert!(st.hand_out(VISIBILITY).is_none(), "a2 waits behind a1");
        assert_eq!(st.settle(t1, false).map(receipts), Some(vec![]));
        let (a2, _) = st.hand_out(VISIBILITY).expect("a2 after a1 settled");
        assert_eq!(a2.receipt, "a2");
        assert!(st.hand_out(VISIBILITY).is_none(), "a3 waits behind a2");
        st.settle(t2, false);
        assert_eq!(st.outstanding, 2);
    }

    #[test]
    fn only_young_messages_join_a_batch_without_a_call() {
        let (mut st, now) = (State::default(), Instant::now());
        received(&mut st, "young", None, now);
        received(
            &mut st,
            "old",
            None,
            now - VISIBILITY / 2 - Duration::from_millis(1),
        );
        received(&mut st, "after", None, now);
        let (young, _) = st.hand_out_young(VISIBILITY, now).expect("young");
        assert_eq!(young.receipt, "young");
        assert!(
            st.hand_out_young(VISIBILITY, now).is_none(),
            "past half its visibility: needs a visibility call first"
        );
        let (old, _) = st.hand_out(VISIBILITY).expect("through the awaited path");
        assert_eq!(old.receipt, "old");
        assert!(st.hand_out_young(VISIBILITY, now).is_some());
    }

    #[test]
    fn messages_without_a_key_are_never_held_back() {
        let (mut st, now) = (State::default(), Instant::now());
        received(&mut st, "x", None, now);
        received(&mut st, "y", None, now);
        assert!(st.hand_out(VISIBILITY).is_some());
        assert!(st.hand_out(VISIBILITY).is_some());
    }

    #[test]
    fn a_released_key_gives_back_what_waited_behind_it() {
        let (mut st, now) = (State::default(), Instant::now());
        for r in ["k1", "k2", "k3"] {
            received(&mut st, r, Some("k"), now);
        }
        let (_, token) = st.hand_out(VISIBILITY).expect("k1");
        assert_eq!(
            st.settle(token, true).map(receipts),
            Some(vec!["k2".to_owned(), "k3".to_owned()])
        );
        assert_eq!(st.outstanding, 0);
        assert!(st.settle(token, true).is_none(), "settled once only");
        // The key is free: a fresh copy received next is handed out at once.
        received(&mut st, "k1-again", Some("k"), now);
        assert!(st.hand_out(VISIBILITY).is_some());
    }

    #[test]
    fn an_expired_delivery_frees_its_key_and_returns_the_waiting_receipts() {
        let (mut st, now) = (State::default(), Instant::now());
        received(&mut st, "k1", Some("k"), now);
        received(&mut st, "k2", Some("k"), now);
        received(&mut st, "o1", Some("o"), now + Duration::from_secs(3));
        let (_, t1) = st.hand_out(VISIBILITY).expect("k1");
        let (_, t2) = st.hand_out(VISIBILITY).expect("o1");
        let (expired, rs, next) = st.expire(now + Duration::from_secs(1));
        assert!(!expired && rs.is_empty());
        assert_eq!(next, Some(now + VISIBILITY));
        let (expired, rs, next) = st.expire(now + VISIBILITY);
        assert!(expired);
        assert_eq!(rs, vec!["k2".to_owned()]);
        assert_eq!(next, Some(now + Duration::from_secs(8)));
        assert!(!st.is_handed(t1) && st.is_handed(t2));
        assert_eq!(st.outstanding, 1);
        assert!(
            st.settle(t1, false).is_none(),
            "an expired delivery cannot be settled"
        );
    }

    #[test]
    fn an_extended_deadline_is_watched_even_when_earlier() {
        let (mut st, now) = (State::default(), Instant::now());
        received(&mut st, "a", Some("a"), now);
        let (_, token) = st.hand_out(VISIBILITY).expect("a");
        st.set_deadline(token, now + Duration::from_secs(1));
        let (expired, _, _) = st.expire(now + Duration::from_secs(2));
        assert!(expired, "the earlier deadline was not watched");
    }

    #[test]
    fn closing_drains_everything_once() {
        let (mut st, now) = (State::default(), Instant::now());
        for (r, k) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
            received(&mut st, r, Some(k), now);
        }
        st.hand_out(VISIBILITY);
        let mut all = st.close_and_drain().expect("first close");
        all.sort();
        assert_eq!(all, vec!["a1", "a2", "b1"]);
        assert_eq!(st.outstanding, 0);
        assert!(st.closed && st.close_and_drain().is_none());
        assert!(st.hand_out(VISIBILITY).is_none());
    }
}
