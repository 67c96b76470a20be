//! How a message travels as a JetStream message: CloudEvents 1.0 binary content mode as the
//! NATS protocol binding (1.0.3) defines it — the payload is the body, every context
//! attribute a `ce-` header, header values percent-encoded (printable US-ASCII only).
//!
//! | header | field |
//! |---|---|
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | `id` |
//! | `ce-source`, `ce-type` | source, type (`/busbar` and `busbar.message` when unset; read back unset) |
//! | `ce-time` | time, RFC 3339 with nanoseconds |
//! | `ce-datacontenttype` | content type (absent when none) |
//! | `ce-partitionkey` | partition key (the Partitioning extension; absent when none) |
//! | `ce-correlationid`, `ce-causationid`, `ce-dataversion` | busbar's extension attributes (see `busbar::envelope`) |
//! | `Nats-Msg-Id` | JetStream's de-duplication id: `id` + `/` + a hash of the headers, so a retried publish is stored once while a redrive (which adds a header) is stored again |
//! | any other name | a message header, one NATS header each, value percent-encoded; a name that is not an RFC 7230 token, or would clash with the above (`ce-*`, `nats-*`, `content-type`, `busbar-h-*`), travels as `busbar-h-<percent-encoded name>` |
//!
//! NATS headers are a map in the clients: the order of different header names is not kept
//! (busbar's `Headers` compare without it). Reading is lenient: a message of another
//! producer is delivered with what it has — its `ce-*` attributes where present (an id from
//! its place in the stream otherwise) and its own headers (values as they are unless the
//! message is a CloudEvent). Messages of busbar before 0.2 (`Busbar-Id`, `Busbar-Headers`)
//! still decode.

use async_nats::header::{HeaderName, IntoHeaderName};
use async_nats::HeaderMap;
use busbar_core::raw::cloudevents::{self, percent_decode, percent_encode};
use busbar_core::{Message, Result};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

const CE: &str = "ce-";
const DEDUP_ID: &str = "Nats-Msg-Id";
const ESCAPED: &str = "busbar-h-";
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

/// What a header name keeps as it is: RFC 7230 token characters, `%` excepted (it escapes).
const NAME_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'*')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// Whether a message header named `name` needs the `busbar-h-` form.
fn escaped_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.is_empty()
        || utf8_percent_encode(name, NAME_ESCAPES).any(|part| part.starts_with('%'))
        || lower.starts_with(CE)
        || lower.starts_with("nats-")
        || lower.starts_with(ESCAPED)
        || lower == "content-type"
}

/// The `ce-` header of a CloudEvents attribute: static for every attribute busbar writes, so
/// a publish allocates no header names.
fn ce_header(attribute: &str) -> HeaderName {
    match attribute {
        "specversion" => HeaderName::from_static("ce-specversion"),
        "id" => HeaderName::from_static("ce-id"),
        "source" => HeaderName::from_static("ce-source"),
        "type" => HeaderName::from_static("ce-type"),
        "time" => HeaderName::from_static("ce-time"),
        "datacontenttype" => HeaderName::from_static("ce-datacontenttype"),
        "partitionkey" => HeaderName::from_static("ce-partitionkey"),
        "correlationid" => HeaderName::from_static("ce-correlationid"),
        "causationid" => HeaderName::from_static("ce-causationid"),
        "dataversion" => HeaderName::from_static("ce-dataversion"),
        other => format!("{CE}{other}").into_header_name(),
    }
}

