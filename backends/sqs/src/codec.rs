//! How a message travels through SNS and SQS: the payload is the body, the metadata are
//! message attributes (at most 8 of SQS's 10), passed on by raw message delivery.
//!
//! | attribute | field |
//! |---|---|
//! | `busbar.id` | `id` |
//! | `busbar.key` | partition key (also the FIFO `MessageGroupId`) |
//! | `ce.type`, `ce.source`, `ce.datacontenttype` | type, source, content type |
//! | `ce.time` | time, RFC 3339 with nanoseconds |
//! | `busbar.headers` | the headers, a JSON array of `[name, value]` pairs in order |
//! | `busbar.encoding` | `base64` when the body is the base64 of the payload (it is not valid SQS text), `empty` for an empty payload (SNS refuses empty bodies; the body is `-`) |
//!
//! Empty strings cannot be attribute values: an empty key, type, source or content type
//! travels as absent.

use std::collections::HashMap;

use aws_sdk_sns::types::MessageAttributeValue as SnsValue;
use aws_sdk_sqs::types::MessageAttributeValue as SqsValue;
use base64::Engine;
use busbar_core::{Error, ErrorKind, Headers, Message, Result};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::BACKEND;

const ID: &str = "busbar.id";
const KEY: &str = "busbar.key";
const TYPE: &str = "ce.type";
const SOURCE: &str = "ce.source";
const CONTENT_TYPE: &str = "ce.datacontenttype";
const TIME: &str = "ce.time";
const HEADERS: &str = "busbar.headers";
const ENCODING: &str = "busbar.encoding";

/// The most bytes SNS accepts for one message: body plus attribute names, types and values
/// (also the limit of a whole `PublishBatch` call).
pub(crate) const SNS_MAX_BYTES: usize = 262_144;

/// A message in its SNS form.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    /// The body.
    pub(crate) body: String,
    /// `(name, value)`; every value is a `String` attribute.
    pub(crate) attributes: Vec<(&'static str, String)>,
    /// What SNS counts against [`SNS_MAX_BYTES`].
    pub(crate) size: usize,
    /// FIFO `MessageGroupId`: the key, or the id for a message without key.
    pub(crate) group_id: String,
    /// FIFO `MessageDeduplicationId`: a UUIDv5 of the id and the headers, so a retried publish
    /// is dropped by SQS while a redrive (which adds a header) goes through.
    pub(crate) dedup_id: String,
}

/// Whether SQS accepts `s` as text (XML 1.0 characters).
fn is_sqs_text(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
    })
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg).with_backend(BACKEND)
}

/// Encodes `m`; `PayloadTooLarge` when SNS would refuse its size.
pub(crate) fn encode(m: &Message) -> Result<Encoded> {
    let mut attributes: Vec<(&'static str, String)> = Vec::with_capacity(8);
    let (body, encoding) = match std::str::from_utf8(&m.payload) {
        _ if m.payload.is_empty() => ("-".to_owned(), Some("empty")),
        Ok(text) if is_sqs_text(text) => (text.to_owned(), None),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
            Some("base64"),
        ),
    };
    if m.id.is_empty() {
        return Err(invalid("the message id is empty".into()));
    }
    attributes.push((ID, m.id.clone()));
    for (name, value) in [
        (KEY, &m.key),
        (TYPE, &m.event_type),
        (SOURCE, &m.source),
        (CONTENT_TYPE, &m.content_type),
    ] {
        if let Some(v) = value.as_ref().filter(|v| !v.is_empty()) {
            attributes.push((name, v.clone()));
        }
    }
    attributes.push((TIME, m.time.to_rfc3339_opts(SecondsFormat::Nanos, true)));
    if !m.headers.is_empty() {
        let pairs: Vec<(&str, &str)> = m.headers.iter().collect();
        let json = serde_json::to_string(&pairs)
            .map_err(|e| invalid(format!("cannot encode the headers as JSON: {e}")))?;
        attributes.push((HEADERS, json));
    }
    if let Some(enc) = encoding {
        attributes.push((ENCODING, enc.to_owned()));
    }
    if let Some((name, _)) = attributes.iter().find(|(_, v)| !is_sqs_text(v)) {
        return Err(invalid(format!(
            "message {}: the {name} attribute holds characters SQS does not accept",
            m.id
        )));
    }
    let size = body.len()
        + attributes
            .iter()
            .map(|(n, v)| n.len() + "String".len() + v.len())
            .sum::<usize>();
    if size > SNS_MAX_BYTES {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "message {} is {size} bytes as an SNS message (body{} and attributes); SNS accepts {SNS_MAX_BYTES}",
                m.id,
                if encoding == Some("base64") { " in base64" } else { "" }
            ),
        )
        .with_backend(BACKEND));
    }
    let mut dedup_source = m.id.clone().into_bytes();
    for (n, v) in m.headers.iter() {
        dedup_source.extend(
            [0].iter()
                .chain(n.as_bytes())
                .chain(&[0])
                .chain(v.as_bytes()),
        );
    }
    let dedup_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &dedup_source).to_string();
    let group_id = match m.key.as_deref().filter(|k| !k.is_empty()) {
        Some(k) if k.len() <= 128 && k.chars().all(|c| c.is_ascii_graphic()) => k.to_owned(),
        // MessageGroupId takes 1-128 printable ASCII characters; other keys are hashed
        // (stable, so order per key still holds).
        Some(k) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, k.as_bytes()).to_string(),
        None => dedup_id.clone(),
    };
    Ok(Encoded {
        body,
        attributes,
        size,
        group_id,
        dedup_id,
    })
}

