//! The PostgreSQL idempotency store: a row per processed message in `busbar_processed`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::idempotency::IdempotencyStore;
use busbar_core::Result;
use sqlx::postgres::{PgConnection, PgPool};

use crate::db_error;

/// The longest record kept: 100 years, in seconds.
const TTL_MAX_SECS: f64 = 100.0 * 365.0 * 86_400.0;

/// Expired rows are deleted by every this many records (and by [`PgIdempotencyStore::clean_up`]).
const SWEEP_EVERY: u64 = 1024;

/// Records processed messages in PostgreSQL (table `busbar_processed`, created by
/// [`crate::Outbox::migrate`]) for [`busbar_core::Consumer::idempotent`]: one row per
/// `<group>/<topic>/<id>` with its expiry.
///
/// Where a handler's side effect is a write to the same database, [`record_in`](Self::record_in)
/// records the message in the handler's own transaction: the effect and the record commit
/// together, so even a crash between them cannot handle the message twice.
///
/// ```no_run
/// # async fn demo(bus: std::sync::Arc<dyn busbar_core::EventBus>, pool: sqlx::PgPool) -> busbar_core::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// busbar_outbox::Outbox::migrate(&pool).await?;
/// let store = busbar_outbox::PgIdempotencyStore::new(pool);
/// let consumer = busbar_core::Consumer::new(bus, "orders")
///     .group("billing")
///     .idempotent(Arc::new(store), Duration::from_secs(7 * 24 * 3600));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgIdempotencyStore {
    pool: PgPool,
    records: Arc<AtomicU64>,
}

impl PgIdempotencyStore {
    /// A store on `pool` (run [`crate::Outbox::migrate`] once first).
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            records: Arc::default(),
        }
    }

    /// Records `key` (from [`busbar_core::idempotency::key`]) for `ttl` inside the caller's
    /// transaction (pass `&mut tx`).
    pub async fn record_in(conn: &mut PgConnection, key: &str, ttl: Duration) -> Result<()> {
        sqlx::query(
            "INSERT INTO busbar_processed (key, expires_at) \
             VALUES ($1, now() + make_interval(secs => $2)) \
             ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(key)
        .bind(ttl.as_secs_f64().min(TTL_MAX_SECS))
        .execute(conn)
        .await
        .map_err(|e| db_error(e, "writing the idempotency record"))?;
        Ok(())
    }

    /// Deletes expired records; returns how many.
    pub async fn clean_up(&self) -> Result<u64> {
        let r = sqlx::query("DELETE FROM busbar_processed WHERE expires_at <= now()")
            .execute(&self.pool)
            .await
            .map_err(|e| db_error(e, "deleting expired idempotency records"))?;
        Ok(r.rows_affected())
    }
}

#[async_trait]
impl IdempotencyStore for PgIdempotencyStore {
    async fn contains(&self, key: &str) -> Result<bool> {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM busbar_processed WHERE key = $1 AND expires_at > now())",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error(e, "reading the idempotency record"))
    }

    async fn record(&self, key: &str, ttl: Duration) -> Result<()> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| db_error(e, "connecting to record a processed message"))?;
        Self::record_in(&mut conn, key, ttl).await?;
        if self.records.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            if let Err(e) = self.clean_up().await {
                tracing::debug!(error = %e, "outbox: deleting expired idempotency records failed");
            }
        }
        Ok(())
    }
}
