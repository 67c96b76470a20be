//! CloudEvents 1.0 binary content mode, shared by the backends: which context attributes a
//! message has on the wire, how a binding's header values are percent-encoded, and how
//! attributes read off the wire become a [`Message`] again. Each backend writes the
//! attributes under its binding's prefix (`ce-` on NATS, `ce_` on Kafka, ...).
//!
//! On the wire a message always is a valid CloudEvent: `specversion` `1.0`, `id`, `source`
//! and `type` (an unset source or type travels as [`DEFAULT_SOURCE`] / [`DEFAULT_TYPE`] and
//! reads back unset), `time`, and where set `datacontenttype`, `partitionkey` (the
//! Partitioning extension) and busbar's extension attributes `correlationid`,
//! `causationid`, `dataversion` (kept in [`Message::headers`] by busbar). Other headers are
//! not CloudEvents attributes: backends carry them as native headers of their own name.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::message::{
    Message, CAUSATION_ID, CORRELATION_ID, DEFAULT_SOURCE, DEFAULT_TYPE, VERSION,
};

/// The CloudEvents version busbar writes.
pub const SPEC_VERSION: &str = "1.0";

/// busbar's extension attributes: kept in the message headers, carried as attributes.
pub const EXTENSIONS: [&str; 3] = [CORRELATION_ID, CAUSATION_ID, VERSION];

/// Whether header `name` is one of busbar's [`EXTENSIONS`].
pub fn is_extension(name: &str) -> bool {
    EXTENSIONS.contains(&name)
}

/// The context attributes of `m` in binary mode, as `(attribute, value)`: `specversion`,
/// `id`, `source`, `type`, `time` (RFC 3339, nanoseconds), then `datacontenttype`,
/// `partitionkey` and the [`EXTENSIONS`] where set. Values are not encoded yet.
pub fn attributes(m: &Message) -> Vec<(&'static str, Cow<'_, str>)> {
    let mut out = Vec::with_capacity(8);
    out.push(("specversion", Cow::Borrowed(SPEC_VERSION)));
    out.push(("id", Cow::Borrowed(m.id.as_str())));
    out.push((
        "source",
        Cow::Borrowed(m.source.as_deref().unwrap_or(DEFAULT_SOURCE)),
    ));
    out.push((
        "type",
        Cow::Borrowed(m.event_type.as_deref().unwrap_or(DEFAULT_TYPE)),
    ));
    out.push(("time", Cow::Owned(rfc3339_nanos(&m.time))));
    if let Some(c) = &m.content_type {
        out.push(("datacontenttype", Cow::Borrowed(c.as_str())));
    }
    if let Some(k) = &m.key {
        out.push(("partitionkey", Cow::Borrowed(k.as_str())));
    }
    for ext in EXTENSIONS {
        if let Some(v) = m.headers.get(ext) {
            out.push((ext, Cow::Borrowed(v)));
        }
    }
    out
}

/// `t` as RFC 3339 in UTC with nanoseconds (`2026-12-07T19:30:22.123456789Z`), exactly as
/// chrono's `to_rfc3339_opts(SecondsFormat::Nanos, true)` writes it, without the formatting
/// machinery for the years 0 to 9999 (every publish writes one; chrono writes the rest and
/// leap seconds).
pub fn rfc3339_nanos(t: &DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&t.year()) || nanos >= 1_000_000_000 {
        return t.to_rfc3339_opts(SecondsFormat::Nanos, true);
    }
    let mut out = [0u8; 30];
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, t.year() as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 9, nanos);
    for (at, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (29, b'Z'),
    ] {
        out[at] = c;
    }
    String::from_utf8(out.to_vec())
        .unwrap_or_else(|_| t.to_rfc3339_opts(SecondsFormat::Nanos, true))
}

/// Applies attribute `name` (without the binding's prefix, lower case) read off the wire to
/// `m`. Returns `Ok(false)` for an attribute busbar does not map to a field (a foreign
/// extension: the caller keeps it as a header). Errors: a `time` that is not RFC 3339.
pub fn set_attribute(m: &mut Message, name: &str, value: String) -> Result<bool, String> {
    match name {
        "specversion" => {}
        "id" => m.id = value,
        "source" => m.source = (value != DEFAULT_SOURCE).then_some(value),
        "type" => m.event_type = (value != DEFAULT_TYPE).then_some(value),
        "time" => {
            m.time = DateTime::parse_from_rfc3339(&value)
                .map_err(|_| format!("CloudEvents time {value:?} is not RFC 3339"))?
                .with_timezone(&Utc);
        }
        "datacontenttype" => m.content_type = Some(value),
        "partitionkey" => m.key = Some(value),
        ext if is_extension(ext) => m.headers.insert(ext, value),
        _ => return Ok(false),
    }
    Ok(true)
}

