//! The relay: drains the outbox into an [`EventBus`] in per-key order.
//!
//! One round, in one transaction:
//! 1. claim up to `batch_size` available rows in insert order, `FOR UPDATE SKIP LOCKED`
//!    (rows other relays hold are skipped, so several relays share the work);
//! 2. per key, keep only the claimed rows that directly follow the key's oldest unpublished
//!    row — a row waits while an older row of its key is held by another relay, backing off
//!    after a failure, or parked. So one key is never in flight twice and never reordered;
//! 3. publish them (one `publish_batch` per topic, which keeps per-key order);
//! 4. mark them published (or delete them when the retention is zero). When a topic's batch
//!    fails because the bus is unreachable, every row of it counts a failed attempt; any other
//!    failure is narrowed down by publishing the rows one by one, so a bad row fails alone
//!    (its key waits behind it, other keys go on). A failed row backs off with the retry
//!    policy, or is parked with its error when the attempts are exhausted or the error is
//!    permanent;
//! 5. commit. A relay that dies before the commit leaves its rows to the next one: they are
//!    published again (at least once), in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use busbar_core::retry::RetryDecision;
use busbar_core::{ErrorKind, EventBus, Message, PublishOptions, Result, RetryPolicy};
use futures::future::join_all;
use futures::FutureExt;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::Row;

use crate::{db_error, message_of, Outbox, NOTIFY_CHANNEL};

/// What a relay did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows published.
    pub published: u64,
    /// Failed publish attempts that will be retried.
    pub retried: u64,
    /// Rows parked after their last attempt.
    pub parked: u64,
    /// Claim rounds run.
    pub rounds: u64,
}

/// Drains the outbox into a bus. Several relays may run at once, in one process or many.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> busbar_core::Result<()> {
/// use std::sync::Arc;
/// let bus = Arc::new(busbar_core::memory::MemoryBus::new());
/// let report = busbar_outbox::Relay::new(pool, bus)
///     .run(tokio::time::sleep(std::time::Duration::from_secs(60)))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Relay {
    pool: PgPool,
    bus: Arc<dyn EventBus>,
    batch_size: i64,
    poll_interval: Duration,
    retry: RetryPolicy,
    retention: Duration,
}

struct Claimed {
    seq: i64,
    topic: String,
    attempts: i32,
    message: Message,
}

impl Relay {
    /// A relay with the defaults: batches of 500 rows, polling every second besides
    /// LISTEN/NOTIFY, the default retry policy (5 attempts), published rows kept one hour.
    pub fn new(pool: PgPool, bus: Arc<dyn EventBus>) -> Self {
        Self {
            pool,
            bus,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            retention: Duration::from_secs(3600),
        }
    }

