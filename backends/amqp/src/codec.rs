//! How a message travels as an AMQP message: the payload is the body; `message_id`, `type`,
//! `content_type` and `timestamp` (seconds) are AMQP properties; the rest are headers:
//!
//! | header | field |
//! |---|---|
//! | `busbar-key` | partition key (absent when none) |
//! | `busbar-source` | source |
//! | `busbar-time` | time, RFC 3339 with nanoseconds |
//! | `busbar-headers` | the message headers, a JSON array of `[name, value]` pairs in order |
//!
//! Messages are persistent (delivery mode 2). A message without `message_id` (written by
//! another client) gets the id `amqp/<queue>/<delivery tag>`.

use busbar_core::{dlq_headers, Headers, Message};
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

const KEY: &str = "busbar-key";
const SOURCE: &str = "busbar-source";
const TIME: &str = "busbar-time";
const HEADERS: &str = "busbar-headers";

/// The properties of `m`.
pub(crate) fn encode(m: &Message) -> BasicProperties {
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        h.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    };
    if let Some(k) = &m.key {
        put(KEY, k);
    }
    if let Some(s) = &m.source {
        put(SOURCE, s);
    }
    put(TIME, &m.time.to_rfc3339_opts(SecondsFormat::Nanos, true));
    if !m.headers.is_empty() {
        let pairs: Vec<(&str, &str)> = m.headers.iter().collect();
        put(
            HEADERS,
            &serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into()),
        );
    }
    let mut p = BasicProperties::default()
        .with_message_id(ShortString::from(m.id.as_str()))
        .with_delivery_mode(2)
        .with_timestamp(m.time.timestamp().max(0) as u64)
        .with_headers(h);
    if let Some(t) = &m.event_type {
        p = p.with_type(ShortString::from(t.as_str()));
    }
    if let Some(c) = &m.content_type {
        p = p.with_content_type(ShortString::from(c.as_str()));
    }
    p
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A number header (`x-delivery-count` comes in several integer widths).
pub(crate) fn number(v: &AMQPValue) -> Option<i64> {
    match *v {
        AMQPValue::ShortShortInt(n) => Some(n.into()),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => Some(n),
        _ => None,
    }
}

/// Rebuilds a message; `fallback_id` names messages without `message_id`.
pub(crate) fn decode(props: &BasicProperties, body: Vec<u8>, fallback_id: String) -> Message {
    let mut m = Message::new(body);
    m.id = props
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or(fallback_id);
    m.event_type = props.kind().as_ref().map(|s| s.as_str().to_owned());
    m.content_type = props.content_type().as_ref().map(|s| s.as_str().to_owned());
    if let Some(ts) = props.timestamp() {
        if let Some(t) = DateTime::from_timestamp(*ts as i64, 0) {
            m.time = t;
        }
    }
    if let Some(h) = props.headers() {
        let get = |k: &str| h.inner().get(k).and_then(text);
        m.key = get(KEY);
        m.source = get(SOURCE);
        if let Some(t) = get(TIME).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()) {
            m.time = t.with_timezone(&Utc);
        }
        if let Some(json) = get(HEADERS) {
            match serde_json::from_str::<Vec<(String, String)>>(&json) {
                Ok(pairs) => m.headers = pairs.into_iter().collect::<Headers>(),
                Err(e) => {
                    tracing::debug!(error = %e, "amqp: busbar-headers is not a JSON list of pairs")
                }
            }
        }
        // Dead-lettered by RabbitMQ itself (delivery limit): busbar's dead-letter headers, so
        // redrive knows where the message came from.
        if let Some(reason) = get("x-first-death-reason") {
            let queue = get("x-first-death-queue").unwrap_or_default();
            m.headers.insert(
                dlq_headers::ERROR,
                format!("RabbitMQ dead-lettered it from queue {queue}: {reason}"),
            );
            if let Some(topic) = get("x-first-death-exchange")
                .as_deref()
                .and_then(|x| x.strip_prefix("busbar."))
            {
                m.headers.insert(dlq_headers::ORIGINAL_TOPIC, topic);
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let m = Message::new(vec![0u8, 255])
            .with_key("k")
            .with_type("t")
            .with_source("/s")
            .with_content_type("text/plain")
            .with_header("b", "2")
            .with_header("a", "");
        assert_eq!(decode(&encode(&m), m.payload.to_vec(), "x".into()), m);
        let bare = decode(&BasicProperties::default(), vec![], "amqp/q/1".into());
        assert_eq!(bare.id, "amqp/q/1");
    }
}
