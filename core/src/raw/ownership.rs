//! Partition ownership, for backends whose broker does not share a topic's partitions among a
//! group's members itself (NATS JetStream, Redis Streams, RabbitMQ): the rules, written once
//! and tested without a broker.
//!
//! A backend gives two things: a [`LeaseStore`] (compare-and-set leases and the list of live
//! members, on its broker) and a [`Partitions`] (what it is doing with each partition it owns,
//! and how to start, stop and give one up). Every heartbeat it calls [`Ownership::round`];
//! between heartbeats it asks [`Ownership::serving`] before handing out from a partition.
//!
//! The rules:
//! - **Balance.** The live members, sorted, share the partitions round-robin: partition `p`
//!   belongs to member `p % n` ([`share`]).
//! - **Lease validity.** A lease renewed at `t` is trusted until `t + ttl * 2/3`: a member whose
//!   heartbeat stalls stops handing out before another can take its partitions.
//! - **Drain, then release.** A partition no longer wanted stops handing out at once and is
//!   released when no delivery is in flight and no read is in progress (a read started earlier
//!   would bring entries that become this member's after the next owner recovered the
//!   partition): a [`HandOver::Clean`] hand-over, the next owner starts at once.
//! - **Stuck.** A drain that has not finished within the stuck limit is released anyway with
//!   [`HandOver::Hold`]: the next owner first waits for the broker to bring back what is still
//!   out, so nothing newer overtakes it.
//! - **Recovering.** A partition still waiting for what its previous owner left is handed over
//!   with a hold too (that wait is not over for the next owner either).
//! - **Crash.** A lease that expired (its owner stopped heartbeating) or never existed is taken
//!   as after a hold.
//! - **Back while draining.** A partition wanted again while it drains finishes its hand-over
//!   first and is taken again later: what was buffered is gone, and taking it anew recovers
//!   it in order.
//! - **Lost.** A renewal refused by the store (another member took the lease after it expired)
//!   drops the partition at once, without a hand-over.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::time::{Duration, Instant};

use crate::error::Result;

/// How a partition's previous owner gave it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// Nothing it delivered is still out: the next owner may start at once.
    Clean,
    /// Deliveries may still be out (or the owner crashed): the next owner first waits for the
    /// broker to bring them back.
    Hold,
}

/// A partition's lease, as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease<R> {
    /// Held by a live member.
    Held {
        /// The holder's member id.
        owner: String,
    },
    /// Free to take at `revision`: released as `after` says, or expired / never taken
    /// ([`HandOver::Hold`]).
    Free {
        /// How it was given up.
        after: HandOver,
        /// The revision a take must expect.
        revision: R,
    },
}

/// Leases and live members, kept on the broker by the backend. Every write is a
/// compare-and-set on the revision last read or written.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// A lease's version (a stream sequence, a counter, ...).
    type Revision: Clone + Send + Sync + std::fmt::Debug;

    /// Records member `me` as live (or, with `leave`, as gone) and returns the live members.
    async fn members(&self, me: &str, leave: bool) -> Result<Vec<String>>;

    /// The lease of `partition`.
    async fn read(&self, partition: u32) -> Result<Lease<Self::Revision>>;

    /// Takes the lease of `partition` for `me` if it is still at `revision`; `None` when
    /// another write came first.
    async fn take(
        &self,
        partition: u32,
        me: &str,
        revision: &Self::Revision,
    ) -> Result<Option<Self::Revision>>;

    /// Renews `me`'s lease of `partition` at `revision`; `None` when it was lost.
    async fn renew(
        &self,
        partition: u32,
        me: &str,
        revision: &Self::Revision,
    ) -> Result<Option<Self::Revision>>;

    /// Gives the lease of `partition` up, saying how.
    async fn release(&self, partition: u32, revision: &Self::Revision, how: HandOver)
        -> Result<()>;
}

/// What a member is doing with a partition it owns, when a round decides about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Deliveries handed out and not settled.
    pub in_flight: usize,
    /// A read (or fetch) from the broker is in progress, or fetched entries are not yet
    /// taken in.
    pub reading: bool,
    /// Still waiting for (or fetching) what the previous owner left.
    pub recovering: bool,
}

