//! How a message travels as a Kafka record, in the CloudEvents Kafka protocol binding's
//! binary mode, so that non-busbar consumers read it as a CloudEvent:
//!
//! | record part | field |
//! |---|---|
//! | key | partition key (`partitionkey`); absent when none |
//! | value | payload |
//! | timestamp (CreateTime) | `time`, in milliseconds |
//! | header `ce_specversion` | `1.0` |
//! | header `ce_id`, `ce_time` (RFC 3339, nanoseconds) | id, time |
//! | header `ce_source`, `ce_type` | source, type; `/busbar` and `busbar.message` when unset (read back unset) |
//! | header `content-type` | content type |
//! | header `ce_correlationid`, `ce_causationid`, `ce_dataversion` | busbar's extension attributes |
//! | other headers | the message headers, in order; a header whose own name would clash with the above (`ce_*`, `content-type`, `busbar-h-*`) travels as `busbar-h-<name>` |
//!
//! Records written by other producers decode too: without `ce_id` the id is
//! `<topic>/<partition>/<offset>`, without `ce_time` the time is the record timestamp, a
//! `ce_partitionkey` without a record key is the key, other `ce_*` attributes are headers.
//!
//! **Binary keys and header values** (a schema-registry key `00 00 00 00 07 …`) keep their exact
//! bytes: a record key that is not UTF-8 is delivered as its base64 text with the header
//! `busbar-key-encoding: base64`, header values that are not UTF-8 as base64 text, their names
//! listed in the header `busbar-binary-headers` (a JSON array). Publishing such a message (a
//! dead letter, a redrive) writes the original bytes again — the same key, so the same
//! partition — and neither marker header.

use std::borrow::Cow;

use base64::Engine as _;
use busbar_core::raw::cloudevents;
use busbar_core::{Headers, Message};
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message as _;

const CE: &str = "ce_";
const CONTENT_TYPE: &str = "content-type";
const ESCAPED: &str = "busbar-h-";
/// `base64` when the message key is the base64 of a binary record key.
pub(crate) const KEY_ENCODING: &str = "busbar-key-encoding";
/// The names of the headers whose values are the base64 of binary header values (JSON array).
pub(crate) const BINARY_HEADERS: &str = "busbar-binary-headers";

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// The record key of `m`: its exact bytes again when it came from a binary key.
pub(crate) fn record_key(m: &Message) -> Option<Cow<'_, [u8]>> {
    let key = m.key.as_deref()?;
    if m.headers.get(KEY_ENCODING) == Some("base64") {
        if let Ok(bytes) = b64().decode(key) {
            return Some(Cow::Owned(bytes));
        }
    }
    Some(Cow::Borrowed(key.as_bytes()))
}

fn reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("ce_") || lower == CONTENT_TYPE || lower.starts_with(ESCAPED)
}

/// The Kafka headers of `m`.
pub(crate) fn encode_headers(m: &Message) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(6 + m.headers.len());
    let mut add = |key: &str, value: &str| {
        h = std::mem::take(&mut h).insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    };
    for (name, value) in cloudevents::attributes(m) {
        match name {
            "datacontenttype" => add(CONTENT_TYPE, &value),
            // The record key.
            "partitionkey" => {}
            _ => add(&format!("{CE}{name}"), &value),
        }
    }
    let binary: Vec<String> = m
        .headers
        .get(BINARY_HEADERS)
        .and_then(|list| serde_json::from_str(list).ok())
        .unwrap_or_default();
    for (name, value) in m.headers.iter().filter(|(n, _)| {
        !cloudevents::is_extension(n) && *n != KEY_ENCODING && *n != BINARY_HEADERS
    }) {
        let key: Cow<'_, str> = if reserved(name) {
            Cow::Owned(format!("{ESCAPED}{name}"))
        } else {
            Cow::Borrowed(name)
        };
        let bytes = binary
            .iter()
            .any(|b| b == name)
            .then(|| b64().decode(value).ok())
            .flatten();
        h = std::mem::take(&mut h).insert(Header {
            key: &key,
            value: Some(bytes.as_deref().unwrap_or(value.as_bytes())),
        });
    }
    h
}

