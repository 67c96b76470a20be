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

use busbar_core::raw::cloudevents;
use busbar_core::{Headers, Message};
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message as _;

const CE: &str = "ce_";
const CONTENT_TYPE: &str = "content-type";
const ESCAPED: &str = "busbar-h-";

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
    for (name, value) in m
        .headers
        .iter()
        .filter(|(n, _)| !cloudevents::is_extension(n))
    {
        if reserved(name) {
            add(&format!("{ESCAPED}{name}"), value);
        } else {
            add(name, value);
        }
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
    let key = record
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let timestamp = record.timestamp().to_millis();
    let mut pairs = Vec::new();
    if let Some(h) = record.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            pairs.push((header.key.to_owned(), value));
        }
    }
    decode_parts(origin, key, payload, timestamp, pairs)
}

pub(crate) fn decode_parts(
    origin: Origin<'_>,
    key: Option<String>,
    payload: Bytes,
    timestamp_ms: Option<i64>,
    header_pairs: Vec<(String, String)>,
) -> Message {
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
            m.key.clone(),
            m.payload.clone(),
            Some(1),
            pairs(&h),
        );
        assert_eq!(back, m);
        let p = pairs(&h);
        assert!(p.contains(&("ce_specversion".into(), "1.0".into())));
        assert!(p.contains(&("ce_correlationid".into(), "c-1".into())));
        // Unset source and type: a valid CloudEvent still (they were left out before).
        let bare = pairs(&encode_headers(&Message::new("x")));
        assert!(bare.contains(&("ce_source".into(), "/busbar".into())));
        assert!(bare.contains(&("ce_type".into(), "busbar.message".into())));
        let back = decode_parts(origin(), None, Bytes::new(), None, bare);
        assert_eq!((back.source, back.event_type), (None, None));
    }

    #[test]
    fn foreign_records_decode() {
        let m = decode_parts(
            origin(),
            None,
            Bytes::from_static(b"x"),
            Some(1_700_000_000_000),
            vec![("trace".into(), "1".into())],
        );
        assert_eq!(m.id, "t/3/17");
        assert_eq!(m.time.timestamp_millis(), 1_700_000_000_000);
        assert_eq!(m.headers.get("trace"), Some("1"));
    }
}