/// The member's side of the partitions it owns: called by [`Ownership::round`].
#[async_trait]
pub trait Partitions: Send + Sync {
    /// What is going on in `partition` now.
    fn activity(&self, partition: u32) -> Activity;

    /// `partition` was taken: start reading it. `after` says how its previous owner left it
    /// ([`HandOver::Hold`]: wait for what it left out before anything newer).
    async fn start(&self, partition: u32, after: HandOver) -> Result<()>;

    /// `partition` is being handed over: hand out nothing more from it, stop reading.
    fn stop(&self, partition: u32);

    /// `partition` is given up `how`: settle with the broker what must be settled before the
    /// next owner takes it, and forget it. The lease is released after this returns.
    async fn give_up(&self, partition: u32, how: HandOver);

    /// The lease of `partition` was lost: forget it at once.
    fn lost(&self, partition: u32);
}

/// The partitions `me` should own among `members`: `p` goes to the member at `p % n` of the
/// sorted list. None when `me` is not a member.
pub fn share(members: &[String], me: &str, partitions: u32) -> Vec<u32> {
    let mut live: Vec<&str> = members.iter().map(String::as_str).collect();
    live.sort_unstable();
    live.dedup();
    let Some(index) = live.iter().position(|m| *m == me) else {
        return Vec::new();
    };
    let n = live.len() as u64;
    (0..partitions)
        .filter(|p| u64::from(*p) % n == index as u64)
        .collect()
}

/// Until when a lease renewed by a call started at `renewed_at` is trusted (two thirds of
/// its TTL: a member whose heartbeat stalls stops handing out before another can take over).
pub fn trusted_until(renewed_at: Instant, ttl: Duration) -> Instant {
    renewed_at + ttl * 2 / 3
}

/// Whether a draining partition may be released now, and how (see the module docs).
pub fn verdict(
    activity: Activity,
    draining_for: Duration,
    stuck_after: Duration,
) -> Option<HandOver> {
    let stuck = draining_for >= stuck_after;
    if activity.reading {
        return stuck.then_some(HandOver::Hold);
    }
    if activity.recovering {
        return Some(HandOver::Hold);
    }
    if activity.in_flight == 0 {
        return Some(HandOver::Clean);
    }
    stuck.then_some(HandOver::Hold)
}

#[derive(Debug)]
struct Owned<R> {
    revision: R,
    valid_until: Instant,
    draining_since: Option<Instant>,
}

/// One member's partition ownership (see the module docs).
#[derive(Debug)]
pub struct Ownership<R> {
    me: String,
    partitions: u32,
    lease_ttl: Duration,
    stuck_after: Duration,
    owned: Mutex<BTreeMap<u32, Owned<R>>>,
    /// One round at a time.
    round: tokio::sync::Mutex<()>,
}

impl<R: Clone + Send + Sync + std::fmt::Debug> Ownership<R> {
    /// Member `me` of a group sharing `partitions`, with leases of `lease_ttl`; a drain
    /// longer than `stuck_after` is handed over with a hold.
    pub fn new(
        me: impl Into<String>,
        partitions: u32,
        lease_ttl: Duration,
        stuck_after: Duration,
    ) -> Self {
        Self {
            me: me.into(),
            partitions,
            lease_ttl,
            stuck_after,
            owned: Mutex::new(BTreeMap::new()),
            round: tokio::sync::Mutex::new(()),
        }
    }

    /// This member's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Owned<R>>> {
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether deliveries may be handed out from `partition` now: owned, not draining, and
    /// its lease still trusted.
    pub fn serving(&self, partition: u32, now: Instant) -> bool {
        self.lock()
            .get(&partition)
            .is_some_and(|o| o.draining_since.is_none() && o.valid_until > now)
    }

    /// Whether `partition` is owned and being handed over.
    pub fn draining(&self, partition: u32) -> bool {
        self.lock()
            .get(&partition)
            .is_some_and(|o| o.draining_since.is_some())
    }

