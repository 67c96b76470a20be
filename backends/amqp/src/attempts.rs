//! Honest attempts across hand-overs: how many times handlers received the messages a member
//! hands back.
//!
//! RabbitMQ's quorum queues count every return in `x-delivery-count` (before 4.3 there is no
//! way to return a message uncounted), including messages a member had prefetched, or queued
//! behind their key, and never handed to a handler. So a member giving a partition up writes,
//! before it closes the partition's channel, one record to the partition's attempts queue
//! `busbar.<topic>.<group>.<p>.attempts` (a durable classic queue): for each message it hands
//! back, how many times a handler received it and its delivery count then. The next owner
//! reads the queue when the partition's first delivery reaches it and hands such a message
//! out with `seen + 1`, plus one for each return since the record (a member that died
//! without writing one: its handlers may have seen the message). A message no record names
//! starts from its delivery count (`x-delivery-count + 1`).
//!
//! The reader keeps the records it read unacked until it writes the next one, so a member
//! that dies returns them to the queue for the owner after it; records are merged by the
//! latest delivery count, so two of them (a member died between writing and acking) agree.

use std::collections::HashMap;
use std::sync::Arc;

use busbar_core::{Message, Result};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};

use crate::{config, map_err};

/// The most entries one record keeps (a member holds at most its prefetch and what it
/// carried over; anything past this is dropped, counted conservatively by the broker).
const MAX_ENTRIES: usize = 100_000;

/// One record in an attempts queue.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Record {
    /// Format version.
    v: u32,
    /// `(message id, handler receptions, delivery count when written)`.
    entries: Vec<(String, u32, u64)>,
}

/// What a member knows about one owned partition's attempts.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// The attempts queue was read (its first delivery reached the partition).
    loaded: bool,
    /// Reading it failed: attempts start from RabbitMQ's count, and nothing is written.
    failed: bool,
    /// Entries read and not yet matched by a delivery: `id -> (seen, delivery count)`.
    carried: HashMap<String, (u32, u64)>,
    /// The records read, held unacked on the member's attempts channel until replaced.
    tags: Vec<u64>,
    /// The delivery count of held deliveries that had one, by delivery tag.
    counts: HashMap<i64, u64>,
}

impl Ledger {
    /// A ledger whose attempts queue could not be read.
    pub(crate) fn unreadable() -> Self {
        Self {
            failed: true,
            ..Self::default()
        }
    }

    /// Whether the attempts queue still has to be read.
    pub(crate) fn needs_load(&self) -> bool {
        !self.loaded && !self.failed
    }

    fn merge(&mut self, record: Record) {
        for (id, seen, count) in record.entries {
            let e = self.carried.entry(id).or_insert((seen, count));
            if (count, seen) > (e.1, e.0) {
                *e = (seen, count);
            }
        }
    }

    /// The attempt of a delivery of message `id` under delivery tag `tag` with RabbitMQ's
    /// delivery count `count`.
    pub(crate) fn attempt(&mut self, id: &str, tag: i64, count: u64) -> u32 {
        if count > 0 {
            self.counts.insert(tag, count);
        }
        let n = match self.carried.remove(id) {
            // Returned once by the clean hand-over that wrote the record; every return
            // since was a member that died holding it (its handlers may have seen it).
            Some((seen, written)) => {
                u64::from(seen) + 1 + count.saturating_sub(written.saturating_add(1))
            }
            None => count.saturating_add(1),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The delivery under `tag` was settled (acked or dead-lettered): nothing to record.
    pub(crate) fn settled(&mut self, tag: i64) {
        self.counts.remove(&tag);
    }

    /// The record to write when handing the partition back with `held` unsettled:
    /// `(delivery tag, message, handler receptions)`.
    fn record(&self, held: &[(i64, Arc<Message>, u32)]) -> Record {
        let mut entries: Vec<(String, u32, u64)> = held
            .iter()
            .map(|(tag, m, seen)| {
                let count = self.counts.get(tag).copied().unwrap_or(0);
                (m.id.clone(), *seen, count)
            })
            .collect();
        entries.extend(
            self.carried
                .iter()
                .map(|(id, (seen, count))| (id.clone(), *seen, *count)),
        );
        entries.truncate(MAX_ENTRIES);
        Record { v: 1, entries }
    }
}

/// The attempts queue of partition `p` (declared if missing: groups from before it existed).
async fn declare(ch: &Channel, queue: &str, expires: Option<std::time::Duration>) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("classic")),
    );
    if let Some(d) = expires {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(ms));
    }
    ch.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map(|_| ())
    .map_err(|e| map_err(e, &format!("declaring the attempts queue {queue}")))
}

/// Opens a member's attempts channel (publisher confirms on).
pub(crate) async fn open_channel(conn: &Connection) -> Result<Channel> {
    let ch = crate::create_channel(conn).await?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| map_err(e, "enabling confirms on the attempts channel"))?;
    Ok(ch)
}