/// Where a record came from, for the id of records without `ce_id`.
pub(crate) struct Origin<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// Rebuilds a message from a Kafka record.
pub(crate) fn decode(record: &BorrowedMessage<'_>) -> Message {
    let origin = Origin {
        topic: record.topic(),
        partition: record.partition(),
        offset: record.offset(),
    };
    let payload = Bytes::copy_from_slice(record.payload().unwrap_or_default());
    let timestamp = record.timestamp().to_millis();
    let headers = record
        .headers()
        .map(|h| {
            h.iter()
                .map(|header| (header.key, header.value.unwrap_or_default()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    decode_parts(origin, record.key(), payload, timestamp, &headers)
}

/// Rebuilds a message from the parts of a record: its key and header values as bytes (binary
/// ones become base64 text, marked so that publishing restores the bytes).
pub(crate) fn decode_parts(
    origin: Origin<'_>,
    key: Option<&[u8]>,
    payload: Bytes,
    timestamp_ms: Option<i64>,
    raw_headers: &[(&str, &[u8])],
) -> Message {
    let mut binary = Vec::new();
    let mut header_pairs = Vec::with_capacity(raw_headers.len() + 2);
    for (name, value) in raw_headers {
        match std::str::from_utf8(value) {
            Ok(text) => header_pairs.push(((*name).to_owned(), text.to_owned())),
            Err(_) => {
                binary.push(*name);
                header_pairs.push(((*name).to_owned(), b64().encode(value)));
            }
        }
    }
    let key = key.map(|k| match std::str::from_utf8(k) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            header_pairs.push((KEY_ENCODING.to_owned(), "base64".to_owned()));
            b64().encode(k)
        }
    });
    if !binary.is_empty() {
        header_pairs.push((
            BINARY_HEADERS.to_owned(),
            serde_json::Value::from(binary).to_string(),
        ));
    }
    let mut m = Message::new(payload);
    m.id = format!("{}/{}/{}", origin.topic, origin.partition, origin.offset);
    m.key = key;
    if let Some(t) = timestamp_ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single()) {
        m.time = t;
    }
    let mut headers = Headers::new();
    for (name, value) in header_pairs {
        if name == CONTENT_TYPE {
            m.content_type = Some(value);
        } else if let Some(attribute) = name.strip_prefix(CE) {
            if attribute == "partitionkey" && m.key.is_some() {
                continue;
            }
            match cloudevents::set_attribute(&mut m, attribute, value.clone()) {
                Ok(true) => {}
                Ok(false) => headers.insert(name, value),
                Err(e) => tracing::debug!(error = %e, "kafka: using the record timestamp"),
            }
        } else {
            match name.strip_prefix(ESCAPED) {
                Some(original) => headers.insert(original, value),
                None => headers.insert(name, value),
            }
        }
    }
    // set_attribute put the extensions into m.headers; they come after the plain ones.
    for (n, v) in m.headers.iter() {
        headers.insert(n, v);
    }
    m.headers = headers;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(h: &OwnedHeaders) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    fn refs(r: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
        r.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect()
    }

    fn pairs(h: &OwnedHeaders) -> Vec<(String, String)> {
        h.iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect()
    }

    fn origin() -> Origin<'static> {
        Origin {
            topic: "t",
            partition: 3,
            offset: 17,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let m = Message::new(vec![0u8, 255])
            .with_key("k")
            .with_type("order.created")
            .with_source("/billing")
            .with_content_type("application/json")
            .with_correlation_id("c-1")
            .with_header("b", "2")
            .with_header("ce_id", "user header with a reserved name")
            .with_header("Content-Type", "also reserved")
            .with_header("a", "");
        let h = encode_headers(&m);
        let back = decode_parts(
            origin(),
            m.key.as_deref().map(str::as_bytes),
            m.payload.clone(),
            Some(1),
            &refs(&raw(&h)),
        );
        assert_eq!(back, m);
        let p = pairs(&h);
        assert!(p.contains(&("ce_specversion".into(), "1.0".into())));
        assert!(p.contains(&("ce_correlationid".into(), "c-1".into())));
        // Unset source and type: a valid CloudEvent still (they were left out before).
        let bare = pairs(&encode_headers(&Message::new("x")));
        assert!(bare.contains(&("ce_source".into(), "/busbar".into())));
        assert!(bare.contains(&("ce_type".into(), "busbar.message".into())));
        let bare: Vec<(String, Vec<u8>)> =
            bare.into_iter().map(|(n, v)| (n, v.into_bytes())).collect();
        let back = decode_parts(origin(), None, Bytes::new(), None, &refs(&bare));
        assert_eq!((back.source, back.event_type), (None, None));
    }

    #[test]
    fn foreign_records_decode() {
        let m = decode_parts(
            origin(),
            None,
            Bytes::from_static(b"x"),
            Some(1_700_000_000_000),
            &[("trace", b"1")],
        );
        assert_eq!(m.id, "t/3/17");
        assert_eq!(m.time.timestamp_millis(), 1_700_000_000_000);
        assert_eq!(m.headers.get("trace"), Some("1"));
    }

    #[test]
    fn binary_keys_and_header_values_keep_their_bytes() {
        // A schema-registry key (magic byte, schema id, Avro bytes) and a binary header.
        let key: &[u8] = &[0, 0, 0, 0, 7, 0xff, 0xfe];
        let value: &[u8] = &[0xc3, 0x28, 0x00];
        let m = decode_parts(
            origin(),
            Some(key),
            Bytes::from_static(b"x"),
            None,
            &[("schema", value), ("text", b"plain")],
        );
        assert_eq!(m.headers.get("text"), Some("plain"));
        assert_eq!(m.headers.get(KEY_ENCODING), Some("base64"));
        // Published again (a dead letter, a redrive): the same bytes, no marker headers.
        assert_eq!(record_key(&m).as_deref(), Some(key));
        let again = raw(&encode_headers(&m));
        assert!(
            again.contains(&("schema".to_owned(), value.to_vec())),
            "{again:?}"
        );
        assert!(again.contains(&("text".to_owned(), b"plain".to_vec())));
        assert!(!again
            .iter()
            .any(|(n, _)| n == KEY_ENCODING || n == BINARY_HEADERS));
        // A text key stays text, even one that looks like base64.
        let m = Message::new("x").with_key("AAAA");
        assert_eq!(record_key(&m).as_deref(), Some(&b"AAAA"[..]));
    }
}
