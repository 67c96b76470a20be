//! How a message travels as an AMQP 0-9-1 message: CloudEvents 1.0 binary content mode in the
//! RabbitMQ protocol binding's form (knative eventing-rabbitmq; what the CloudEvents SDKs'
//! RabbitMQ bindings read and write): the payload is the body, every context attribute a
//! `ce-` header holding a string, `datacontenttype` the `content_type` property. (The AMQP
//! binding's `cloudEvents:` names are AMQP 1.0 application properties; RabbitMQ's 0-9-1
//! clients and tools use the `ce-` form.)
//!
//! | AMQP | field |
//! |---|---|
//! | header `ce-specversion` | `1.0` |
//! | header `ce-id` (and property `message_id`) | id |
//! | header `ce-source`, `ce-type` (and property `type` when set) | source, type; `/busbar` and `busbar.message` when unset (read back unset) |
//! | header `ce-time` (and property `timestamp`, seconds) | time, RFC 3339 with nanoseconds |
//! | property `content_type` | content type |
//! | header `ce-partitionkey` | partition key (absent when none) |
//! | header `ce-correlationid`, `ce-causationid`, `ce-dataversion` | busbar's extension attributes |
//! | header `<name>` | each message header (a long string); a name that clashes (`ce-*`, `x-*`, `busbar-*`) travels as `busbar-h-<name>` |
//!
//! AMQP field tables are maps: the order of different header names is not kept. Header names
//! are AMQP short strings (at most 255 bytes): a longer one is `InvalidInput` at publish, before
//! anything of the batch is sent. Messages are persistent (delivery mode 2). A message another
//! client wrote is delivered with what it has: its `ce-` attributes, properties and string or
//! number headers (RabbitMQ's `x-` headers left out); without an id of its own it gets
//! `amqp-<UUIDv5 of its body and properties>` (the same on every delivery; two byte-identical
//! messages share it). An attribute that cannot be read (a `ce-time` that is not RFC 3339) stays a
//! header under its wire name. Messages of busbar before CloudEvents mode (`busbar-time`,
//! `busbar-headers`) still decode.

use busbar_core::dead_letter::headers as dlq_headers;
use busbar_core::raw::cloudevents;
use busbar_core::{ErrorKind, Message};
use chrono::DateTime;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

const CE: &str = "ce-";
const ESCAPED: &str = "busbar-h-";

/// Whether a message header named `name` needs the `busbar-h-` form.
fn escaped_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with(CE) || lower.starts_with("x-") || lower.starts_with("busbar-")
}

/// A header name too long for AMQP (checked for a whole batch before anything is sent).
pub(crate) fn check(m: &Message) -> busbar_core::Result<()> {
    for (name, _) in m.headers.iter() {
        let len = if escaped_name(name) { ESCAPED.len() } else { 0 } + name.len();
        if len > 255 {
            return Err(busbar_core::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "message {}: header name of {len} bytes; AMQP header names are at most 255",
                    m.id
                ),
            )
            .with_backend(crate::BACKEND));
        }
    }
    Ok(())
}