/// Reads every record of partition `p`'s attempts queue into `ledger` (holding them).
pub(crate) async fn load(
    ch: &Channel,
    topic: &str,
    group: &str,
    p: u32,
    expires: Option<std::time::Duration>,
) -> Result<Ledger> {
    let queue = config::attempts_queue(topic, group, p);
    declare(ch, &queue, expires).await?;
    let mut ledger = Ledger {
        loaded: true,
        ..Ledger::default()
    };
    loop {
        let got = ch
            .basic_get(
                ShortString::from(queue.as_str()),
                BasicGetOptions::default(),
            )
            .await
            .map_err(|e| map_err(e, &format!("reading {queue}")))?;
        let Some(m) = got else { break };
        ledger.tags.push(m.delivery.delivery_tag);
        match serde_json::from_slice::<Record>(&m.delivery.data) {
            Ok(r) if r.v == 1 => ledger.merge(r),
            Ok(r) => tracing::warn!(
                queue,
                version = r.v,
                "amqp: attempts record of an unknown version; ignored"
            ),
            Err(e) => {
                tracing::warn!(queue, error = %e, "amqp: unreadable attempts record; ignored")
            }
        }
    }
    tracing::debug!(
        queue,
        records = ledger.tags.len(),
        entries = ledger.carried.len(),
        "amqp: attempts read"
    );
    Ok(ledger)
}

/// Writes the record of a partition handed back with `held` unsettled, then acks the
/// records it replaces. Nothing is written for a partition whose attempts were never read.
pub(crate) async fn write(
    ch: &Channel,
    topic: &str,
    group: &str,
    p: u32,
    ledger: &Ledger,
    held: &[(i64, Arc<Message>, u32)],
) -> Result<()> {
    if !ledger.loaded {
        return Ok(());
    }
    let queue = config::attempts_queue(topic, group, p);
    let record = ledger.record(held);
    if !record.entries.is_empty() {
        let body = serde_json::to_vec(&record).map_err(|e| {
            busbar_core::Error::new(
                busbar_core::ErrorKind::InvalidInput,
                format!("encoding the attempts record: {e}"),
            )
            .with_backend(crate::BACKEND)
        })?;
        let confirm = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(|e| map_err(e, &format!("writing {queue}")))?
            .await
            .map_err(|e| map_err(e, &format!("writing {queue}")))?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            return Err(busbar_core::Error::new(
                busbar_core::ErrorKind::Broker,
                format!("RabbitMQ did not take the attempts record for {queue}"),
            )
            .with_backend(crate::BACKEND));
        }
    }
    for &tag in &ledger.tags {
        ch.basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| map_err(e, &format!("acking a record of {queue}")))?;
    }
    tracing::debug!(
        queue,
        entries = record.entries.len(),
        "amqp: attempts written"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> Arc<Message> {
        let mut m = Message::new("x");
        m.id = id.into();
        Arc::new(m)
    }

    #[test]
    fn a_clean_hand_back_does_not_count_and_a_death_does() {
        let mut l = Ledger {
            loaded: true,
            ..Ledger::default()
        };
        // First delivery of a (never seen) and b (seen twice, then held when handing over).
        assert_eq!(l.attempt("a", 1, 0), 1);
        assert_eq!(l.attempt("b", 2, 3), 4);
        let r = l.record(&[(1, msg("a"), 0), (2, msg("b"), 2)]);
        let mut next = Ledger::default();
        next.merge(r);
        // After the clean close each came back once: a is still on attempt 1, b on 3.
        assert_eq!(next.attempt("a", 7, 1), 1);
        // b came back twice more: a member died holding it (its handler may have seen it).
        assert_eq!(next.attempt("b", 8, 5), 4);
        // A message no record names starts from RabbitMQ's count.
        assert_eq!(next.attempt("c", 9, 2), 3);
    }

    #[test]
    fn records_merge_by_the_latest_delivery_count() {
        let mut l = Ledger::default();
        l.merge(Record {
            v: 1,
            entries: vec![("a".into(), 1, 1), ("b".into(), 4, 4)],
        });
        l.merge(Record {
            v: 1,
            entries: vec![("a".into(), 2, 3), ("b".into(), 0, 2)],
        });
        assert_eq!(l.carried["a"], (2, 3));
        assert_eq!(l.carried["b"], (4, 4));
        // Settled deliveries are not recorded; carried entries are kept.
        l.attempt("x", 5, 2);
        l.settled(5);
        let r = l.record(&[]);
        assert_eq!(r.entries.len(), 2);
        assert!(l.counts.is_empty());
    }

    #[test]
    fn huge_counts_saturate() {
        let mut l = Ledger::default();
        assert_eq!(l.attempt("a", 1, u64::MAX), u32::MAX);
        l.merge(Record {
            v: 1,
            entries: vec![("b".into(), u32::MAX, u64::MAX)],
        });
        assert_eq!(l.attempt("b", 2, 0), u32::MAX);
    }
}
