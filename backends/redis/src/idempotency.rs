//! The Redis idempotency store: one key per processed message, `SET … PX ttl`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::idempotency::IdempotencyStore;
use busbar_core::Result;
use redis::aio::ConnectionManager;

use crate::{error, open, RedisConfig};

/// The longest record kept: 100 years, in milliseconds.
const TTL_MAX_MS: u64 = 100 * 365 * 86_400 * 1000;

/// Records processed messages in Redis for [`busbar_core::Consumer::idempotent`], shared by
/// every process of a group: key `<prefix><group>/<topic>/<id>` (prefix `busbar:done:`),
/// value `1`, expiring after the consumer's ttl (`SET … PX`; at least 1 ms).
///
/// ```no_run
/// # async fn demo(bus: std::sync::Arc<dyn busbar_core::EventBus>) -> busbar_core::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// let store = busbar_redis::RedisIdempotencyStore::connect("redis://127.0.0.1:6379").await?;
/// let consumer = busbar_core::Consumer::new(bus, "orders")
///     .group("billing")
///     .idempotent(Arc::new(store), Duration::from_secs(24 * 3600));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    conn: ConnectionManager,
    prefix: String,
    url: String,
}

impl fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("url", &busbar_core::raw::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisIdempotencyStore {
    /// The key prefix unless [`with_prefix`](Self::with_prefix) sets another.
    pub const DEFAULT_PREFIX: &'static str = "busbar:done:";

    /// Connects to the Redis of `url` (a `redis://`/`rediss://` URL as the bus takes; its
    /// busbar options are accepted and unused). Errors: `Config`, `Connection`, `Auth`.
    pub async fn connect(url: &str) -> Result<Self> {
        let config = RedisConfig::from_url(url)?;
        let (_, conn) = open(&config).await?;
        Ok(Self {
            conn,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            url: config.connection_url,
        })
    }

    /// Uses another key prefix (one per application sharing a Redis, for instance).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn contains(&self, key: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(format!("{}{key}", self.prefix))
            .query_async::<u64>(&mut conn)
            .await
            .map(|n| n > 0)
            .map_err(|e| error::map(e, "reading the idempotency record"))
    }

    async fn record(&self, key: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        // Redis refuses an expiry whose deadline overflows: at most 100 years.
        let ms = u64::try_from(ttl.as_millis()).map_or(TTL_MAX_MS, |ms| ms.clamp(1, TTL_MAX_MS));
        redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(1)
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| error::map(e, "writing the idempotency record"))
    }
}
