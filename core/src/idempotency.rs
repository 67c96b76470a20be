//! Idempotent consumers: skip a message that the group already processed successfully.
//!
//! busbar delivers at least once: a consumer that dies after its handler succeeded but before
//! the broker saw the ack gets the message again (a SIGKILLed Kafka consumer redelivered 143 of
//! 2,000 in `cli/tests/crash.rs`). [`Consumer::idempotent`](crate::Consumer::idempotent) keeps
//! a record of what succeeded in an [`IdempotencyStore`] — [`MemoryStore`] here, a Redis store
//! in `busbar-redis`, a PostgreSQL store in `busbar-outbox` — and acks such a redelivery
//! without calling the handler.
//!
//! What it cannot do: a consumer that dies between its handler's side effect and the record
//! (one store round trip) still handles that message twice. Where the side effect is a
//! database write, record it in the same transaction (the PostgreSQL store's `record_in`) and
//! that window closes too.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::Result;

/// Where an idempotent consumer records the messages it processed.
///
/// Keys come from [`key`]; an implementation stores each for at least `ttl` (a redelivery
/// after that is handled again).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug {
    /// Whether `key` was recorded and has not expired.
    async fn contains(&self, key: &str) -> Result<bool>;

    /// Records `key` for `ttl`.
    async fn record(&self, key: &str, ttl: Duration) -> Result<()>;
}

/// The record key of message `id` on `topic` for `group`: `<group>/<topic>/<id>` (group and
/// topic names cannot hold `/`, so keys of different groups or topics never meet).
pub fn key(group: &str, topic: &str, id: &str) -> String {
    format!("{group}/{topic}/{id}")
}

/// An in-process store: redeliveries to this process (a nack, a hand-back, a lost
/// connection) are skipped; another process does not see it — use a shared store for that.
/// Expired keys are dropped as new ones arrive.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    keys: Arc<Mutex<HashMap<String, Instant>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys held now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn contains(&self, key: &str) -> Result<bool> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.get(key).is_some_and(|until| *until > Instant::now()))
    }

    async fn record(&self, key: &str, ttl: Duration) -> Result<()> {
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        // Amortised: a sweep whenever the map doubled since the last one.
        if keys.len() >= 1024 && keys.len().is_power_of_two() {
            keys.retain(|_, until| *until > now);
        }
        let until = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        keys.insert(key.to_owned(), until);
        Ok(())
    }
}

/// A store and how long it keeps each record, as a consumer uses them.
#[derive(Debug, Clone)]
pub(crate) struct Idempotency {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_remembers_until_the_ttl() {
        let s = MemoryStore::new();
        assert!(!s.contains("g/t/1").await.expect("memory store"));
        s.record("g/t/1", Duration::from_millis(50))
            .await
            .expect("memory store");
        s.record("g/t/2", Duration::MAX)
            .await
            .expect("memory store");
        assert!(s.contains("g/t/1").await.expect("memory store"));
        assert!(!s.contains("h/t/1").await.expect("memory store"));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!s.contains("g/t/1").await.expect("memory store"));
        assert!(s.contains("g/t/2").await.expect("memory store"));
    }

    #[test]
    fn keys_of_groups_and_topics_differ() {
        assert_ne!(key("a", "b.c", "1"), key("a.b", "c", "1"));
        assert_eq!(key("billing", "orders", "01a2"), "billing/orders/01a2");
    }
}
