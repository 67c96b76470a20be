//! The NATS side of partition ownership: the lease store core's engine drives (a
//! compare-and-set key per partition and the group's member map, in the lease stream of
//! [`crate::leases`]), and what taking, stopping and giving up a partition means here. The
//! rules themselves are `busbar_core::raw::ownership`'s.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::raw::ownership::{Activity, HandOver, Lease, LeaseStore, Partitions};
use busbar_core::{Error, ErrorKind, Result};
use bytes::Bytes;

use super::{fastrand_ms, now_ms, SubShared};
use crate::BACKEND;

/// Lease value written by a clean hand-over: nothing the partition delivered is left
/// unacked and unscheduled, so the next owner may start at once.
const RELEASED_CLEAN: &[u8] = b"";
/// Lease value written when deliveries were still unsettled at hand-over: the next owner
/// waits one ack wait, so JetStream redelivers them before anything newer.
const RELEASED_HOLD: &[u8] = b"-hold-";

impl SubShared {
    /// Adds or refreshes this member (or removes it with `leave`) in the group's member map,
    /// dropping expired members; returns the live members, sorted, and the entry revision.
    pub(super) async fn update_members(&self, leave: bool) -> Result<(Vec<String>, u64)> {
        let kv = self.inner.leases().await?;
        let key = self.members_key();
        let ttl = self.inner.config.lease_ttl.as_millis() as u64;
        for _ in 0..20 {
            let current = kv.get(&key).await?;
            let mut members: BTreeMap<String, u64> =
                serde_json::from_slice(&current.value).unwrap_or_default();
            let now = now_ms();
            members.retain(|_, expiry| *expiry > now);
            if leave {
                members.remove(&self.member);
            } else {
                members.insert(self.member.clone(), now + ttl);
            }
            let value = Bytes::from(serde_json::to_vec(&members).unwrap_or_default());
            if let Some(seq) = kv.put_if(&key, value, current.seq).await? {
                return Ok((members.into_keys().collect(), seq));
            }
            // Another member wrote in between: read again.
            tokio::time::sleep(Duration::from_millis(fastrand_ms())).await;
        }
        Err(Error::new(
            ErrorKind::Timeout,
            "could not update the group members after 20 attempts",
        )
        .with_backend(BACKEND))
    }
}

#[async_trait]
impl LeaseStore for SubShared {
    type Revision = u64;

    async fn members(&self, _me: &str, leave: bool) -> Result<Vec<String>> {
        Ok(self.update_members(leave).await?.0)
    }

    async fn read(&self, partition: u32) -> Result<Lease<u64>> {
        let current = self
            .inner
            .leases()
            .await?
            .get(&self.lease_key(partition))
            .await?;
        let value = current.value.as_ref();
        Ok(if current.seq > 0 && value == RELEASED_CLEAN {
            Lease::Free {
                after: HandOver::Clean,
                revision: current.seq,
            }
        } else if value.is_empty() || value == RELEASED_HOLD {
            // Released with a hold, or expired / never written (its owner crashed).
            Lease::Free {
                after: HandOver::Hold,
                revision: current.seq,
            }
        } else {
            Lease::Held {
                owner: String::from_utf8_lossy(value).into_owned(),
            }
        })
    }

    async fn take(&self, partition: u32, me: &str, revision: &u64) -> Result<Option<u64>> {
        let kv = self.inner.leases().await?;
        kv.put_if(
            &self.lease_key(partition),
            Bytes::from(me.to_owned()),
            *revision,
        )
        .await
    }

    async fn renew(&self, partition: u32, me: &str, revision: &u64) -> Result<Option<u64>> {
        self.take(partition, me, revision).await
    }

    async fn release(&self, partition: u32, revision: &u64, how: HandOver) -> Result<()> {
        let value = match how {
            HandOver::Clean => RELEASED_CLEAN,
            HandOver::Hold => RELEASED_HOLD,
        };
        let kv = self.inner.leases().await?;
        kv.put_if(
            &self.lease_key(partition),
            Bytes::from_static(value),
            *revision,
        )
        .await
        .map(|_| ())
    }
}

/// The member's partitions, as core's ownership engine sees them.
pub(super) struct Member(pub(super) Arc<SubShared>);

#[async_trait]
impl Partitions for Member {
    fn activity(&self, partition: u32) -> Activity {
        let st = self.0.lock();
        let in_flight = st.inflight_in(partition);
        let Some(part) = st.parts.get(&partition) else {
            return Activity::default();
        };
        Activity {
            in_flight,
            // The puller's last pull may still forward messages.
            reading: !part.puller_done.load(AtomicOrdering::Acquire)
                || part.queued.load(AtomicOrdering::Acquire) > 0,
            recovering: part.recovering.load(AtomicOrdering::Acquire),
        }
    }

    async fn start(&self, partition: u32, after: HandOver) -> Result<()> {
        self.0.acquire(partition, after == HandOver::Hold).await
    }

    fn stop(&self, partition: u32) {
        self.0.lock().drain(partition);
    }

    async fn give_up(&self, partition: u32, how: HandOver) {
        self.0.give_up(partition, how).await;
    }

    fn lost(&self, partition: u32) {
        self.0.lock().parts.remove(&partition);
    }
}
