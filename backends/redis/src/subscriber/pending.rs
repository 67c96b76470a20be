//! Pending entries: recovering a newly owned partition's pending entries in ID order, claiming
//! timed-out deliveries back, correcting delivery counts of entries no handler saw, and moving
//! due delayed messages.

use super::*;

impl SubShared {
    /// Sets the Redis delivery counter of entries no handler holds to the number of times a
    /// handler received them (XCLAIM RETRYCOUNT): they stay pending for the partition's next
    /// owner, whose `attempt` must not count hand-outs nobody saw (entries read ahead, or
    /// released by the consumer runner). Best effort: a failure only over-counts.
    pub(super) async fn recount(&self, entries: Vec<Entry>) {
        self.set_counts(
            entries
                .into_iter()
                .map(|e| (e.partition, e.stream_id, e.attempt.saturating_sub(1)))
                .collect(),
        )
        .await;
    }

    /// The pending entries of this member in the given partitions that no handler holds and
    /// this member does not know of: read by an XREADGROUP whose `next()` was dropped before
    /// it returned (the consumer runner shutting down), so never handed out. With the number
    /// of times handlers received them (their delivery count less that read).
    pub(super) async fn lost_reads(&self, parts: &[u32]) -> Vec<(u32, String, u32)> {
        let mut out = Vec::new();
        for &p in parts {
            let reply: redis::RedisResult<Value> = redis::cmd("XPENDING")
                .arg(self.stream(p))
                .arg(&self.options.group)
                .arg("-")
                .arg("+")
                .arg(10_000)
                .arg(&self.member)
                .query_async(&mut self.conn())
                .await;
            let Ok(pending) = reply
                .map_err(|e| map(e, "reading pending entries"))
                .and_then(parse_pending)
            else {
                continue;
            };
            let st = self.lock();
            let waiting: HashSet<String> = st
                .waiting_in(&[p])
                .into_iter()
                .map(|e| e.stream_id)
                .collect();
            for (id, count) in pending {
                if !st.inflight.contains_key(&(p, id.clone())) && !waiting.contains(&id) {
                    out.push((p, id, count.saturating_sub(1)));
                }
            }
        }
        out
    }

    /// Sets the delivery counters of `(partition, id, count)` entries (XCLAIM RETRYCOUNT).
    pub(super) async fn set_counts(&self, entries: Vec<(u32, String, u32)>) {
        let mut groups: BTreeMap<(u32, u32), Vec<String>> = BTreeMap::new();
        for (p, id, seen) in entries {
            groups.entry((p, seen)).or_default().push(id);
        }
        for ((p, seen), ids) in groups {
            for chunk in ids.chunks(200) {
                let mut cmd = redis::cmd("XCLAIM");
                cmd.arg(self.stream(p))
                    .arg(&self.options.group)
                    .arg(&self.member)
                    .arg(0);
                for id in chunk {
                    cmd.arg(id.as_str());
                }
                cmd.arg("RETRYCOUNT").arg(seen).arg("JUSTID");
                if let Err(e) = cmd.query_async::<Value>(&mut self.conn()).await {
                    tracing::debug!(topic = %self.topic, partition = p, error = %e, "redis: cannot reset the delivery counter of entries no handler saw");
                }
            }
        }
    }