    /// Starts handing `partition` over outside a round (the member found its lease lapsed
    /// while reading, say); the next rounds release it once drained, and take it again if it
    /// is still wanted. Returns whether the hand-over started now.
    pub fn drain(&self, partition: u32) -> bool {
        let mut st = self.lock();
        match st.get_mut(&partition) {
            Some(o) if o.draining_since.is_none() => {
                o.draining_since = Some(Instant::now());
                true
            }
            _ => false,
        }
    }

    /// The partitions owned (serving or draining).
    pub fn owned(&self) -> Vec<u32> {
        self.lock().keys().copied().collect()
    }

    /// One heartbeat: records this member as live, renews its leases, hands over what it no
    /// longer should own (once drained) and takes what it should. Returns whether the next
    /// round should come soon (a hand-over is under way on either side).
    pub async fn round<S>(&self, store: &S, parts: &dyn Partitions) -> Result<bool>
    where
        S: LeaseStore<Revision = R> + ?Sized,
    {
        let _one = self.round.lock().await;
        let started = Instant::now();
        let members = store.members(&self.me, false).await?;
        let wanted = share(&members, &self.me, self.partitions);
        let valid_until = trusted_until(started, self.lease_ttl);
        let mut soon = false;

        let owned: Vec<(u32, R)> = self
            .lock()
            .iter()
            .map(|(p, o)| (*p, o.revision.clone()))
            .collect();
        for (p, revision) in owned {
            let Some(revision) = store.renew(p, &self.me, &revision).await? else {
                tracing::warn!(member = %self.me, partition = p, "partition lease lost; no longer delivering from it");
                self.lock().remove(&p);
                parts.lost(p);
                soon = true;
                continue;
            };
            let now = Instant::now();
            let (stop, since) = {
                let mut st = self.lock();
                let Some(o) = st.get_mut(&p) else { continue };
                o.revision = revision.clone();
                o.valid_until = valid_until;
                let stop = o.draining_since.is_none() && !wanted.contains(&p);
                if stop {
                    o.draining_since = Some(now);
                }
                (stop, o.draining_since)
            };
            if stop {
                parts.stop(p);
            }
            let Some(since) = since else { continue };
            soon = true;
            let Some(how) = verdict(parts.activity(p), now - since, self.stuck_after) else {
                continue;
            };
            if how == HandOver::Hold && parts.activity(p).in_flight > 0 {
                tracing::warn!(member = %self.me, partition = p, "handing a partition over with deliveries unsettled; the next owner waits for them");
            }
            self.lock().remove(&p);
            parts.give_up(p, how).await;
            if let Err(e) = store.release(p, &revision, how).await {
                tracing::debug!(member = %self.me, partition = p, error = %e, "releasing a lease failed; it expires by itself");
            }
            tracing::debug!(member = %self.me, partition = p, ?how, "partition handed over");
        }

        for p in wanted {
            if self.lock().contains_key(&p) {
                continue;
            }
            let (after, revision) = match store.read(p).await? {
                Lease::Held { .. } => {
                    soon = true; // still held by its previous owner
                    continue;
                }
                Lease::Free { after, revision } => (after, revision),
            };
            let Some(revision) = store.take(p, &self.me, &revision).await? else {
                soon = true;
                continue;
            };
            self.lock().insert(
                p,
                Owned {
                    revision: revision.clone(),
                    valid_until,
                    draining_since: None,
                },
            );
            soon = true;
            if let Err(e) = parts.start(p, after).await {
                self.lock().remove(&p);
                // What the previous owner left is still owed to the next one.
                let _ = store.release(p, &revision, HandOver::Hold).await;
                return Err(e);
            }
            tracing::debug!(member = %self.me, partition = p, ?after, "partition taken");
        }
        Ok(soon)
    }

    /// Leaves the group: every partition still owned is given up as `how` says (the backend
    /// has settled what it could), then the member leaves the member list.
    pub async fn leave<S>(&self, store: &S, how: impl Fn(u32) -> HandOver + Send) -> Result<()>
    where
        S: LeaseStore<Revision = R> + ?Sized,
    {
        let _one = self.round.lock().await;
        let owned: Vec<(u32, R)> = std::mem::take(&mut *self.lock())
            .into_iter()
            .map(|(p, o)| (p, o.revision))
            .collect();
        for (p, revision) in owned {
            if let Err(e) = store.release(p, &revision, how(p)).await {
                tracing::debug!(member = %self.me, partition = p, error = %e, "releasing a lease failed; it expires by itself");
            }
        }
        store.members(&self.me, true).await.map(|_| ())
    }
}

