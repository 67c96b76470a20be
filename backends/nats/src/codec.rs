//! How a message travels as a JetStream message: the payload is the body, the metadata are
//! NATS headers.
//!
//! | header | field |
//! |---|---|
//! | `Busbar-Id` | `id` |
//! | `Nats-Msg-Id` | JetStream's de-duplication id: `id` + `/` + a hash of the headers, so a retried publish is stored once while a redrive (which adds a header) is stored again |
//! | `Busbar-Key` | partition key (absent when none) |
//! | `Busbar-Type`, `Busbar-Source`, `Busbar-Content-Type` | type, source, content type |
//! | `Busbar-Time` | time, RFC 3339 with nanoseconds |
//! | `Busbar-Headers` | the message headers, a JSON array of `[name, value]` pairs in order |
//!
//! Header values escape `%`, CR and LF as `%25`, `%0D`, `%0A` (NATS headers are line based).

use async_nats::HeaderMap;
use busbar_core::{Headers, Message, Result};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::decode;

const ID: &str = "Busbar-Id";
const DEDUP_ID: &str = "Nats-Msg-Id";
const KEY: &str = "Busbar-Key";
const TYPE: &str = "Busbar-Type";
const SOURCE: &str = "Busbar-Source";
const CONTENT_TYPE: &str = "Busbar-Content-Type";
const TIME: &str = "Busbar-Time";
const HEADERS: &str = "Busbar-Headers";
/// JetStream message schedules (server 2.12+): when, and which subject gets the message.
pub(crate) const SCHEDULE: &str = "Nats-Schedule";
pub(crate) const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
/// The longest publish delay busbar schedules (one year).
pub(crate) const SCHEDULE_MAX: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// The `Nats-Schedule` value for a message due `delay` from now: `@at` an RFC 3339 time in
/// whole seconds, rounded up so the message never arrives before its delay.
pub(crate) fn schedule_at(delay: std::time::Duration) -> Result<String> {
    let invalid = || {
        busbar_core::Error::new(
            busbar_core::ErrorKind::InvalidInput,
            format!("a publish delay of {delay:?} is out of range"),
        )
        .with_backend(crate::BACKEND)
    };
    let delay = chrono::Duration::from_std(delay).map_err(|_| invalid())?;
    let due = Utc::now()
        .checked_add_signed(delay)
        .and_then(|t| t.checked_add_signed(chrono::Duration::milliseconds(999)))
        .ok_or_else(invalid)?;
    Ok(format!(
        "@at {}",
        due.to_rfc3339_opts(SecondsFormat::Secs, true)
    ))
}

fn escape(v: &str) -> String {
    v.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn unescape(v: &str) -> String {
    v.replace("%0A", "\n")
        .replace("%0D", "\r")
        .replace("%25", "%")
}

/// The NATS headers of `m`.
pub(crate) fn encode(m: &Message) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ID, escape(&m.id).as_str());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (n, v) in m.headers.iter() {
        for b in n.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.insert(DEDUP_ID, format!("{}/{hash:016x}", escape(&m.id)).as_str());
    if let Some(k) = &m.key {
        h.insert(KEY, escape(k).as_str());
    }
    if let Some(t) = &m.event_type {
        h.insert(TYPE, escape(t).as_str());
    }
    if let Some(s) = &m.source {
        h.insert(SOURCE, escape(s).as_str());
    }
    if let Some(c) = &m.content_type {
        h.insert(CONTENT_TYPE, escape(c).as_str());
    }
    h.insert(
        TIME,
        m.time.to_rfc3339_opts(SecondsFormat::Nanos, true).as_str(),
    );
    if !m.headers.is_empty() {
        let pairs: Vec<(&str, &str)> = m.headers.iter().collect();
        let json = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into());
        h.insert(HEADERS, json.as_str());
    }
    h
}

/// Bytes the headers take on the wire (`name: value\r\n` each, plus the version line).
pub(crate) fn wire_len(h: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (name, values) in h.iter() {
        for v in values {
            n += name.to_string().len() + 4 + v.as_str().len();
        }
    }
    n
}

/// Rebuilds a message from a JetStream message.
/// The largest header block the NATS server takes (64 KiB); a larger one is refused.
pub(crate) const HEADERS_MAX_BYTES: usize = 64 * 1024;

/// Whether a message was published by another program (no `Busbar-Id` header).
pub(crate) fn is_foreign(headers: Option<&HeaderMap>) -> bool {
    headers.is_none_or(|h| h.get(ID).is_none())
}

/// A message another program published, delivered with what can be read: its payload, `id`
/// (derived by the caller from its place in the stream), and its NATS headers as headers
/// (the first value of each).
pub(crate) fn foreign_message(headers: Option<&HeaderMap>, payload: Bytes, id: String) -> Message {
    let mut m = Message::new(payload).with_id(id);
    if let Some(h) = headers {
        let mut names: Vec<(String, String)> = h
            .iter()
            .filter_map(|(n, v)| Some((n.to_string(), v.first()?.as_str().to_owned())))
            .collect();
        names.sort();
        for (n, v) in names {
            m.headers.insert(n, v);
        }
    }
    m
}

pub(crate) fn decode_message(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Message> {
    let h = headers.ok_or_else(|| decode("message without headers (not written by busbar)"))?;
    let get = |n: &str| h.get(n).map(|v| unescape(v.as_str()));
    let id = get(ID).ok_or_else(|| decode("message without Busbar-Id (not written by busbar)"))?;
    let mut m = Message::new(payload).with_id(id);
    m.key = get(KEY);
    m.event_type = get(TYPE);
    m.source = get(SOURCE);
    m.content_type = get(CONTENT_TYPE);
    if let Some(t) = h.get(TIME) {
        m.time = DateTime::parse_from_rfc3339(t.as_str())
            .map_err(|_| decode(format!("Busbar-Time {:?} is not RFC 3339", t.as_str())))?
            .with_timezone(&Utc);
    }
    if let Some(json) = h.get(HEADERS) {
        let pairs: Vec<(String, String)> = serde_json::from_str(json.as_str())
            .map_err(|e| decode(format!("Busbar-Headers is not a JSON list of pairs: {e}")))?;
        m.headers = pairs.into_iter().collect::<Headers>();
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let m = Message::new(vec![0u8, 255, b'\n'])
            .with_key("line\r\nbreak%")
            .with_type("t")
            .with_source("/s")
            .with_content_type("text/plain")
            .with_header("b", "2")
            .with_header("a", "")
            .with_header("ü", "x\ny");
        let h = encode(&m);
        assert_eq!(
            decode_message(Some(&h), m.payload.clone()).expect("decodes"),
            m
        );
        assert!(wire_len(&h) > 50);
        let redriven = m.clone().with_header("busbar-redriven-from", "t.dlq");
        assert_ne!(
            encode(&redriven)
                .get(DEDUP_ID)
                .map(|v| v.as_str().to_owned()),
            h.get(DEDUP_ID).map(|v| v.as_str().to_owned()),
            "a redrive must not be dropped as a duplicate"
        );
    }

    #[test]
    fn foreign_messages_are_decode_errors() {
        let e = decode_message(None, Bytes::new()).expect_err("no headers");
        assert_eq!(e.kind(), busbar_core::ErrorKind::Decode);
    }
}
