//! The outbox relay workload: rows/s drained from PostgreSQL into a bus by 1 or 2 relays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use busbar::{EventBus, Message};
use busbar_outbox::{Outbox, Relay};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The PostgreSQL URL of the outbox benches.
pub fn postgres_url() -> String {
    std::env::var("BUSBAR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://busbar@127.0.0.1:5432/busbar".into())
}

/// A pool on a fresh schema holding a migrated outbox table.
pub async fn outbox_pool() -> Result<PgPool> {
    let base: PgConnectOptions = postgres_url().parse().context("BUSBAR_POSTGRES_URL")?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(base.clone())
        .await
        .context("connecting to PostgreSQL")?;
    let schema = format!("busbar_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(base.options([("search_path", schema.as_str())]))
        .await?;
    Outbox::migrate(&pool).await?;
    Ok(pool)
}

/// Writes `n` rows over [`crate::KEYS`] keys (500 per transaction, not timed), then times
/// `relays` relays draining them into `bus`.
pub async fn relay(
    pool: &PgPool,
    bus: &Arc<dyn EventBus>,
    relays: usize,
    n: usize,
) -> Result<Duration> {
    sqlx::query("TRUNCATE busbar_outbox").execute(pool).await?;
    let topic = crate::fresh_topic("outbox");
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|i| Message::new(crate::payload_of(*i)).with_key(format!("k{}", i % crate::KEYS)))
            .collect();
        let mut tx = pool.begin().await?;
        Outbox::enqueue_batch(&mut tx, &topic, &msgs).await?;
        tx.commit().await?;
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..relays {
        let mut rx = stopped.clone();
        tasks.push(tokio::spawn(
            Relay::new(pool.clone(), bus.clone())
                .retention(Duration::ZERO)
                .poll_interval(Duration::from_millis(20))
                .run(async move {
                    let _ = rx.wait_for(|s| *s).await;
                }),
        ));
    }
    while Outbox::pending(pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    for t in tasks {
        t.await??;
    }
    Ok(elapsed)
}