/// A [`LeaseStore`] in memory, with leases and members expiring on tokio's clock: for tests
/// of the rules (with `tokio::time::pause`) and for backends without a broker.
#[derive(Debug)]
pub struct MemoryLeaseStore {
    ttl: Duration,
    inner: Mutex<MemoryLeases>,
}

#[derive(Debug, Default)]
struct MemoryLeases {
    members: BTreeMap<String, Instant>,
    /// Partition → its revision and state.
    leases: BTreeMap<u32, (u64, MemoryLease)>,
    revision: u64,
}

impl MemoryLeases {
    /// Writes `lease` under a new revision and returns the revision.
    fn write(&mut self, partition: u32, lease: MemoryLease) -> u64 {
        self.revision += 1;
        self.leases.insert(partition, (self.revision, lease));
        self.revision
    }
}

#[derive(Debug)]
enum MemoryLease {
    Held { owner: String, until: Instant },
    Released(HandOver),
}

impl MemoryLeaseStore {
    /// Leases and member entries that expire `ttl` after their last write.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(MemoryLeases::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryLeases> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live holder of `partition`'s lease, if any.
    pub fn holder(&self, partition: u32) -> Option<String> {
        let now = Instant::now();
        match self.lock().leases.get(&partition) {
            Some((_, MemoryLease::Held { owner, until })) if *until > now => Some(owner.clone()),
            _ => None,
        }
    }
}

#[async_trait]
impl LeaseStore for MemoryLeaseStore {
    type Revision = u64;

    async fn members(&self, me: &str, leave: bool) -> Result<Vec<String>> {
        let now = Instant::now();
        let mut st = self.lock();
        st.members.retain(|_, until| *until > now);
        if leave {
            st.members.remove(me);
        } else {
            st.members.insert(me.to_owned(), now + self.ttl);
        }
        Ok(st.members.keys().cloned().collect())
    }

    async fn read(&self, partition: u32) -> Result<Lease<u64>> {
        let now = Instant::now();
        Ok(match self.lock().leases.get(&partition) {
            Some((_, MemoryLease::Held { owner, until })) if *until > now => Lease::Held {
                owner: owner.clone(),
            },
            // Expired: its owner crashed.
            Some((revision, MemoryLease::Held { .. })) => Lease::Free {
                after: HandOver::Hold,
                revision: *revision,
            },
            Some((revision, MemoryLease::Released(how))) => Lease::Free {
                after: *how,
                revision: *revision,
            },
            None => Lease::Free {
                after: HandOver::Hold,
                revision: 0,
            },
        })
    }

    async fn take(&self, partition: u32, me: &str, revision: &u64) -> Result<Option<u64>> {
        let now = Instant::now();
        let mut st = self.lock();
        let current = st.leases.get(&partition).map_or(0, |(r, _)| *r);
        if current != *revision {
            return Ok(None);
        }
        let held = MemoryLease::Held {
            owner: me.to_owned(),
            until: now + self.ttl,
        };
        Ok(Some(st.write(partition, held)))
    }

    async fn renew(&self, partition: u32, me: &str, revision: &u64) -> Result<Option<u64>> {
        let now = Instant::now();
        let mut st = self.lock();
        match st.leases.get(&partition) {
            Some((r, MemoryLease::Held { owner, .. })) if r == revision && owner == me => {}
            _ => return Ok(None),
        }
        let held = MemoryLease::Held {
            owner: me.to_owned(),
            until: now + self.ttl,
        };
        Ok(Some(st.write(partition, held)))
    }

    async fn release(&self, partition: u32, revision: &u64, how: HandOver) -> Result<()> {
        let mut st = self.lock();
        if st
            .leases
            .get(&partition)
            .is_some_and(|(r, _)| r == revision)
        {
            st.write(partition, MemoryLease::Released(how));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "ownership_tests.rs"]
mod tests;