    /// Claims every pending entry of partition `p` (of any member), in ID order.
    pub(super) async fn recover(&self, p: u32) -> Result<Vec<Entry>> {
        let stream = self.stream(p);
        let mut out = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let reply: Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(&self.options.group)
                .arg(&start)
                .arg("+")
                .arg(200)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| map(e, "reading pending entries"))?;
            let pending = parse_pending(reply)?;
            let Some(last) = pending.last().map(|x| x.0.clone()) else {
                break;
            };
            let counts: HashMap<String, u32> =
                pending.iter().map(|(id, n)| (id.clone(), *n)).collect();
            let ids: Vec<&String> = pending.iter().map(|(id, _)| id).collect();
            let claimed = self.claim(p, &ids, 0, false).await?;
            for raw in claimed {
                let attempt = counts.get(&raw.stream_id).copied().unwrap_or(1) + 1;
                out.push(to_entry(p, raw, attempt));
            }
            if pending.len() < 200 {
                break;
            }
            start = format!("({last}");
        }
        out.sort_by_key(|e| stream_id_order(&e.stream_id));
        Ok(out)
    }

    /// XCLAIM to this member. With `justid`, only resets the idle time.
    pub(super) async fn claim(
        &self,
        p: u32,
        ids: &[&String],
        min_idle_ms: u64,
        justid: bool,
    ) -> Result<Vec<RawEntry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.stream(p))
            .arg(&self.options.group)
            .arg(&self.member)
            .arg(min_idle_ms);
        for id in ids {
            cmd.arg(id.as_str());
        }
        if justid {
            cmd.arg("JUSTID");
        }
        let reply: Value = cmd
            .query_async(&mut self.conn())
            .await
            .map_err(|e| map(e, "claiming pending entries"))?;
        if justid {
            return Ok(Vec::new());
        }
        entries_of(reply)
    }

    /// Redelivers our deliveries whose ack timeout expired (and entries read but lost before
    /// they were handed out).
    pub(super) async fn sweep(&self) -> Result<()> {
        let idle_ms = self.options.ack_timeout.as_millis() as u64;
        let owned: Vec<u32> = self.lock().parts.keys().copied().collect();
        for p in owned {
            let reply: Value = redis::cmd("XPENDING")
                .arg(self.stream(p))
                .arg(&self.options.group)
                .arg("IDLE")
                .arg(idle_ms)
                .arg("-")
                .arg("+")
                .arg(100)
                .arg(&self.member)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| map(e, "reading pending entries"))?;
            let pending = parse_pending(reply)?;
            if pending.is_empty() {
                continue;
            }
            let now = Instant::now();
            let (expired, draining) = {
                let mut st = self.lock();
                let queued: HashSet<String> = st
                    .parts
                    .get(&p)
                    .map(|part| part.buffer.iter().map(|e| e.stream_id.clone()).collect())
                    .unwrap_or_default();
                let retrying: HashSet<String> = st
                    .retry
                    .values()
                    .filter(|e| e.partition == p)
                    .map(|e| e.stream_id.clone())
                    .collect();
                let expired: Vec<(String, u32)> = pending
                    .into_iter()
                    .filter(|(id, _)| !queued.contains(id) && !retrying.contains(id))
                    .filter(|(id, _)| {
                        st.inflight
                            .get(&(p, id.clone()))
                            .is_none_or(|deadline| *deadline <= now)
                    })
                    .collect();
                for (id, _) in &expired {
                    st.inflight.remove(&(p, id.clone()));
                }
                let draining = st.parts.get(&p).is_none_or(|part| part.draining);
                (expired, draining)
            };
            if draining || expired.is_empty() {
                // A draining partition's timed-out deliveries go to the next owner.
                if draining && !expired.is_empty() {
                    self.wake_bg.notify_one();
                }
                continue;
            }
            let counts: HashMap<String, u32> = expired.iter().cloned().collect();
            let ids: Vec<&String> = expired.iter().map(|(id, _)| id).collect();
            let claimed = self.claim(p, &ids, idle_ms, false).await?;
            let mut entries = Vec::new();
            for raw in claimed {
                let attempt = counts.get(&raw.stream_id).copied().unwrap_or(1) + 1;
                entries.push(to_entry(p, raw, attempt));
            }
            entries.sort_by_key(|e| stream_id_order(&e.stream_id));
            let mut st = self.lock();
            if st.parts.get(&p).is_some_and(|part| !part.draining) {
                for e in entries {
                    tracing::debug!(topic = %self.topic, stream_id = %e.stream_id, attempt = e.attempt, "redis: ack timeout expired, redelivering");
                    let seq = st.next_seq();
                    st.retry.insert((now, seq), e);
                }
            }
        }
        self.wake.notify_waiters();
        Ok(())
    }

    pub(super) async fn move_due(&self) -> Result<()> {
        let cfg = &self.inner.config;
        MOVE_DUE
            .key(cfg.delayed_key(&self.topic))
            .arg(cfg.stream_prefix(&self.topic))
            .arg(cfg.retention)
            .arg(cfg.delayed_entry_prefix(&self.topic))
            .arg(100)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(|_| ())
            .map_err(|e| map(e, "moving due delayed messages"))
    }
}

/// `(stream id, delivery count)` pairs of an extended XPENDING reply.
pub(super) fn parse_pending(reply: Value) -> Result<Vec<(String, u32)>> {
    array_of(reply)?
        .into_iter()
        .map(|row| {
            let mut f = array_of(row)?.into_iter();
            let id = string_of(f.next().ok_or_else(|| decode("short XPENDING row"))?)?;
            let count = f
                .nth(2)
                .map(int_of)
                .transpose()?
                .ok_or_else(|| decode("short XPENDING row"))?;
            Ok((id, u32::try_from(count).unwrap_or(u32::MAX)))
        })
        .collect()
}

pub(super) fn stream_id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}
