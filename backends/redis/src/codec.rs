//! How a message is stored as the fields of a stream entry, and reply parsing.
//!
//! An entry is a CloudEvent in binary content mode, the attributes under their CloudEvents
//! names (Redis has no protocol binding; this layout is busbar's, documented here and in the
//! README). Fields, in this order:
//!
//! | field | from |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | id |
//! | `source`, `type` | source, type; `/busbar` and `busbar.message` when unset (read back unset) |
//! | `time` | time, RFC 3339 with nanoseconds |
//! | `datacontenttype` | content type (absent when none) |
//! | `partitionkey` | partition key (absent when none) |
//! | `correlationid`, `causationid`, `dataversion` | busbar's extension attributes, where set |
//! | `data` | the payload bytes |
//! | `h:<name>` | one field per message header, in header order |
//!
//! Entries of busbar before CloudEvents names (`k`, `d`, `t`, `s`, `tm`, `ct`) still decode. An
//! entry without an `id` field was written by another program (see [`decode_entry`]).

use busbar_core::raw::cloudevents;
use busbar_core::{Headers, Message, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use redis::Value;

use crate::error::decode;

const HEADER_PREFIX: &str = "h:";

/// The stream fields of `m`.
pub(crate) fn encode(m: &Message) -> Vec<(String, Vec<u8>)> {
    let attributes = cloudevents::attributes(m);
    let mut f: Vec<(String, Vec<u8>)> = Vec::with_capacity(attributes.len() + 1 + m.headers.len());
    for (name, value) in attributes {
        f.push((name.to_owned(), value.into_owned().into_bytes()));
    }
    f.push(("data".into(), m.payload.to_vec()));
    for (n, v) in m
        .headers
        .iter()
        .filter(|(n, _)| !cloudevents::is_extension(n))
    {
        f.push((format!("{HEADER_PREFIX}{n}"), v.as_bytes().to_vec()));
    }
    f
}

fn text(v: Vec<u8>, field: &str) -> Result<String> {
    String::from_utf8(v).map_err(|_| decode(format!("stream field {field} is not UTF-8")))
}

/// Rebuilds a message from the flat field/value list of a stream entry (see [`decode_entry`]).
#[cfg(test)]
pub(crate) fn decode_fields(values: Vec<Value>) -> Result<Message> {
    decode_entry(values)?.message
}

/// The fields of an entry, as written.
pub(crate) type Fields = Vec<(String, Vec<u8>)>;

/// Reads an entry's fields: a busbar message (with its `id` field), or an entry another
/// program wrote (no `id` field), delivered with what can be read: its fields as a JSON object
/// (values as UTF-8 text, invalid bytes replaced) in an `application/json` payload. Its id is
/// set by the caller from the entry's place in the stream.
fn decode_busbar(fields: &Fields) -> Result<Option<Message>> {
    if !fields.iter().any(|(k, _)| k == "id") {
        return Ok(None);
    }
    let mut m = Message::new(Bytes::new());
    let mut headers = Headers::new();
    for (k, v) in fields {
        let v = v.clone();
        match k.as_str() {
            "d" | "data" => m.payload = Bytes::from(v),
            // The names of busbar before CloudEvents names.
            "k" => m.key = Some(text(v, "k")?),
            "t" => m.event_type = Some(text(v, "t")?),
            "s" => m.source = Some(text(v, "s")?),
            "ct" => m.content_type = Some(text(v, "ct")?),
            "tm" | "time" => {
                let s = text(v, k)?;
                m.time = DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| decode(format!("stream field {k}={s:?} is not RFC 3339")))?
                    .with_timezone(&Utc);
            }
            name => match name.strip_prefix(HEADER_PREFIX) {
                Some(h) => headers.insert(h, text(v, name)?),
                None => {
                    let value = text(v, name)?;
                    if !cloudevents::set_attribute(&mut m, name, value.clone()).map_err(decode)? {
                        // Another attribute (an extension of another writer): a header.
                        headers.insert(name, value);
                    }
                }
            },
        }
    }
    for (n, v) in m.headers.iter() {
        headers.insert(n, v);
    }
    m.headers = headers;
    Ok(Some(m))
}

/// An entry another program wrote, as a message (see [`decode_busbar`]).
fn decode_foreign(fields: &Fields) -> Message {
    let object: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into()))
        .collect();
    let body = serde_json::Value::Object(object).to_string();
    Message::new(body).with_content_type("application/json")
}

/// One entry's fields, decoded.
pub(crate) struct Decoded {
    /// The message, or why a busbar entry could not be decoded.
    pub(crate) message: Result<Message>,
    /// Written by another program (its id is to be derived from the entry's place).
    pub(crate) foreign: bool,
    /// The fields as written, kept when the message could not be decoded.
    pub(crate) fields: Fields,
}

/// Decodes the flat field/value list of a stream entry.
pub(crate) fn decode_entry(values: Vec<Value>) -> Result<Decoded> {
    let mut fields = Fields::new();
    let mut it = values.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = String::from_utf8_lossy(&bytes_of(k)?).into_owned();
        fields.push((k, bytes_of(v)?));
    }
    Ok(match decode_busbar(&fields) {
        Ok(Some(m)) => Decoded {
            message: Ok(m),
            foreign: false,
            fields: Fields::new(),
        },
        Ok(None) => Decoded {
            message: Ok(decode_foreign(&fields)),
            foreign: true,
            fields: Fields::new(),
        },
        Err(e) => Decoded {
            message: Err(e),
            foreign: false,
            fields,
        },
    })
}