/// The attributes of `e` as SNS wants them.
pub(crate) fn sns_attributes(e: &Encoded) -> Result<HashMap<String, SnsValue>> {
    e.attributes
        .iter()
        .map(|(n, v)| {
            SnsValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .map(|value| ((*n).to_owned(), value))
                .map_err(|err| invalid(format!("attribute {n}: {err}")))
        })
        .collect()
}

/// The attributes of `e` as SQS wants them (a delayed publish goes to the queues directly).
pub(crate) fn sqs_attributes(e: &Encoded) -> Result<HashMap<String, SqsValue>> {
    e.attributes
        .iter()
        .map(|(n, v)| {
            SqsValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .map(|value| ((*n).to_owned(), value))
                .map_err(|err| invalid(format!("attribute {n}: {err}")))
        })
        .collect()
}

fn decode_error(msg: String) -> Error {
    Error::new(ErrorKind::Decode, msg).with_backend(BACKEND)
}

/// Decodes a received SQS message.
pub(crate) fn decode(
    body: &str,
    attributes: Option<&HashMap<String, SqsValue>>,
    foreign: &Foreign<'_>,
) -> Result<Message> {
    let empty = HashMap::new();
    let attributes = attributes.unwrap_or(&empty);
    let get = |name: &str| attributes.get(name).and_then(|v| v.string_value());
    let Some(id) = get(ID) else {
        return Ok(decode_foreign(body, attributes, foreign));
    };
    let payload = match get(ENCODING) {
        None => Bytes::copy_from_slice(body.as_bytes()),
        Some("empty") => Bytes::new(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body)
            .map(Bytes::from)
            .map_err(|e| decode_error(format!("message {id}: invalid base64 body: {e}")))?,
        Some(other) => {
            return Err(decode_error(format!(
                "message {id}: unknown busbar.encoding {other:?}"
            )))
        }
    };
    let time = match get(TIME) {
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map_err(|e| decode_error(format!("message {id}: invalid ce.time {t:?}: {e}")))?
            .with_timezone(&Utc),
        None => Utc::now(),
    };
    let headers = match get(HEADERS) {
        Some(json) => serde_json::from_str::<Vec<(String, String)>>(json)
            .map_err(|e| decode_error(format!("message {id}: invalid busbar.headers: {e}")))?
            .into_iter()
            .collect(),
        None => Headers::new(),
    };
    let text = |name: &str| get(name).map(str::to_owned);
    Ok(Message {
        id: id.to_owned(),
        key: text(KEY),
        payload,
        headers,
        event_type: text(TYPE),
        source: text(SOURCE),
        time,
        content_type: text(CONTENT_TYPE),
    })
}

/// What SQS says of a received message besides its body and attributes: what a message no
/// busbar client published is described with.
#[derive(Debug, Default)]
pub(crate) struct Foreign<'a> {
    /// SQS's `MessageId`: the same on every receive of the message.
    pub(crate) message_id: Option<&'a str>,
    /// `MessageGroupId` (FIFO queues): the message's key.
    pub(crate) group_id: Option<&'a str>,
    /// `SentTimestamp`, in milliseconds since the epoch.
    pub(crate) sent_ms: Option<&'a str>,
}

