//! A topic's history (URL option `history`): a stream queue bound to the topic's exchange
//! beside the groups' queues, kept for the configured age, and read by `browse` with a
//! consumer of its own. Reading a stream queue moves nothing and counts nothing: no group's
//! queue, delivery count or `x-delivery-limit` is touched.

use std::time::Duration;

use busbar_core::{BrowseFrom, BrowseOptions, Message, Result};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Channel;

use crate::{codec, config, map_err, table};

/// How long `browse` waits for the stream's first message: an empty stream says nothing.
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// The quiet that ends a read: a stream has no "end" signal, and RabbitMQ sends what it
/// holds in chunks, back to back.
const IDLE_END: Duration = Duration::from_millis(300);

/// The most messages a reader is sent before it acks (`basic.qos`, required on streams).
const PREFETCH: u16 = 500;

/// Declares the history stream of `topic` (`x-max-age`) and binds it to every partition
/// routing key of the topic's exchange.
pub(crate) async fn declare(
    ch: &Channel,
    topic: &str,
    partitions: u32,
    age: Duration,
) -> Result<()> {
    let q = config::history_queue(topic);
    ch.queue_declare(
        ShortString::from(q.as_str()),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[
            (
                "x-queue-type",
                AMQPValue::LongString(LongString::from("stream")),
            ),
            (
                "x-max-age",
                AMQPValue::LongString(LongString::from(format!("{}s", age.as_secs()))),
            ),
        ]),
    )
    .await
    .map_err(|e| {
        map_err(
            e,
            &format!("declaring the history stream {q} (an existing one must have the same age)"),
        )
    })?;
    let exchange = config::exchange(topic);
    for p in 0..partitions {
        ch.queue_bind(
            ShortString::from(q.as_str()),
            ShortString::from(exchange.as_str()),
            ShortString::from(p.to_string().as_str()),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err(e, &format!("binding the history stream {q}")))?;
    }
    Ok(())
}

/// Up to `options.limit` messages of `topic`'s history, in stream order (per key: publish
/// order), read on `ch` (closed by the caller). A topic without a history stream is empty.
/// From a time: the stream is entered at the chunk of one second earlier (RabbitMQ places a
/// timestamp offset by chunk, to the second) and older messages are skipped by their time.
pub(crate) async fn browse(
    ch: &Channel,
    topic: &str,
    options: &BrowseOptions,
) -> Result<Vec<Message>> {
    let q = config::history_queue(topic);
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch
        .queue_declare(
            ShortString::from(q.as_str()),
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.to_string().contains("NOT_FOUND") => return Ok(Vec::new()),
        Err(e) => return Err(map_err(e, &format!("looking up the history stream {q}"))),
    }
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| map_err(e, "setting the history reader's prefetch"))?;
    let offset = match options.from {
        BrowseFrom::Time(t) => {
            AMQPValue::Timestamp(u64::try_from(t.timestamp().saturating_sub(1)).unwrap_or(0))
        }
        _ => AMQPValue::LongString(LongString::from("first")),
    };
    let tag = format!("busbar-browse-{}", uuid::Uuid::new_v4());
    let mut reader = ch
        .basic_consume(
            ShortString::from(q.as_str()),
            ShortString::from(tag.as_str()),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", offset)]),
        )
        .await
        .map_err(|e| map_err(e, &format!("reading the history stream {q}")))?;
    let mut out = Vec::new();
    let mut wait = FIRST_WAIT;
    while out.len() < options.limit {
        let Ok(next) = tokio::time::timeout(wait, reader.next()).await else {
            break;
        };
        let Some(delivery) = next else { break };
        let delivery = delivery.map_err(|e| map_err(e, &format!("reading {q}")))?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| map_err(e, &format!("reading {q}")))?;
        wait = IDLE_END;
        let message = codec::decode(&delivery.properties, delivery.data);
        if matches!(options.from, BrowseFrom::Time(t) if message.time < t) {
            continue;
        }
        out.push(message);
    }
    Ok(out)
}
