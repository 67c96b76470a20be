#![doc = include_str!("../README.md")]

mod idempotency;
mod relay;

use std::time::Duration;

use busbar_core::limits::validate_topic;
use busbar_core::{Error, ErrorKind, Headers, Message, Result};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Row;

pub use idempotency::PgIdempotencyStore;
pub use relay::{Relay, RelayReport};

pub(crate) const BACKEND: &str = "outbox";

/// The channel `enqueue` notifies (at commit) and relays listen on.
pub const NOTIFY_CHANNEL: &str = "busbar_outbox";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Maps a sqlx error onto busbar's error kinds, saying what was being done.
pub(crate) fn db_error(e: sqlx::Error, doing: &str) -> Error {
    let kind = match &e {
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => ErrorKind::Connection,
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::Decode,
        _ => ErrorKind::Broker,
    };
    Error::new(kind, format!("{doing}: {e}"))
        .with_backend(BACKEND)
        .with_source(e)
}

/// The transactional outbox: events written in the application's own transaction, so an
/// event exists exactly when the change it describes was committed. A [`Relay`] publishes
/// them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox;

/// A row that kept failing and was parked: it blocks later rows of its key (order is kept)
/// but no other key, until [`Outbox::requeue`] or [`Outbox::discard`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedRow {
    /// The row's sequence number (insert order).
    pub seq: i64,
    /// Target topic.
    pub topic: String,
    /// Message id.
    pub message_id: String,
    /// Partition key.
    pub key: Option<String>,
    /// Publish attempts made.
    pub attempts: i32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

impl Outbox {
    /// Creates or upgrades the outbox table and the idempotency table `busbar_processed`
    /// (embedded sqlx migrations; idempotent).
    pub async fn migrate(pool: &PgPool) -> Result<()> {
        MIGRATOR
            .run(pool)
            .await
            .map_err(|e| db_error(e.into(), "migrating the outbox table"))
    }

    /// Writes `message` for `topic` inside the caller's transaction (pass `&mut tx`). It is
    /// published after the transaction commits, and never if it rolls back. Enqueued from a
    /// consumer runner's handler, it joins the handled event's chain (correlation and
    /// causation ids), as a direct publish would.
    ///
    /// Errors: `InvalidTopic`; database errors (the caller's transaction is then unusable,
    /// as with any failed statement).
    pub async fn enqueue(conn: &mut PgConnection, topic: &str, message: &Message) -> Result<()> {
        Self::enqueue_batch(conn, topic, std::slice::from_ref(message)).await
    }

    /// Writes several messages for `topic` in one statement, in order.
    pub async fn enqueue_batch(
        conn: &mut PgConnection,
        topic: &str,
        messages: &[Message],
    ) -> Result<()> {
        validate_topic(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        // Enqueued by a consumer's handler: the events join its chain now, since the relay
        // publishes them later, outside the handler.
        let mut messages = messages.to_vec();
        busbar_core::raw::join_chain(&mut messages);
        let mut qb = sqlx::QueryBuilder::new(
            "INSERT INTO busbar_outbox (topic, message_id, partition_key, payload, headers, \
             event_type, source, event_time, content_type) ",
        );
        qb.push_values(&messages, |mut b, m| {
            let headers: Vec<(&str, &str)> = m.headers.iter().collect();
            b.push_bind(topic)
                .push_bind(&m.id)
                .push_bind(&m.key)
                .push_bind(&m.payload[..])
                .push_bind(sqlx::types::Json(headers))
                .push_bind(&m.event_type)
                .push_bind(&m.source)
                .push_bind(m.time)
                .push_bind(&m.content_type);
        });
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(e, "writing to the outbox"))?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(topic)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(e, "notifying the relays"))?;
        Ok(())
    }

    /// Rows not yet published (parked ones included).
    pub async fn pending(pool: &PgPool) -> Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM busbar_outbox WHERE published_at IS NULL")
            .fetch_one(pool)
            .await
            .map_err(|e| db_error(e, "counting pending outbox rows"))
    }

    /// The parked rows, oldest first.
    pub async fn parked(pool: &PgPool) -> Result<Vec<ParkedRow>> {
        let rows = sqlx::query(
            "SELECT seq, topic, message_id, partition_key, attempts, last_error, parked_at \
             FROM busbar_outbox WHERE parked_at IS NOT NULL AND published_at IS NULL ORDER BY seq",
        )
        .fetch_all(pool)
        .await
        .map_err(|e| db_error(e, "listing parked outbox rows"))?;
        rows.iter()
            .map(|r| {
                Ok(ParkedRow {
                    seq: r.try_get("seq")?,
                    topic: r.try_get("topic")?,
                    message_id: r.try_get("message_id")?,
                    key: r.try_get("partition_key")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    parked_at: r.try_get("parked_at")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(|e| db_error(e, "reading parked outbox rows"))
    }

    /// Puts a parked row back in line (attempts reset). Returns whether it was parked.
    pub async fn requeue(pool: &PgPool, seq: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE busbar_outbox SET parked_at = NULL, attempts = 0, available_at = now() \
             WHERE seq = $1 AND parked_at IS NOT NULL AND published_at IS NULL",
        )
        .bind(seq)
        .execute(pool)
        .await
        .map_err(|e| db_error(e, "requeueing an outbox row"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes a parked row for good, unblocking its key. Returns whether it was parked.
    pub async fn discard(pool: &PgPool, seq: i64) -> Result<bool> {
        let r = sqlx::query(
            "DELETE FROM busbar_outbox WHERE seq = $1 AND parked_at IS NOT NULL AND published_at IS NULL",
        )
        .bind(seq)
        .execute(pool)
        .await
        .map_err(|e| db_error(e, "discarding an outbox row"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes published rows older than `retention`; returns how many.
    pub async fn clean_up(pool: &PgPool, retention: Duration) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM busbar_outbox WHERE published_at IS NOT NULL \
             AND published_at < now() - make_interval(secs => $1)",
        )
        .bind(retention.as_secs_f64())
        .execute(pool)
        .await
        .map_err(|e| db_error(e, "cleaning up the outbox"))?;
        Ok(r.rows_affected())
    }
}

/// Rebuilds the message of an outbox row.
pub(crate) fn message_of(row: &sqlx::postgres::PgRow) -> std::result::Result<Message, sqlx::Error> {
    let payload: Vec<u8> = row.try_get("payload")?;
    let headers: sqlx::types::Json<Vec<(String, String)>> = row.try_get("headers")?;
    let mut m = Message::new(payload).with_id(row.try_get::<String, _>("message_id")?);
    m.key = row.try_get("partition_key")?;
    m.event_type = row.try_get("event_type")?;
    m.source = row.try_get("source")?;
    m.time = row.try_get("event_time")?;
    m.content_type = row.try_get("content_type")?;
    m.headers = headers.0.into_iter().collect::<Headers>();
    Ok(m)
}
