//! The Redis side of partition ownership: the lease store core's engine drives (the group's
//! members sorted set and a compare-and-set lease per partition, in the Lua scripts of
//! [`crate::scripts`], on Redis's clock), and what taking, stopping and giving up a partition
//! means here. The rules themselves are `busbar_core::raw::ownership`'s.

use busbar_core::raw::ownership::{Activity, Lease, LeaseStore, Partitions};

use super::*;
use crate::scripts::{LEASE_READ, LEASE_RELEASE, LEASE_RENEW, LEASE_TAKE, MEMBERS};

impl SubShared {
    pub(super) fn lease_key(&self, p: u32) -> String {
        format!(
            "{}{p}",
            self.inner
                .config
                .lease_prefix(&self.topic, &self.options.group)
        )
    }

    pub(super) fn members_key(&self) -> String {
        self.inner
            .config
            .members_key(&self.topic, &self.options.group)
    }

    pub(super) fn generation_key(&self) -> String {
        self.inner
            .config
            .generation_key(&self.topic, &self.options.group)
    }

    /// The group's membership generation (0 when unset).
    pub(super) async fn generation(&self) -> Result<i64> {
        redis::cmd("GET")
            .arg(self.generation_key())
            .query_async::<Option<i64>>(&mut self.conn())
            .await
            .map(Option::unwrap_or_default)
            .map_err(|e| map(e, "reading the group generation"))
    }

    pub(super) fn lease_ttl(&self) -> Duration {
        self.inner.config.lease_ttl
    }

    /// Heartbeat and rebalance: one round of core's ownership engine. Returns whether the
    /// next one should come soon (a hand-over is under way on either side).
    pub(super) async fn heartbeat(self: &Arc<Self>) -> Result<bool> {
        self.ownership
            .round(self.as_ref(), &Member(self.clone()))
            .await
    }

    /// The three keys of partition `p`'s lease: owner, revision, how it was last given up.
    fn lease_keys(&self, p: u32) -> [String; 3] {
        let lease = self.lease_key(p);
        [format!("{lease}:rev"), format!("{lease}:after"), lease]
    }

    fn ttl_ms(&self) -> u64 {
        self.lease_ttl().as_millis() as u64
    }

    /// Runs a lease script on partition `p`'s keys with `args`.
    async fn lease_call<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        p: u32,
        args: &[String],
        what: &str,
    ) -> Result<T> {
        let [rev, after, lease] = self.lease_keys(p);
        let mut inv = script.prepare_invoke();
        inv.key(lease).key(rev).key(after);
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut self.conn())
            .await
            .map_err(|e| map(e, what))
    }
}

#[async_trait]
impl LeaseStore for SubShared {
    type Revision = i64;

    async fn members(&self, me: &str, leave: bool) -> Result<Vec<String>> {
        MEMBERS
            .key(self.members_key())
            .key(self.generation_key())
            .arg(me)
            .arg(self.ttl_ms())
            .arg(u8::from(leave))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| map(e, "updating the group members"))
    }

    async fn read(&self, partition: u32) -> Result<Lease<i64>> {
        let (owner, revision, after): (String, i64, String) = self
            .lease_call(&LEASE_READ, partition, &[], "reading a partition lease")
            .await?;
        Ok(if !owner.is_empty() {
            Lease::Held { owner }
        } else {
            Lease::Free {
                after: if after == "clean" {
                    HandOver::Clean
                } else {
                    HandOver::Hold
                },
                revision,
            }
        })
    }

    async fn take(&self, partition: u32, me: &str, revision: &i64) -> Result<Option<i64>> {
        let args = [
            me.to_owned(),
            revision.to_string(),
            self.ttl_ms().to_string(),
        ];
        let rev: i64 = self
            .lease_call(&LEASE_TAKE, partition, &args, "taking a partition lease")
            .await?;
        Ok((rev >= 0).then_some(rev))
    }

    async fn renew(&self, partition: u32, me: &str, revision: &i64) -> Result<Option<i64>> {
        let args = [
            me.to_owned(),
            revision.to_string(),
            self.ttl_ms().to_string(),
        ];
        let rev: i64 = self
            .lease_call(&LEASE_RENEW, partition, &args, "renewing a partition lease")
            .await?;
        Ok((rev >= 0).then_some(rev))
    }

    async fn release(&self, partition: u32, revision: &i64, how: HandOver) -> Result<()> {
        let how = match how {
            HandOver::Clean => "clean",
            HandOver::Hold => "hold",
        };
        let args = [
            revision.to_string(),
            how.to_owned(),
            self.ttl_ms().to_string(),
        ];
        self.lease_call::<i64>(
            &LEASE_RELEASE,
            partition,
            &args,
            "releasing a partition lease",
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
        Activity {
            in_flight: st.inflight_in(partition),
            reading: st.reading.contains(&partition),
            // Recovery (XPENDING + XCLAIM) finishes inside `start`.
            recovering: false,
        }
    }

    /// Recovers what is pending in the partition (XPENDING + XCLAIM, in ID order, before any
    /// new entry), whatever `after` says: the previous owner's unsettled deliveries are
    /// claimed at once, so Redis has no hold to wait out.
    async fn start(&self, partition: u32, _after: HandOver) -> Result<()> {
        let recovered = self.0.recover(partition).await?;
        let count = recovered.len();
        self.0.lock().parts.insert(
            partition,
            Part {
                buffer: recovered.into(),
                draining: false,
            },
        );
        tracing::debug!(topic = %self.0.topic, partition, recovered = count, "redis: partition acquired");
        self.0.wake.notify_waiters();
        Ok(())
    }

    /// Stops reading and handing out; buffered entries stay pending in Redis for the next
    /// owner (no handler saw them: recounted when the partition is given up).
    fn stop(&self, partition: u32) {
        let mut st = self.0.lock();
        let buffered: Vec<Entry> = match st.parts.get_mut(&partition) {
            Some(part) => {
                part.draining = true;
                part.buffer.drain(..).collect()
            }
            None => Vec::new(),
        };
        st.unseen.extend(buffered);
    }

    async fn give_up(&self, partition: u32, _how: HandOver) {
        let unseen: Vec<Entry> = {
            let mut st = self.0.lock();
            let mut unseen: Vec<Entry> = st
                .unseen
                .iter()
                .filter(|e| e.partition == partition)
                .cloned()
                .collect();
            unseen.extend(st.take_retries(partition));
            st.drop_partition(partition);
            unseen
        };
        self.0.recount(unseen).await;
    }

    fn lost(&self, partition: u32) {
        self.0.lock().drop_partition(partition);
    }
}