/// A message without `busbar.id` (sent by another SQS or SNS client) is delivered as it is:
/// the body as payload, SQS's `MessageId` as id (`sqs-<MessageId>`, stable across receives),
/// the FIFO `MessageGroupId` as key (so per-key order holds for it too), the send time, and
/// its string attributes as headers. It is never left to block its key.
pub(crate) fn decode_foreign(
    body: &str,
    attributes: &HashMap<String, SqsValue>,
    f: &Foreign<'_>,
) -> Message {
    let mut m = Message::new(Bytes::copy_from_slice(body.as_bytes()));
    if let Some(id) = f.message_id {
        m.id = format!("sqs-{id}");
    }
    m.key = f.group_id.map(str::to_owned);
    if let Some(t) = f
        .sent_ms
        .and_then(|ms| ms.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
    {
        m.time = t;
    }
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    for name in names {
        if let Some(v) = attributes.get(name).and_then(|v| v.string_value()) {
            m.headers.insert(name.as_str(), v);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_sqs(e: &Encoded) -> HashMap<String, SqsValue> {
        sqs_attributes(e).expect("attributes")
    }

    #[test]
    fn round_trips_text_binary_and_empty_payloads() {
        for payload in [
            Bytes::from_static(b"{\"order\":42}"),
            Bytes::from((0..=255u8).collect::<Vec<u8>>()),
            Bytes::new(),
            Bytes::from_static("naïve \u{1F600}\r\n".as_bytes()),
        ] {
            let m = Message::new(payload)
                .with_key("order-42")
                .with_type("order.created")
                .with_source("/billing")
                .with_content_type("application/json")
                .with_header("tenant", "acme")
                .with_header("trace", "a\"b\u{1}");
            let e = encode(&m).expect("encode");
            assert!(e.attributes.len() <= 10);
            assert!(!e.body.is_empty());
            let back = decode(&e.body, Some(&as_sqs(&e)), &Foreign::default()).expect("decode");
            assert_eq!(back, m);
            assert_eq!(e.group_id, "order-42");
        }
    }

    #[test]
    fn dedup_id_changes_with_headers_not_with_retries() {
        let m = Message::new("x").with_id("id-1");
        let a = encode(&m).expect("a");
        let b = encode(&m).expect("b");
        assert_eq!(a.dedup_id, b.dedup_id);
        let redriven = encode(&m.clone().with_header("busbar-redriven-from", "t.dlq")).expect("c");
        assert_ne!(a.dedup_id, redriven.dedup_id);
        assert_eq!(
            a.group_id, a.dedup_id,
            "keyless messages get their own group"
        );
        let odd_key = encode(&m.with_key("ключ")).expect("d");
        assert!(odd_key.group_id.is_ascii() && odd_key.group_id.len() <= 128);
    }

    #[test]
    fn oversized_messages_are_payload_too_large() {
        let e = encode(&Message::new(vec![0u8; 200_000])).expect_err("base64 grows it");
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        assert!(encode(&Message::new(vec![b'a'; 250_000])).is_ok());
    }

    #[test]
    fn foreign_messages_are_delivered_as_they_are() {
        let attrs = HashMap::from([(
            "origin".to_owned(),
            SqsValue::builder()
                .data_type("String")
                .string_value("legacy")
                .build()
                .expect("attribute"),
        )]);
        let f = Foreign {
            message_id: Some("5fea7756-0ea4-451a-a703-a558b933e274"),
            group_id: Some("order-7"),
            sent_ms: Some("1700000000123"),
        };
        let m = decode("{\"total\":1}", Some(&attrs), &f).expect("delivered");
        assert_eq!(m.id, "sqs-5fea7756-0ea4-451a-a703-a558b933e274");
        assert_eq!(m.payload.as_ref(), b"{\"total\":1}");
        assert_eq!(m.key.as_deref(), Some("order-7"));
        assert_eq!(m.headers.get("origin"), Some("legacy"));
        assert_eq!(m.time.timestamp_millis(), 1_700_000_000_123);
        // The same message received again gets the same id.
        let again = decode("{\"total\":1}", Some(&attrs), &f).expect("again");
        assert_eq!(again.id, m.id);
        // A busbar message with a broken envelope is still a decode error.
        let broken = HashMap::from([
            (
                ID.to_owned(),
                SqsValue::builder()
                    .data_type("String")
                    .string_value("x")
                    .build()
                    .expect("a"),
            ),
            (
                ENCODING.to_owned(),
                SqsValue::builder()
                    .data_type("String")
                    .string_value("rot13")
                    .build()
                    .expect("b"),
            ),
        ]);
        let e = decode("x", Some(&broken), &f).expect_err("unknown encoding");
        assert_eq!(e.kind(), ErrorKind::Decode);
    }
}
