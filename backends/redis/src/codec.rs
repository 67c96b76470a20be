//! How a message is stored as the fields of a stream entry, and reply parsing.
//!
//! Fields, in this order: `id`, `k` (partition key, absent when none), `d` (payload bytes),
//! `t` (type), `s` (source), `tm` (time, RFC 3339 with nanoseconds), `ct` (content type),
//! then one `h:<name>` field per header, in header order.

use busbar_core::{Headers, Message, Result};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use redis::Value;

use crate::error::decode;

const HEADER_PREFIX: &str = "h:";

/// The stream fields of `m`.
pub(crate) fn encode(m: &Message) -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = Vec::with_capacity(7 + m.headers.len());
    f.push(("id".into(), m.id.clone().into_bytes()));
    if let Some(k) = &m.key {
        f.push(("k".into(), k.clone().into_bytes()));
    }
    f.push(("d".into(), m.payload.to_vec()));
    if let Some(t) = &m.event_type {
        f.push(("t".into(), t.clone().into_bytes()));
    }
    if let Some(s) = &m.source {
        f.push(("s".into(), s.clone().into_bytes()));
    }
    f.push((
        "tm".into(),
        m.time
            .to_rfc3339_opts(SecondsFormat::Nanos, true)
            .into_bytes(),
    ));
    if let Some(ct) = &m.content_type {
        f.push(("ct".into(), ct.clone().into_bytes()));
    }
    for (n, v) in m.headers.iter() {
        f.push((format!("{HEADER_PREFIX}{n}"), v.as_bytes().to_vec()));
    }
    f
}

fn text(v: Vec<u8>, field: &str) -> Result<String> {
    String::from_utf8(v).map_err(|_| decode(format!("stream field {field} is not UTF-8")))
}

/// Rebuilds a message from the flat field/value list of a stream entry.
pub(crate) fn decode_fields(values: Vec<Value>) -> Result<Message> {
    let mut m = Message::new(Bytes::new());
    let mut headers = Headers::new();
    let mut saw_id = false;
    let mut it = values.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = text(bytes_of(k)?, "name")?;
        let v = bytes_of(v)?;
        match k.as_str() {
            "id" => {
                m.id = text(v, "id")?;
                saw_id = true;
            }
            "k" => m.key = Some(text(v, "k")?),
            "d" => m.payload = Bytes::from(v),
            "t" => m.event_type = Some(text(v, "t")?),
            "s" => m.source = Some(text(v, "s")?),
            "tm" => {
                let s = text(v, "tm")?;
                m.time = DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| decode(format!("stream field tm={s:?} is not RFC 3339")))?
                    .with_timezone(&Utc);
            }
            "ct" => m.content_type = Some(text(v, "ct")?),
            name => {
                if let Some(h) = name.strip_prefix(HEADER_PREFIX) {
                    headers.insert(h, text(v, name)?);
                }
            }
        }
    }
    if !saw_id {
        return Err(decode(
            "stream entry without an id field (not written by busbar)",
        ));
    }
    m.headers = headers;
    Ok(m)
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

/// An integer reply.
pub(crate) fn int_of(v: Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(i),
        other => string_of(other)?
            .parse()
            .map_err(|_| decode("expected an integer reply")),
    }
}

/// One stream entry: its id and its message (or the reason it could not be decoded).
pub(crate) struct RawEntry {
    pub(crate) stream_id: String,
    pub(crate) message: Result<Message>,
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
                message: array_of(fields).and_then(decode_fields),
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
    }

    #[test]
    fn foreign_entries_are_decode_errors() {
        let flat = vec![
            Value::BulkString(b"foo".to_vec()),
            Value::BulkString(b"bar".to_vec()),
        ];
        let e = decode_fields(flat).expect_err("no id");
        assert_eq!(e.kind(), busbar_core::ErrorKind::Decode);
    }
}
