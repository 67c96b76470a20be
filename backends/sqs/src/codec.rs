//! How a message travels through SNS and SQS: a CloudEvent in binary content mode, after the
//! CloudEvents SNS binding draft (0.4-wip, withdrawn; no SQS binding exists): the data is the
//! body, every context attribute is a `String` message attribute named `ce_<attribute>`, user
//! headers are message attributes of their own name — within SQS's 10 attributes per message,
//! which raw message delivery passes on.
//!
//! | attribute | field |
//! |---|---|
//! | `ce_specversion` | `1.0` |
//! | `ce_id`, `ce_time` (RFC 3339, nanoseconds) | id, time |
//! | `ce_source`, `ce_type` | source, type; `/busbar` and `busbar.message` when unset (read back unset) |
//! | `ce_datacontenttype`, `ce_partitionkey` | content type, key (also the FIFO `MessageGroupId`), where set |
//! | `ce_correlationid`, `ce_causationid`, `ce_dataversion` | busbar's extension attributes |
//! | `ce_datacontentencoding` | `base64` when the body is the base64 of the payload (it is not valid SQS text; the draft's attribute), `empty` for an empty payload (SNS refuses empty bodies; the body is `-`) |
//! | other attributes | the message headers, one attribute each |
//! | `busbar_headers` | headers that do not fit: a JSON array of `[name, value]` pairs |
//!
//! A header travels in `busbar_headers` when its name is not a valid attribute name or is
//! reserved (`ce_*`, `busbar_headers`, `busbar.*`, `AWS.*`, `Amazon.*`), when its value is
//! empty or holds characters SQS refuses (JSON escapes them), or when the attributes would pass 10: the headers fill the attributes left in
//! order (extension attributes first) and the rest share the last one. Empty strings cannot
//! be attribute values: an empty key or content type travels as absent.
//!
//! Messages of older busbar versions (attributes `busbar.id`, `busbar.key`, `ce.type`, …)
//! still decode.

use std::borrow::Cow;
use std::collections::HashMap;

use aws_sdk_sns::types::MessageAttributeValue as SnsValue;
use aws_sdk_sqs::types::MessageAttributeValue as SqsValue;
use base64::Engine;
use busbar_core::raw::cloudevents;
use busbar_core::{Error, ErrorKind, Headers, Message, Result};
use bytes::Bytes;
use chrono::DateTime;

use crate::BACKEND;

/// The prefix of the CloudEvents attributes.
const CE: &str = "ce_";
/// How the body holds the payload (`base64`, `empty`; absent = as it is).
const ENCODING: &str = "ce_datacontentencoding";
/// The headers that do not fit in attributes of their own.
const HEADERS: &str = "busbar_headers";
/// SQS's (and raw delivery's) limit of message attributes per message.
const MAX_ATTRIBUTES: usize = 10;
/// The `MessageGroupId` of a FIFO message without key: a group of its own.
const KEYLESS: &str = "busbar-keyless-";

/// The most bytes SNS accepts for one message: body plus attribute names, types and values
/// (also the limit of a whole `PublishBatch` call).
pub(crate) const SNS_MAX_BYTES: usize = 262_144;

/// A message in its SNS form.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    /// The body.
    pub(crate) body: String,
    /// `(name, value)`; every value is a `String` attribute.
    pub(crate) attributes: Vec<(String, String)>,
    /// What SNS counts against [`SNS_MAX_BYTES`].
    pub(crate) size: usize,
    /// FIFO `MessageGroupId`: the key, or a group of its own for a message without key.
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

/// Whether a header named `name` can be a message attribute of its own name: SQS's rules
/// for attribute names, and none of the names busbar reads itself.
fn native_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (1..=256).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !lower.starts_with(CE)
        && !lower.starts_with("busbar.")
        && lower != HEADERS
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg).with_backend(BACKEND)
}

