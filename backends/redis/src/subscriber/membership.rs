//! The member's side of the group: its heartbeat, which renews its partition leases and takes
//! and hands over partitions in one Lua script (`REBALANCE`; the hand-over verdict is core's
//! ownership rule), and leaving.

use super::*;

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

    /// Heartbeat + rebalance. Returns whether the next one should come soon (a partition we
    /// should own is still held by another member, or one was just taken).
    pub(super) async fn heartbeat(&self) -> Result<bool> {
        let started = Instant::now();
        let ttl = self.lease_ttl();
        let statuses: Vec<String> = REBALANCE
            .key(self.members_key())
            .key(self.generation_key())
            .arg(&self.member)
            .arg(ttl.as_millis() as u64)
            .arg(self.partitions)
            .arg(
                self.inner
                    .config
                    .lease_prefix(&self.topic, &self.options.group),
            )
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| map(e, "renewing partition leases"))?;
        let valid_until = ownership::trusted_until(started, ttl);
        let Verdicts {
            acquired,
            to_release,
            unseen,
            soon,
        } = self.judge(&statuses, valid_until);
        self.recount(unseen).await;
        for p in &acquired {
            let recovered = self.recover(*p).await?;
            let count = recovered.len();
            let mut st = self.lock();
            st.parts.insert(
                *p,
                Part {
                    buffer: recovered.into(),
                    lease_valid_until: valid_until,
                    draining_since: None,
                },
            );
            tracing::debug!(topic = %self.topic, partition = p, recovered = count, "redis: partition acquired");
        }
        if !to_release.is_empty() {
            self.release(&to_release, false).await?;
            let mut st = self.lock();
            for p in &to_release {
                st.drop_partition(*p);
            }
        }
        if !acquired.is_empty() {
            self.wake.notify_waiters();
        }
        Ok(soon || !acquired.is_empty())
    }

    /// What the leases script said about each partition, applied to the member's state:
    /// leases renewed, partitions to take, to release (drained, or lost), entries to recount.
    fn judge(&self, statuses: &[String], valid_until: Instant) -> Verdicts {
        let mut v = Verdicts::default();
        let mut st = self.lock();
        let now = Instant::now();
        for (p, status) in statuses.iter().enumerate() {
            let p = p as u32;
            let local = st.parts.contains_key(&p);
            match (status.as_str(), local) {
                ("own" | "acquired", true)
                    if st
                        .parts
                        .get(&p)
                        .is_some_and(|part| part.draining_since.is_none()) =>
                {
                    if let Some(part) = st.parts.get_mut(&p) {
                        part.lease_valid_until = valid_until;
                    }
                }
                ("own" | "acquired", false) => v.acquired.push(p),
                // A partition being handed over finishes its hand-over even if it is
                // assigned back to us meanwhile: its buffer was dropped, so it must be
                // released and acquired again, which recovers its pending entries in order.
                ("release" | "own" | "acquired", true) => {
                    let drain = st.parts.get_mut(&p).and_then(|part| {
                        part.lease_valid_until = valid_until;
                        if part.draining_since.is_none() {
                            part.draining_since = Some(now);
                            // Buffered entries stay pending in Redis; the next owner
                            // recovers them (no handler saw them: recounted below).
                            v.unseen.extend(part.buffer.drain(..));
                        }
                        part.draining_since
                    });
                    v.unseen.extend(st.take_retries(p));
                    // The next owner recovers what is pending in ID order either way:
                    // any verdict releases (Redis has no hold to pass on).
                    let activity = Activity {
                        in_flight: st.inflight_in(p),
                        reading: st.reading.contains(&p),
                        recovering: false,
                    };
                    let draining_for = drain.map_or(Duration::ZERO, |d| now - d);
                    if ownership::verdict(activity, draining_for, self.options.ack_timeout)
                        .is_some()
                    {
                        v.to_release.push(p);
                    }
                }
                ("release", false) => v.to_release.push(p),
                (other, true) => {
                    tracing::warn!(topic = %self.topic, partition = p, status = other, "redis: partition lease lost; no longer delivering from it");
                    st.drop_partition(p);
                    v.soon = true;
                }
                ("wait", false) => v.soon = true,
                _ => {}
            }
        }
        v
    }

    pub(super) async fn release(&self, partitions: &[u32], leave: bool) -> Result<()> {
        let mut inv = RELEASE.prepare_invoke();
        if leave {
            inv.key(self.members_key());
            inv.key(self.generation_key());
        }
        inv.arg(&self.member);
        for p in partitions {
            inv.arg(self.lease_key(*p));
        }
        inv.invoke_async::<i64>(&mut self.conn())
            .await
            .map(|_| ())
            .map_err(|e| map(e, "releasing partition leases"))
    }
}

/// The outcome of one heartbeat's lease statuses ([`SubShared::judge`]).
#[derive(Default)]
struct Verdicts {
    acquired: Vec<u32>,
    to_release: Vec<u32>,
    /// Buffered or retried entries no handler saw: their delivery counts are put back.
    unseen: Vec<Entry>,
    /// The next heartbeat should come soon.
    soon: bool,
}