/// The bytes of a bulk or simple string reply.
pub(crate) fn bytes_of(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.into_bytes()),
        other => Err(decode(format!("expected a string reply, got {other:?}"))),
    }
}

/// The string of a reply.
pub(crate) fn string_of(v: Value) -> Result<String> {
    text(bytes_of(v)?, "reply")
}

/// The items of an array reply (`Nil` is an empty array).
pub(crate) fn array_of(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        Value::Map(pairs) => Ok(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        other => Err(decode(format!("expected an array reply, got {other:?}"))),
    }
}

/// A reply of name/value pairs (a RESP2 flat array or a RESP3 map), by name.
pub(crate) fn field_map(v: Value) -> Result<std::collections::HashMap<String, Value>> {
    let mut out = std::collections::HashMap::new();
    let mut items = array_of(v)?.into_iter();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        out.insert(string_of(k)?, v);
    }
    Ok(out)
}

/// An integer reply.
pub(crate) fn int_of(v: Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(i),
        other => string_of(other)?
            .parse()
            .map_err(|_| decode("expected an integer reply")),
    }
}

/// One stream entry: its id and its fields, decoded.
pub(crate) struct RawEntry {
    pub(crate) stream_id: String,
    pub(crate) decoded: Result<Decoded>,
}

/// Parses the `[id, [field, value, ...]]` entries of XRANGE / XCLAIM / XREADGROUP replies.
/// Entries whose fields are nil (deleted by trimming) are skipped.
pub(crate) fn entries_of(v: Value) -> Result<Vec<RawEntry>> {
    let mut out = Vec::new();
    for e in array_of(v)? {
        let mut parts = array_of(e)?.into_iter();
        let id = parts.next().ok_or_else(|| decode("empty stream entry"))?;
        let stream_id = string_of(id)?;
        match parts.next() {
            None | Some(Value::Nil) => continue,
            Some(fields) => out.push(RawEntry {
                stream_id,
                decoded: array_of(fields).and_then(decode_entry),
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field_and_header_order() {
        let m = Message::new(vec![0u8, 255, 10])
            .with_key("k")
            .with_correlation_id("c")
            .with_version(2)
            .with_type("t")
            .with_source("/s")
            .with_content_type("ct")
            .with_header("z", "1")
            .with_header("a", "")
            .with_header("m", "grüße");
        let flat: Vec<Value> = encode(&m)
            .into_iter()
            .flat_map(|(k, v)| [Value::BulkString(k.into_bytes()), Value::BulkString(v)])
            .collect();
        assert_eq!(decode_fields(flat).expect("decodes"), m);
        let names: Vec<String> = encode(&Message::new("x"))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            ["specversion", "id", "source", "type", "time", "data"]
        );
    }

    #[test]
    fn entries_of_older_busbar_still_decode() {
        let flat: Vec<Value> = [
            ("id", "old-1"),
            ("k", "key"),
            ("d", "payload"),
            ("t", "order.created"),
            ("s", "/shop"),
            ("tm", "2026-01-02T03:04:05.000000006Z"),
            ("ct", "text/plain"),
            ("h:b", "2"),
        ]
        .into_iter()
        .flat_map(|(k, v)| [Value::BulkString(k.into()), Value::BulkString(v.into())])
        .collect();
        let m = decode_fields(flat).expect("decodes");
        assert_eq!((m.id.as_str(), m.key.as_deref()), ("old-1", Some("key")));
        assert_eq!(&m.payload[..], b"payload");
        assert_eq!(m.event_type.as_deref(), Some("order.created"));
        assert_eq!(m.source.as_deref(), Some("/shop"));
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.time.timestamp_subsec_nanos(), 6);
        assert_eq!(m.headers.get("b"), Some("2"));
    }

    #[test]
    fn foreign_entries_are_delivered_with_their_fields() {
        let flat = vec![
            Value::BulkString(b"event".to_vec()),
            Value::BulkString(b"order.created".to_vec()),
            Value::BulkString(b"total".to_vec()),
            Value::BulkString(b"9\xff".to_vec()),
        ];
        let d = decode_entry(flat).expect("read");
        assert!(d.foreign);
        let m = d.message.expect("delivered");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(v["event"], "order.created");
        assert_eq!(v["total"], "9\u{fffd}");
    }

    #[test]
    fn broken_busbar_entries_keep_their_fields() {
        let flat = vec![
            Value::BulkString(b"id".to_vec()),
            Value::BulkString(b"m-1".to_vec()),
            Value::BulkString(b"d".to_vec()),
            Value::BulkString(b"payload".to_vec()),
            Value::BulkString(b"tm".to_vec()),
            Value::BulkString(b"yesterday".to_vec()),
        ];
        let d = decode_entry(flat).expect("read");
        assert_eq!(
            d.message.expect_err("bad tm").kind(),
            busbar_core::ErrorKind::Decode
        );
        assert_eq!(d.fields.len(), 3);
        assert_eq!(d.fields[1], ("d".to_owned(), b"payload".to_vec()));
    }
}