/// What the header encoding of the CloudEvents HTTP and NATS bindings percent-encodes:
/// controls, space, `"`, `%` (and, always, every byte outside ASCII).
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// `v` percent-encoded as the CloudEvents HTTP/NATS bindings ask for header values:
/// printable US-ASCII results, upper-case hex.
pub fn percent_encode(v: &str) -> Cow<'_, str> {
    utf8_percent_encode(v, HEADER_VALUE).into()
}

/// A header value decoded as the bindings ask: a double-quoted value is unquoted first
/// (backslash escapes), then one round of percent-decoding; bytes that are not UTF-8 (an
/// overlong encoding, say) are an error.
pub fn percent_decode(v: &str) -> Result<Cow<'_, str>, String> {
    let t = v.trim_matches([' ', '\t']);
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        let mut unquoted = String::with_capacity(t.len());
        let mut chars = t[1..t.len() - 1].chars();
        while let Some(c) = chars.next() {
            unquoted.push(if c == '\\' {
                chars.next().unwrap_or(c)
            } else {
                c
            });
        }
        return percent_decode_str(&unquoted)
            .decode_utf8()
            .map(|s| Cow::Owned(s.into_owned()))
            .map_err(|_| format!("header value {v:?} is not UTF-8 once percent-decoded"));
    }
    percent_decode_str(t)
        .decode_utf8()
        .map_err(|_| format!("header value {v:?} is not UTF-8 once percent-decoded"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_nanos_writes_what_chrono_writes() {
        use chrono::TimeZone;
        let mut times = vec![
            Utc.timestamp_opt(0, 0).single(),
            Utc.timestamp_opt(1_700_000_000, 123_456_789).single(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).single(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).single(),
            Utc.with_ymd_and_hms(-1, 6, 1, 12, 0, 0).single(),
            // A leap second: chrono keeps it in the nanoseconds.
            Utc.timestamp_opt(1_483_228_799, 1_500_000_000).single(),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let secs = (seed % 253_402_300_799) as i64;
            times.push(
                Utc.timestamp_opt(secs, (seed >> 32) as u32 % 1_000_000_000)
                    .single(),
            );
        }
        for t in times.into_iter().flatten() {
            assert_eq!(
                rfc3339_nanos(&t),
                t.to_rfc3339_opts(SecondsFormat::Nanos, true),
                "{t:?}"
            );
        }
    }

    use super::*;

    #[test]
    fn values_are_encoded_as_the_bindings_say() {
        assert_eq!(
            percent_encode("Euro \u{20AC} \u{1F600}"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80"
        );
        assert_eq!(percent_encode("ключ-1"), "%D0%BA%D0%BB%D1%8E%D1%87-1");
        assert_eq!(percent_encode("a\"b%c\r\n"), "a%22b%25c%0D%0A");
        assert_eq!(percent_encode("plain/ascii:1.0"), "plain/ascii:1.0");
        for v in ["Euro \u{20AC} \u{1F600}", "ключ-1", "a\"b%c\r\n", ""] {
            assert_eq!(percent_decode(&percent_encode(v)).as_deref(), Ok(v));
        }
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Ok("\u{20AC}"));
        assert_eq!(
            percent_decode("\"a \\\"b\\\" %41\"").as_deref(),
            Ok("a \"b\" A")
        );
        assert!(
            percent_decode("%C0%A0").is_err(),
            "overlong encodings are rejected"
        );
    }

    #[test]
    fn attributes_round_trip_with_defaults_for_source_and_type() {
        let bare = Message::new("x");
        let attrs = attributes(&bare);
        let names: Vec<&str> = attrs.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["specversion", "id", "source", "type", "time"]);
        let full = Message::new("x")
            .with_key("k")
            .with_type("order.created")
            .with_source("/shop")
            .with_content_type("application/json")
            .with_version(2)
            .with_correlation_id("c-1")
            .with_header("tenant", "acme");
        for m in [bare, full] {
            let mut back = Message::new(m.payload.clone());
            back.headers = m.headers.iter().filter(|(n, _)| !is_extension(n)).collect();
            for (name, value) in attributes(&m) {
                assert_eq!(set_attribute(&mut back, name, value.into_owned()), Ok(true));
            }
            // Extensions come back after the plain headers, in `EXTENSIONS` order.
            let mut want = m.clone();
            want.headers = m
                .headers
                .iter()
                .filter(|(n, _)| !is_extension(n))
                .chain(
                    EXTENSIONS
                        .iter()
                        .filter_map(|e| m.headers.get(e).map(|v| (*e, v))),
                )
                .collect();
            assert_eq!(back, want);
        }
        let mut m = Message::new("x");
        assert_eq!(set_attribute(&mut m, "myext", "v".into()), Ok(false));
        assert!(set_attribute(&mut m, "time", "yesterday".into()).is_err());
    }
}