/// Encodes `m`; `PayloadTooLarge` when SNS would refuse its size.
pub(crate) fn encode(m: &Message) -> Result<Encoded> {
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
    let mut attributes: Vec<(String, String)> = Vec::with_capacity(MAX_ATTRIBUTES);
    let mut extensions = Vec::new();
    for (name, value) in cloudevents::attributes(m) {
        let value = match (name, value) {
            ("source", v) if v.is_empty() => Cow::Borrowed(busbar_core::envelope::DEFAULT_SOURCE),
            ("type", v) if v.is_empty() => Cow::Borrowed(busbar_core::envelope::DEFAULT_TYPE),
            (_, v) if v.is_empty() => continue,
            (_, v) => v,
        };
        let pair = (format!("{CE}{name}"), value.into_owned());
        if cloudevents::is_extension(name) {
            extensions.push(pair);
        } else {
            attributes.push(pair);
        }
    }
    if let Some(enc) = encoding {
        attributes.push((ENCODING.to_owned(), enc.to_owned()));
    }
    add_headers(m, extensions, &mut attributes)?;
    if let Some((name, _)) = attributes.iter().find(|(_, v)| !is_sqs_text(v)) {
        return Err(invalid(format!(
            "message {}: the {name} attribute holds characters SQS does not accept",
            m.id
        )));
    }
    let size = sns_size(m, &body, &attributes, encoding == Some("base64"))?;
    let (dedup_id, group_id) = dedup_and_group(m);
    Ok(Encoded {
        body,
        attributes,
        size,
        group_id,
        dedup_id,
    })
}

/// Adds the headers to `attributes`: extension attributes first, then the user's, one
/// attribute each while there is room; what does not fit (or cannot be an attribute) shares
/// `busbar_headers` (JSON).
fn add_headers(
    m: &Message,
    mut native: Vec<(String, String)>,
    attributes: &mut Vec<(String, String)>,
) -> Result<()> {
    let mut overflow: Vec<(&str, &str)> = Vec::new();
    for (name, value) in m
        .headers
        .iter()
        .filter(|(n, _)| !cloudevents::is_extension(n))
    {
        if native_name(name) && !value.is_empty() && is_sqs_text(value) {
            native.push((name.to_owned(), value.to_owned()));
        } else {
            overflow.push((name, value));
        }
    }
    let room = MAX_ATTRIBUTES - attributes.len();
    let shared = if native.len() + usize::from(!overflow.is_empty()) > room {
        native.split_off(room - 1)
    } else {
        Vec::new()
    };
    attributes.extend(native);
    let mut shared: Vec<(&str, &str)> = shared
        .iter()
        .map(|(n, v)| {
            (
                n.strip_prefix(CE)
                    .filter(|e| cloudevents::is_extension(e))
                    .unwrap_or(n),
                v.as_str(),
            )
        })
        .collect();
    shared.extend(overflow);
    if !shared.is_empty() {
        let json = serde_json::to_string(&shared)
            .map_err(|e| invalid(format!("cannot encode the headers as JSON: {e}")))?;
        attributes.push((HEADERS.to_owned(), json));
    }
    Ok(())
}

/// The size SNS counts (body and attributes); `PayloadTooLarge` over its limit.
fn sns_size(
    m: &Message,
    body: &str,
    attributes: &[(String, String)],
    base64: bool,
) -> Result<usize> {
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
                if base64 { " in base64" } else { "" }
            ),
        )
        .with_backend(BACKEND));
    }
    Ok(size)
}

/// The FIFO deduplication id (from the id and headers: a retried publish is deduplicated,
/// another message is not) and `MessageGroupId` (the key).
fn dedup_and_group(m: &Message) -> (String, String) {
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
        Some(k)
            if k.len() <= 128
                && k.chars().all(|c| c.is_ascii_graphic())
                && !k.starts_with(KEYLESS) =>
        {
            k.to_owned()
        }
        // MessageGroupId takes 1-128 printable ASCII characters; other keys are hashed
        // (stable, so order per key still holds; the key itself is ce_partitionkey).
        Some(k) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, k.as_bytes()).to_string(),
        None => format!("{KEYLESS}{dedup_id}"),
    };
    (dedup_id, group_id)
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
                .map(|value| (n.clone(), value))
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
                .map(|value| (n.clone(), value))
                .map_err(|err| invalid(format!("attribute {n}: {err}")))
        })
        .collect()
}