/// The NATS headers of `m`.
pub(crate) fn encode(m: &Message) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in cloudevents::attributes(m) {
        h.insert(ce_header(name), percent_encode(&value).as_ref());
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (n, v) in m.headers.iter() {
        for b in n.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.insert(
        HeaderName::from_static(DEDUP_ID),
        format!("{}/{hash:016x}", percent_encode(&m.id)),
    );
    for (name, value) in m
        .headers
        .iter()
        .filter(|(n, _)| !cloudevents::is_extension(n))
    {
        let value = percent_encode(value);
        if escaped_name(name) {
            h.insert(
                format!("{ESCAPED}{}", utf8_percent_encode(name, NAME_ESCAPES)),
                value.as_ref(),
            );
        } else {
            h.insert(name, value.as_ref());
        }
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

/// The largest header block the NATS server takes (64 KiB); a larger one is refused.
pub(crate) const HEADERS_MAX_BYTES: usize = 64 * 1024;

/// Rebuilds a message from a JetStream message; `place_id` names a message that carries no
/// id of its own (another producer's) by its place in the stream. A CloudEvents attribute
/// that cannot be read (not UTF-8 once percent-decoded, a `ce-time` that is not RFC 3339)
/// stays a header under its wire name. Errors: a broken message of an older busbar.
pub(crate) fn decode_message(
    headers: Option<&HeaderMap>,
    payload: Bytes,
    place_id: impl FnOnce() -> String,
) -> Result<Message> {
    let Some(h) = headers else {
        return Ok(Message::new(payload).with_id(place_id()));
    };
    if h.get(legacy::ID).is_some() {
        return legacy::read(h, payload);
    }
    let mut m = Message::new(payload);
    let mut has_id = false;
    let is_cloudevent = h.iter().any(|(n, _)| {
        let n: &str = n.as_ref();
        n.eq_ignore_ascii_case("ce-specversion")
    });
    let mut names: Vec<(&str, &str)> = h
        .iter()
        .filter_map(|(n, v)| Some((AsRef::<str>::as_ref(n), v.first()?.as_str())))
        .collect();
    names.sort_unstable();
    for (name, value) in names {
        let lower = name.to_ascii_lowercase();
        if let Some(attribute) = lower.strip_prefix(CE) {
            // An attribute that cannot be read stays a header under its wire name.
            let Ok(decoded) = percent_decode(value) else {
                m.headers.insert(name, value);
                continue;
            };
            let decoded = decoded.into_owned();
            match cloudevents::set_attribute(&mut m, attribute, decoded.clone()) {
                Ok(true) => has_id |= attribute == "id",
                Ok(false) | Err(_) => m.headers.insert(name, decoded),
            }
        } else if lower == "content-type" && is_cloudevent {
            // The HTTP binding's place for `datacontenttype` (some SDKs write it on NATS too).
            if m.content_type.is_none() {
                m.content_type = Some(value.to_owned());
            }
        } else if lower.starts_with("nats-") {
            // JetStream's own (de-duplication id, schedules, ...).
        } else if let Some(escaped) = lower.strip_prefix(ESCAPED).map(|_| &name[ESCAPED.len()..]) {
            let n = percent_decode_str(escaped).decode_utf8_lossy().into_owned();
            m.headers.insert(n, lenient(value, is_cloudevent));
        } else {
            m.headers.insert(name, lenient(value, is_cloudevent));
        }
    }
    if !has_id {
        m.id = place_id();
    }
    Ok(m)
}

/// A plain header's value: percent-decoded in a CloudEvent (as busbar writes them), as it is
/// otherwise or when it does not decode.
fn lenient(value: &str, is_cloudevent: bool) -> String {
    if is_cloudevent {
        if let Ok(v) = percent_decode(value) {
            return v.into_owned();
        }
    }
    value.to_owned()
}

/// The form of busbar before CloudEvents binary mode (read only).
mod legacy {
    use async_nats::HeaderMap;
    use busbar_core::{Headers, Message, Result};
    use bytes::Bytes;
    use chrono::{DateTime, Utc};

    use crate::error::decode;

    pub(super) const ID: &str = "Busbar-Id";

    fn unescape(v: &str) -> String {
        v.replace("%0A", "\n")
            .replace("%0D", "\r")
            .replace("%25", "%")
    }

    pub(super) fn read(h: &HeaderMap, payload: Bytes) -> Result<Message> {
        let get = |n: &str| h.get(n).map(|v| unescape(v.as_str()));
        let id = get(ID).ok_or_else(|| decode("message without Busbar-Id"))?;
        let mut m = Message::new(payload).with_id(id);
        m.key = get("Busbar-Key");
        m.event_type = get("Busbar-Type");
        m.source = get("Busbar-Source");
        m.content_type = get("Busbar-Content-Type");
        if let Some(t) = h.get("Busbar-Time") {
            m.time = DateTime::parse_from_rfc3339(t.as_str())
                .map_err(|_| decode(format!("Busbar-Time {:?} is not RFC 3339", t.as_str())))?
                .with_timezone(&Utc);
        }
        if let Some(json) = h.get("Busbar-Headers") {
            let pairs: Vec<(String, String)> = serde_json::from_str(json.as_str())
                .map_err(|e| decode(format!("Busbar-Headers is not a JSON list of pairs: {e}")))?;
            m.headers = pairs.into_iter().collect::<Headers>();
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> String {
        "nats-t-7".to_owned()
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let m = Message::new(vec![0u8, 255, b'\n'])
            .with_key("ключ-1 line\r\nbreak%")
            .with_type("t")
            .with_source("/s")
            .with_content_type("text/plain")
            .with_correlation_id("c")
            .with_header("b", "2")
            .with_header("a", "")
            .with_header("ü", "x\ny")
            .with_header("ce-own", "mine")
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            );
        let h = encode(&m);
        assert_eq!(
            decode_message(Some(&h), m.payload.clone(), place).expect("decodes"),
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

    /// What another client reads: a valid binary-mode CloudEvent, every header printable
    /// US-ASCII (raw UTF-8 used to reach nats-py as U+FFFD), plain headers under their names.
    #[test]
    fn the_wire_is_a_cloudevent_in_printable_ascii() {
        let m = Message::new("x")
            .with_key("ключ-1")
            .with_header("tenant", "acme corp")
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            );
        let h = encode(&m);
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce-id"), Some(m.id.clone()));
        assert_eq!(get("ce-source").as_deref(), Some("/busbar"));
        assert_eq!(get("ce-type").as_deref(), Some("busbar.message"));
        assert!(get("ce-time").is_some());
        assert_eq!(
            get("ce-partitionkey").as_deref(),
            Some("%D0%BA%D0%BB%D1%8E%D1%87-1")
        );
        assert_eq!(get("tenant").as_deref(), Some("acme%20corp"));
        assert_eq!(
            get("traceparent").as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        for (name, values) in h.iter() {
            for v in values {
                assert!(
                    v.as_str().bytes().all(|b| (0x21..=0x7e).contains(&b)),
                    "{name}: {:?} is not printable US-ASCII",
                    v.as_str()
                );
            }
        }
    }

    #[test]
    fn another_producers_messages_are_delivered_with_what_they_have() {
        let bare = decode_message(None, Bytes::from_static(b"raw"), place).expect("no headers");
        assert_eq!(
            (bare.id.as_str(), &bare.payload[..]),
            ("nats-t-7", &b"raw"[..])
        );
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-abc-def-01");
        h.insert("Origin", "legacy 100%");
        let plain = decode_message(Some(&h), Bytes::new(), place).expect("plain headers");
        assert_eq!(plain.id, "nats-t-7");
        assert_eq!(plain.headers.get("traceparent"), Some("00-abc-def-01"));
        assert_eq!(
            plain.headers.get("Origin"),
            Some("legacy 100%"),
            "not a CloudEvent: as is"
        );
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", "1.0");
        h.insert("ce-id", "A234-1234-1234");
        h.insert("ce-source", "/mycontext");
        h.insert("ce-type", "com.example.someevent");
        h.insert("ce-time", "2018-04-05T17:31:00Z");
        h.insert("ce-comexampleextension1", "value");
        h.insert("content-type", "application/json");
        let ce = decode_message(Some(&h), Bytes::new(), place).expect("a CloudEvent");
        assert_eq!(ce.id, "A234-1234-1234");
        assert_eq!(ce.source.as_deref(), Some("/mycontext"));
        assert_eq!(ce.event_type.as_deref(), Some("com.example.someevent"));
        assert_eq!(ce.time.to_rfc3339(), "2018-04-05T17:31:00+00:00");
        assert_eq!(ce.headers.get("ce-comexampleextension1"), Some("value"));
        let mut h = HeaderMap::new();
        h.insert("ce-id", "x");
        h.insert("ce-time", "yesterday");
        h.insert("ce-source", "%C0%A0");
        let odd = decode_message(Some(&h), Bytes::new(), place).expect("delivered as it is");
        assert_eq!(odd.headers.get("ce-time"), Some("yesterday"));
        assert_eq!(
            odd.headers.get("ce-source"),
            Some("%C0%A0"),
            "not UTF-8: kept raw"
        );
        assert_eq!(odd.source, None);
    }

    #[test]
    fn messages_of_older_busbar_still_decode() {
        let mut h = HeaderMap::new();
        h.insert("Busbar-Id", "old-1");
        h.insert("Busbar-Key", "k%0Ay");
        h.insert("Busbar-Time", "2026-01-02T03:04:05.000000006Z");
        h.insert("Busbar-Headers", r#"[["b","2"],["a","1"]]"#);
        let m = decode_message(Some(&h), Bytes::new(), place).expect("legacy");
        assert_eq!(m.id, "old-1");
        assert_eq!(m.key.as_deref(), Some("k\ny"));
        assert_eq!(
            m.headers.iter().collect::<Vec<_>>(),
            vec![("b", "2"), ("a", "1")]
        );
    }
}