/// The properties of `m` (checked with [`check`]).
pub(crate) fn encode(m: &Message) -> BasicProperties {
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        h.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    };
    for (name, value) in cloudevents::attributes(m) {
        if name != "datacontenttype" {
            put(&format!("{CE}{name}"), &value);
        }
    }
    for (name, value) in m
        .headers
        .iter()
        .filter(|(n, _)| !cloudevents::is_extension(n))
    {
        if escaped_name(name) {
            put(&format!("{ESCAPED}{name}"), value);
        } else {
            put(name, value);
        }
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
    let mut m = Message::new(body);
    m.id = match props.message_id() {
        Some(s) => s.as_str().to_owned(),
        None => foreign_id(props, &m.payload),
    };
    m.event_type = props.kind().as_ref().map(|s| s.as_str().to_owned());
    m.content_type = props.content_type().as_ref().map(|s| s.as_str().to_owned());
    if let Some(ts) = props.timestamp() {
        if let Some(t) = DateTime::from_timestamp(*ts as i64, 0) {
            m.time = t;
        }
    }
    let Some(h) = props.headers() else {
        return m;
    };
    let get = |k: &str| h.inner().get(k).and_then(text);
    if h.inner().contains_key(legacy::TIME) || h.inner().contains_key(legacy::HEADERS) {
        legacy::read(&mut m, &get);
    } else {
        let mut names: Vec<(&str, String)> = h
            .inner()
            .iter()
            .filter(|(k, _)| !k.as_str().starts_with("x-"))
            .filter_map(|(k, v)| {
                Some((
                    k.as_str(),
                    text(v).or_else(|| number(v).map(|n| n.to_string()))?,
                ))
            })
            .collect();
        names.sort();
        for (name, value) in names {
            let lower = name.to_ascii_lowercase();
            if let Some(attribute) = lower.strip_prefix(CE) {
                match cloudevents::set_attribute(&mut m, attribute, value.clone()) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => m.headers.insert(name, value),
                }
            } else if lower.starts_with(ESCAPED) {
                m.headers.insert(&name[ESCAPED.len()..], value);
            } else {
                m.headers.insert(name, value);
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
    m
}

/// The form of busbar before CloudEvents binary mode (read only).
mod legacy {
    use busbar_core::{Headers, Message};
    use chrono::{DateTime, Utc};

    pub(super) const TIME: &str = "busbar-time";
    pub(super) const HEADERS: &str = "busbar-headers";

    pub(super) fn read(m: &mut Message, get: &dyn Fn(&str) -> Option<String>) {
        m.key = get("busbar-key");
        m.source = get("busbar-source");
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let m = Message::new(vec![0u8, 255])
            .with_key("ключ-1")
            .with_type("t")
            .with_source("/s")
            .with_content_type("text/plain")
            .with_correlation_id("c")
            .with_header("b", "2")
            .with_header("a", "")
            .with_header("x-mine", "escaped")
            .with_header("traceparent", "00-abc-def-01");
        assert_eq!(decode(&encode(&m), m.payload.to_vec()), m);
        let bare = Message::new("x");
        assert_eq!(decode(&encode(&bare), bare.payload.to_vec()), bare);
    }

    /// What the RabbitMQ binding's readers see: `ce-` string headers, the content type as the
    /// property, user headers under their own names.
    #[test]
    fn the_wire_is_a_cloudevent() {
        let m = Message::new("x")
            .with_content_type("application/json")
            .with_header("traceparent", "00-abc-def-01");
        let p = encode(&m);
        let h = p.headers().clone().unwrap_or_default();
        let get = |k: &str| h.inner().get(k).and_then(text);
        assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce-id"), Some(m.id.clone()));
        assert_eq!(get("ce-source").as_deref(), Some("/busbar"));
        assert_eq!(get("ce-type").as_deref(), Some("busbar.message"));
        assert!(get("ce-time").is_some());
        assert_eq!(get("traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let long = Message::new("x").with_header("n".repeat(256), "v");
        assert_eq!(
            check(&long).map_err(|e| e.kind()),
            Err(ErrorKind::InvalidInput)
        );
    }

    #[test]
    fn messages_of_older_busbar_still_decode() {
        let mut h = FieldTable::default();
        let mut put = |k: &str, v: &str| {
            h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
        };
        put("busbar-key", "k");
        put("busbar-time", "2026-01-02T03:04:05.000000006Z");
        put("busbar-headers", r#"[["b","2"]]"#);
        let p = BasicProperties::default()
            .with_message_id("old-1".into())
            .with_headers(h);
        let m = decode(&p, b"x".to_vec());
        assert_eq!((m.id.as_str(), m.key.as_deref()), ("old-1", Some("k")));
        assert_eq!(m.headers.get("b"), Some("2"));
        assert_eq!(m.time.timestamp_subsec_nanos(), 6);
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
