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
//! Messages are persistent (delivery mode 2). A message another client wrote is delivered with
//! what can be read: without `message_id` it gets `amqp-<UUIDv5 of its body and properties>`
//! (RabbitMQ has no position to name it by; the id is the same on every delivery — the
//! broker's `x-` headers are left out — and two byte-identical messages share it), and without
//! `busbar-headers` its string headers become headers.

use busbar_core::dead_letter::headers as dlq_headers;
use busbar_core::{Headers, Message};
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

/// The id of a message without `message_id`: a UUIDv5 of its body and of the properties and
/// headers its sender set (not RabbitMQ's `x-` headers, which change between deliveries).
fn foreign_id(props: &BasicProperties, body: &[u8]) -> String {
    let headers: std::collections::BTreeMap<String, String> = props
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| !k.as_str().starts_with("x-"))
                .map(|(k, v)| (k.as_str().to_owned(), format!("{v:?}")))
                .collect()
        })
        .unwrap_or_default();
    let mut name = body.to_vec();
    name.extend_from_slice(
        format!(
            "|{:?}|{:?}|{:?}|{:?}|{:?}|{headers:?}",
            props.timestamp(),
            props.kind(),
            props.content_type(),
            props.correlation_id(),
            props.app_id(),
        )
        .as_bytes(),
    );
    format!(
        "amqp-{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &name)
    )
}

/// Rebuilds a message (see the module docs for messages other clients wrote).
pub(crate) fn decode(props: &BasicProperties, body: Vec<u8>) -> Message {
    let id = match props.message_id() {
        Some(s) => s.as_str().to_owned(),
        None => foreign_id(props, &body),
    };
    let mut m = Message::new(body);
    m.id = id;
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
        } else if props.message_id().is_none() {
            // Another client's message: its own string headers.
            let mut names: Vec<(&str, String)> = h
                .inner()
                .iter()
                .filter(|(k, _)| !k.as_str().starts_with("x-"))
                .filter_map(|(k, v)| Some((k.as_str(), text(v)?)))
                .collect();
            names.sort();
            for (k, v) in names {
                m.headers.insert(k, v);
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
        assert_eq!(decode(&encode(&m), m.payload.to_vec()), m);
    }

    #[test]
    fn foreign_messages_get_stable_distinct_ids() {
        let with = |count: i64, origin: &str| {
            let mut h = FieldTable::default();
            h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(count));
            h.insert(
                "origin".into(),
                AMQPValue::LongString(LongString::from(origin)),
            );
            BasicProperties::default().with_headers(h)
        };
        let a = decode(&with(0, "legacy"), b"one".to_vec());
        let again = decode(&with(3, "legacy"), b"one".to_vec());
        let b = decode(&with(0, "legacy"), b"two".to_vec());
        let c = decode(&with(0, "other"), b"one".to_vec());
        assert!(a.id.starts_with("amqp-"), "{}", a.id);
        assert_eq!(a.id, again.id, "a redelivery keeps its id");
        assert_ne!(a.id, b.id, "another body, another id");
        assert_ne!(a.id, c.id, "other headers, another id");
        assert_eq!(a.headers.get("origin"), Some("legacy"));
    }
}