    /// Rows claimed per round (at least 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.clamp(1, 100_000) as i64;
        self
    }

    /// How often to look for rows when no notification arrives.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Attempts and backoff of failed publishes; a row is parked after the last attempt.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long published rows are kept (zero deletes them when published).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Relays until `shutdown` completes; a round in progress finishes first, so what it
    /// published is also marked.
    ///
    /// Errors only on start (migration); database and bus errors during the run are logged
    /// and retried.
    pub async fn run(
        self,
        shutdown: impl Future<Output = impl Send> + Send,
    ) -> Result<RelayReport> {
        Outbox::migrate(&self.pool).await?;
        let mut report = RelayReport::default();
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(NOTIFY_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox: LISTEN failed; polling only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "outbox: no listener connection; polling only");
                None
            }
        };
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_cleanup = tokio::time::Instant::now();
        let mut failures = 0u32;
        loop {
            // A round is never cut short: what it published is also marked.
            if shutdown.as_mut().now_or_never().is_some() {
                break;
            }
            let round = self.relay_once().await;
            let full = match round {
                Ok(r) => {
                    failures = 0;
                    report.published += r.published;
                    report.retried += r.retried;
                    report.parked += r.parked;
                    report.rounds += 1;
                    r.published + r.retried + r.parked > 0
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "outbox: relay round failed");
                    let pause = self
                        .retry
                        .backoff_ceiling(failures)
                        .max(Duration::from_millis(100));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = &mut shutdown => break,
                    }
                    continue;
                }
            };
            if last_cleanup.elapsed() >= Duration::from_secs(60) && !self.retention.is_zero() {
                last_cleanup = tokio::time::Instant::now();
                match Outbox::clean_up(&self.pool, self.retention).await {
                    Ok(n) if n > 0 => {
                        tracing::debug!(rows = n, "outbox: cleaned up published rows")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox: clean-up failed"),
                }
            }
            if full {
                continue;
            }
            // Nothing to do: wait for a notification, the poll interval or shutdown.
            let wait = async {
                match listener.as_mut() {
                    Some(l) => match tokio::time::timeout(self.poll_interval, l.recv()).await {
                        Ok(Ok(_)) | Err(_) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "outbox: listener interrupted; it reconnects");
                            tokio::time::sleep(self.poll_interval).await;
                        }
                    },
                    None => tokio::time::sleep(self.poll_interval).await,
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = &mut shutdown => break,
            }
        }
        Ok(report)
    }

    /// Runs one claim–publish–mark round; returns what it did.
    pub async fn relay_once(&self) -> Result<RelayReport> {
        let mut report = RelayReport::default();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error(e, "starting a relay transaction"))?;
        let rows = sqlx::query(
            "SELECT seq, topic, message_id, partition_key, payload, headers, event_type, source, \
             event_time, content_type, attempts FROM busbar_outbox \
             WHERE published_at IS NULL AND parked_at IS NULL AND available_at <= now() \
             ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| db_error(e, "claiming outbox rows"))?;
        if rows.is_empty() {
            tx.commit()
                .await
                .map_err(|e| db_error(e, "ending a relay transaction"))?;
            return Ok(report);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for r in &rows {
            claimed.push(Claimed {
                seq: r.try_get("seq").map_err(|e| db_error(e, "reading a row"))?,
                topic: r
                    .try_get("topic")
                    .map_err(|e| db_error(e, "reading a row"))?,
                attempts: r
                    .try_get("attempts")
                    .map_err(|e| db_error(e, "reading a row"))?,
                message: message_of(r).map_err(|e| db_error(e, "reading a row"))?,
            });
        }
        let claimed = self.in_key_order(&mut tx, claimed).await?;
        // One batch per topic, in seq order; topics are independent of each other.
        let mut by_topic: BTreeMap<&str, Vec<&Claimed>> = BTreeMap::new();
        for c in &claimed {
            by_topic.entry(&c.topic).or_default().push(c);
        }
        let batch_max = self
            .bus
            .capabilities()
            .batch_max_size
            .unwrap_or(usize::MAX)
            .max(1);
        let results = join_all(by_topic.iter().map(|(topic, rows)| async move {
            for chunk in rows.chunks(batch_max) {
                let msgs = chunk.iter().map(|c| c.message.clone()).collect();
                self.bus
                    .publish_batch(topic, msgs, &PublishOptions::default())
                    .await?;
            }
            Ok::<(), busbar_core::Error>(())
        }))
        .await;
        let mut published: Vec<i64> = Vec::new();
        for ((topic, rows), result) in by_topic.iter().zip(results) {
            let e = match result {
                Ok(()) => {
                    published.extend(rows.iter().map(|c| c.seq));
                    continue;
                }
                Err(e) => e,
            };
            if bus_down(&e) {
                for c in rows {
                    self.record_failure(&mut tx, c, &e, &mut report).await?;
                }
                continue;
            }
            // Something in the batch was refused: publish one by one, so one bad row is
            // retried or parked alone. A key stops at its first failure (its later rows
            // wait behind it); other keys go on.
            let mut failed_keys: HashSet<&str> = HashSet::new();
            let mut down: Option<busbar_core::Error> = None;
            for c in rows {
                if let Some(e) = &down {
                    self.record_failure(&mut tx, c, e, &mut report).await?;
                    continue;
                }
                if c.message
                    .key
                    .as_deref()
                    .is_some_and(|k| failed_keys.contains(k))
                {
                    continue;
                }
                match self
                    .bus
                    .publish(topic, c.message.clone(), &PublishOptions::default())
                    .await
                {
                    Ok(()) => published.push(c.seq),
                    Err(e) => {
                        self.record_failure(&mut tx, c, &e, &mut report).await?;
                        if let Some(k) = c.message.key.as_deref() {
                            failed_keys.insert(k);
                        }
                        if bus_down(&e) {
                            down = Some(e);
                        }
                    }
                }
            }
        }
        if !published.is_empty() {
            let sql = if self.retention.is_zero() {
                "DELETE FROM busbar_outbox WHERE seq = ANY($1)"
            } else {
                "UPDATE busbar_outbox SET published_at = now(), last_error = NULL WHERE seq = ANY($1)"
            };
            sqlx::query(sql)
                .bind(&published)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error(e, "marking rows published"))?;
            report.published += published.len() as u64;
        }
        tx.commit()
            .await
            .map_err(|e| db_error(e, "committing the relay round"))?;
        Ok(report)
    }

    /// Counts a failed attempt of `c`: back off with the retry policy, or park the row with
    /// its error after the last attempt or on a permanent error.
    async fn record_failure(
        &self,
        tx: &mut sqlx::PgConnection,
        c: &Claimed,
        e: &busbar_core::Error,
        report: &mut RelayReport,
    ) -> Result<()> {
        let attempt = (c.attempts + 1).max(1) as u32;
        let decision = if e.is_retryable() {
            self.retry.decide(attempt)
        } else {
            RetryDecision::GiveUp
        };
        let text = e.to_string();
        match decision {
            RetryDecision::RetryAfter(d) => {
                report.retried += 1;
                sqlx::query(
                    "UPDATE busbar_outbox SET attempts = attempts + 1, last_error = $2, \
                     available_at = now() + make_interval(secs => $3) WHERE seq = $1",
                )
                .bind(c.seq)
                .bind(&text)
                .bind(d.as_secs_f64())
                .execute(&mut *tx)
                .await
            }
            RetryDecision::GiveUp => {
                report.parked += 1;
                tracing::error!(seq = c.seq, topic = %c.topic, error = %text, "outbox: row parked");
                sqlx::query(
                    "UPDATE busbar_outbox SET attempts = attempts + 1, last_error = $2, \
                     parked_at = now() WHERE seq = $1",
                )
                .bind(c.seq)
                .bind(&text)
                .execute(&mut *tx)
                .await
            }
        }
        .map_err(|e| db_error(e, "recording a failed publish"))?;
        Ok(())
    }

    /// Keeps, per key, the claimed rows that directly follow the key's oldest unpublished
    /// row (see the module docs); rows without a key are all kept.
    async fn in_key_order(
        &self,
        tx: &mut sqlx::PgConnection,
        claimed: Vec<Claimed>,
    ) -> Result<Vec<Claimed>> {
        let keys: Vec<String> = {
            let mut k: Vec<String> = claimed
                .iter()
                .filter_map(|c| c.message.key.clone())
                .collect();
            k.sort();
            k.dedup();
            k
        };
        if keys.is_empty() {
            return Ok(claimed);
        }
        let max_seq = claimed.iter().map(|c| c.seq).max().unwrap_or(0);
        let pending = sqlx::query(
            "SELECT partition_key, seq FROM busbar_outbox \
             WHERE published_at IS NULL AND partition_key = ANY($1) AND seq <= $2 \
             ORDER BY partition_key, seq",
        )
        .bind(&keys)
        .bind(max_seq)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| db_error(e, "reading the keys' pending rows"))?;
        let mut line: HashMap<String, std::collections::VecDeque<i64>> = HashMap::new();
        for r in &pending {
            let k: String = r
                .try_get("partition_key")
                .map_err(|e| db_error(e, "reading a row"))?;
            let s: i64 = r.try_get("seq").map_err(|e| db_error(e, "reading a row"))?;
            line.entry(k).or_default().push_back(s);
        }
        let mut blocked: HashMap<String, bool> = HashMap::new();
        let mut kept = Vec::with_capacity(claimed.len());
        for c in claimed {
            let Some(k) = c.message.key.clone() else {
                kept.push(c);
                continue;
            };
            if blocked.get(&k).copied().unwrap_or(false) {
                continue;
            }
            let q = line.entry(k.clone()).or_default();
            if q.front() == Some(&c.seq) {
                q.pop_front();
                kept.push(c);
            } else {
                // An older row of this key is elsewhere (another relay, backing off, parked).
                blocked.insert(k, true);
            }
        }
        Ok(kept)
    }
}

/// Whether a publish error means the bus is unreachable (every publish would fail now).
fn bus_down(e: &busbar_core::Error) -> bool {
    matches!(e.kind(), ErrorKind::Connection | ErrorKind::Closed)
}