fn decode_error(msg: String) -> Error {
    Error::new(ErrorKind::Decode, msg).with_backend(BACKEND)
}

/// Decodes a received SQS message: busbar's or any other producer's, with or without
/// CloudEvents attributes. What is missing comes from SQS: without `ce_id` the id is
/// `sqs-<MessageId>` (the same on every receive), without `ce_time` the send time, without
/// `ce_partitionkey` the FIFO `MessageGroupId` is the key (so another program's messages keep
/// their place in per-key order too). Errors (the message is then delivered raw and
/// dead-lettered): a body that is not the base64 it says it is, a broken `busbar_headers`,
/// a message of an older busbar with broken attributes.
pub(crate) fn decode(
    body: &str,
    attributes: Option<&HashMap<String, SqsValue>>,
    foreign: &Foreign<'_>,
) -> Result<Message> {
    let empty = HashMap::new();
    let attributes = attributes.unwrap_or(&empty);
    if attributes.contains_key(legacy::ID) {
        return legacy::decode(body, attributes);
    }
    let mut m = decode_foreign_parts(body, foreign);
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    let (mut headers, mut shared, mut encoding) = (Headers::new(), None, None);
    let mut keyed = false;
    for name in names {
        let Some(value) = attributes.get(name).and_then(|v| v.string_value()) else {
            continue;
        };
        let lower = name.to_ascii_lowercase();
        if lower == ENCODING {
            encoding = Some(value);
        } else if lower == HEADERS {
            shared = Some(value);
        } else if let Some(attribute) = lower.strip_prefix(CE) {
            keyed |= attribute == "partitionkey";
            match cloudevents::set_attribute(&mut m, attribute, value.to_owned()) {
                Ok(true) => {}
                Ok(false) => headers.insert(name.as_str(), value),
                Err(e) => tracing::debug!(error = %e, "sqs: using the send time"),
            }
        } else {
            headers.insert(name.as_str(), value);
        }
    }
    if !keyed {
        m.key = foreign
            .group_id
            .filter(|g| !g.starts_with(KEYLESS))
            .map(str::to_owned);
    }
    m.payload = match encoding {
        None => Bytes::copy_from_slice(body.as_bytes()),
        Some("empty") => Bytes::new(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body)
            .map(Bytes::from)
            .map_err(|e| decode_error(format!("message {}: invalid base64 body: {e}", m.id)))?,
        Some(other) => {
            // Another producer's encoding: the body as it is, the attribute as a header.
            headers.insert(ENCODING, other);
            Bytes::copy_from_slice(body.as_bytes())
        }
    };
    // set_attribute put the extensions into m.headers; they come after the plain ones.
    for (n, v) in m.headers.iter() {
        headers.insert(n, v);
    }
    if let Some(json) = shared {
        let pairs = serde_json::from_str::<Vec<(String, String)>>(json)
            .map_err(|e| decode_error(format!("message {}: invalid {HEADERS}: {e}", m.id)))?;
        for (n, v) in pairs {
            headers.insert(n, v);
        }
    }
    m.headers = headers;
    Ok(m)
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

/// A message as SQS describes it, before its attributes are read: the body as payload,
/// SQS's `MessageId` as id (`sqs-<MessageId>`, stable across receives), the send time.
fn decode_foreign_parts(body: &str, f: &Foreign<'_>) -> Message {
    let mut m = Message::new(Bytes::copy_from_slice(body.as_bytes()));
    if let Some(id) = f.message_id {
        m.id = format!("sqs-{id}");
    }
    if let Some(t) = f
        .sent_ms
        .and_then(|ms| ms.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
    {
        m.time = t;
    }
    m
}

/// A message [`decode`] cannot read, as it is: the body as payload, `sqs-<MessageId>` as id,
/// the FIFO `MessageGroupId` as key (it keeps its place in per-key order), the send time,
/// and every string attribute as a header. It is never left to block its key: busbar's
/// dead-letter path takes it.
pub(crate) fn decode_foreign(
    body: &str,
    attributes: &HashMap<String, SqsValue>,
    f: &Foreign<'_>,
) -> Message {
    let mut m = decode_foreign_parts(body, f);
    m.key = f
        .group_id
        .filter(|g| !g.starts_with(KEYLESS))
        .map(str::to_owned);
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    for name in names {
        if let Some(v) = attributes.get(name).and_then(|v| v.string_value()) {
            m.headers.insert(name.as_str(), v);
        }
    }
    m
}

/// Messages of busbar before CloudEvents binary mode (still in queues after an upgrade).
mod legacy {
    use super::*;
    use chrono::Utc;

    pub(super) const ID: &str = "busbar.id";
    const KEY: &str = "busbar.key";
    const TYPE: &str = "ce.type";
    const SOURCE: &str = "ce.source";
    const CONTENT_TYPE: &str = "ce.datacontenttype";
    const TIME: &str = "ce.time";
    const HEADERS: &str = "busbar.headers";
    const ENCODING: &str = "busbar.encoding";

    pub(super) fn decode(body: &str, attributes: &HashMap<String, SqsValue>) -> Result<Message> {
        let get = |name: &str| attributes.get(name).and_then(|v| v.string_value());
        let id = get(ID).unwrap_or_default();
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
            a.group_id,
            format!("{KEYLESS}{}", a.dedup_id),
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
                legacy::ID.to_owned(),
                SqsValue::builder()
                    .data_type("String")
                    .string_value("x")
                    .build()
                    .expect("a"),
            ),
            (
                "busbar.encoding".to_owned(),
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

    fn text(v: &str) -> SqsValue {
        SqsValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .expect("attribute")
    }

    fn names(e: &Encoded) -> Vec<&str> {
        e.attributes.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn every_message_is_a_cloudevent_with_native_headers() {
        let m = Message::new("{}")
            .with_key("order-42")
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("tenant", "acme");
        let e = encode(&m).expect("encode");
        let get = |n: &str| {
            e.attributes
                .iter()
                .find(|(a, _)| a == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("ce_specversion"), Some("1.0"));
        assert_eq!(get("ce_id"), Some(m.id.as_str()));
        assert_eq!(get("ce_source"), Some("/busbar"));
        assert_eq!(get("ce_type"), Some("busbar.message"));
        assert!(get("ce_time").is_some());
        assert_eq!(get("ce_partitionkey"), Some("order-42"));
        assert_eq!(get("tenant"), Some("acme"));
        assert!(get("traceparent").is_some_and(|t| t.starts_with("00-")));
        assert_eq!(get(HEADERS), None, "everything fits: {:?}", names(&e));
        let back = decode(&e.body, Some(&as_sqs(&e)), &Foreign::default()).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn headers_beyond_ten_attributes_or_unfit_for_one_share_busbar_headers() {
        let mut m = Message::new(vec![0xffu8, 0, 1])
            .with_key("k")
            .with_type("order.created")
            .with_source("/shop")
            .with_content_type("application/octet-stream")
            .with_correlation_id("c-1")
            .with_version(3)
            .with_header("a", "1")
            .with_header("b", "2")
            .with_header("has space", "3")
            .with_header("ce_id", "a user header with a reserved name")
            .with_header("empty", "")
            .with_header("busbar_headers", "x");
        m.headers.insert("causationid", "p-1");
        let e = encode(&m).expect("encode");
        assert_eq!(e.attributes.len(), MAX_ATTRIBUTES, "{:?}", names(&e));
        assert_eq!(e.attributes.last().map(|(n, _)| n.as_str()), Some(HEADERS));
        let back = decode(&e.body, Some(&as_sqs(&e)), &Foreign::default()).expect("decode");
        assert_eq!(back, m);
        // Few headers but an unfit name: native ones stay native.
        let m = Message::new("x")
            .with_header("ok", "1")
            .with_header("no way", "2");
        let e = encode(&m).expect("encode");
        assert!(names(&e).contains(&"ok") && names(&e).contains(&HEADERS));
        let back = decode(&e.body, Some(&as_sqs(&e)), &Foreign::default()).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn keyless_messages_get_a_group_of_their_own_and_no_key() {
        let m = Message::new("x");
        let e = encode(&m).expect("encode");
        assert!(e.group_id.starts_with(KEYLESS));
        let f = Foreign {
            group_id: Some(&e.group_id),
            ..Foreign::default()
        };
        let back = decode(&e.body, Some(&as_sqs(&e)), &f).expect("decode");
        assert_eq!(back.key, None);
        // A key that is not a valid group id is hashed; ce_partitionkey keeps it.
        let m = Message::new("x").with_key("ключ");
        let e = encode(&m).expect("encode");
        let f = Foreign {
            group_id: Some(&e.group_id),
            ..Foreign::default()
        };
        let back = decode(&e.body, Some(&as_sqs(&e)), &f).expect("decode");
        assert_eq!(back.key.as_deref(), Some("ключ"));
    }

    #[test]
    fn other_producers_cloudevents_keep_their_attributes_and_headers() {
        let attrs = HashMap::from([
            ("ce_specversion".to_owned(), text("1.0")),
            ("ce_id".to_owned(), text("evt-1")),
            ("ce_source".to_owned(), text("/python")),
            ("ce_type".to_owned(), text("com.example.made")),
            ("ce_time".to_owned(), text("2026-11-30T10:00:00Z")),
            ("ce_datacontenttype".to_owned(), text("application/json")),
            ("ce_tenant".to_owned(), text("acme")),
            (
                "traceparent".to_owned(),
                text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
        ]);
        let f = Foreign {
            message_id: Some("m-1"),
            group_id: Some("order-7"),
            sent_ms: Some("1700000000123"),
        };
        let m = decode("{\"x\":1}", Some(&attrs), &f).expect("decoded");
        assert_eq!(m.id, "evt-1");
        assert_eq!(m.source.as_deref(), Some("/python"));
        assert_eq!(m.event_type.as_deref(), Some("com.example.made"));
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.time.to_rfc3339(), "2026-11-30T10:00:00+00:00");
        assert_eq!(
            m.key.as_deref(),
            Some("order-7"),
            "the FIFO group is the key"
        );
        assert_eq!(m.headers.get("ce_tenant"), Some("acme"));
        assert!(m.headers.get("traceparent").is_some());
        // Declared base64 that is not: a decode error (the message is dead-lettered raw).
        let mut broken = attrs.clone();
        broken.insert(ENCODING.to_owned(), text("base64"));
        let e = decode("%%% not base64", Some(&broken), &f).expect_err("broken");
        assert_eq!(e.kind(), ErrorKind::Decode);
        // Another producer's encoding: kept as a header, the body as it is.
        let mut gzip = attrs;
        gzip.insert(ENCODING.to_owned(), text("gzip"));
        let m = decode("raw", Some(&gzip), &f).expect("decoded");
        assert_eq!(m.headers.get(ENCODING), Some("gzip"));
        assert_eq!(m.payload.as_ref(), b"raw");
    }

    #[test]
    fn messages_of_older_busbar_still_decode() {
        let attrs = HashMap::from([
            (legacy::ID.to_owned(), text("old-1")),
            ("busbar.key".to_owned(), text("k")),
            ("ce.type".to_owned(), text("order.created")),
            ("ce.time".to_owned(), text("2026-11-01T00:00:00.000000001Z")),
            ("busbar.headers".to_owned(), text("[[\"tenant\",\"acme\"]]")),
            ("busbar.encoding".to_owned(), text("base64")),
        ]);
        let m = decode("AAEC", Some(&attrs), &Foreign::default()).expect("decoded");
        assert_eq!(m.id, "old-1");
        assert_eq!(m.key.as_deref(), Some("k"));
        assert_eq!(m.event_type.as_deref(), Some("order.created"));
        assert_eq!(m.payload.as_ref(), &[0, 1, 2]);
        assert_eq!(m.headers.get("tenant"), Some("acme"));
    }
}
