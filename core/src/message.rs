//! The message envelope: outgoing [`Message`] and the fields every delivery carries.
//!
//! Field names follow CloudEvents 1.0 (`id`, `source`, `type`, `time`, `datacontenttype`; the
//! partition key is the Partitioning extension's `partitionkey`), so the serde form of a
//! [`Message`] is a CloudEvents-shaped JSON object and a binary-mode mapping needs no renames.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// String headers (CloudEvents extension attributes or plain metadata), one value per name.
///
/// Insertion order is kept in memory; [`Headers::insert`] replaces the value of an existing
/// name in place. The order of different names is not part of a message: brokers whose
/// clients keep headers in a map (NATS, RabbitMQ, SQS) deliver them in another order, and
/// two `Headers` with the same names and values are equal in any order.
#[derive(Debug, Clone, Default, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(Vec<(String, String)>);

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.iter().all(|(n, v)| other.get(n) == Some(v))
    }
}

impl Headers {
    /// Empty headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`, replacing an existing value in place.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let pos = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(pos).1)
    }

    /// Iterates over `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total bytes of names and values, as counted against `message_max_bytes`.
    pub fn encoded_len(&self) -> usize {
        self.0.iter().map(|(n, v)| n.len() + v.len()).sum()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
        }
        h
    }
}

/// An event to publish: payload plus CloudEvents-style metadata.
///
/// ```
/// use busbar_core::Message;
/// let msg = Message::new("{\"order\":42}")
///     .with_key("order-42")
///     .with_type("order.created")
///     .with_header("tenant", "acme");
/// assert_eq!(msg.key.as_deref(), Some("order-42"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id (CloudEvents `id`); a UUIDv7 unless the caller sets one.
    pub id: String,
    /// Partition key (CloudEvents `partitionkey`): messages with the same key keep their order.
    #[serde(
        rename = "partitionkey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key: Option<String>,
    /// The body (CloudEvents `data`, carried as raw bytes).
    #[serde(rename = "data")]
    pub payload: Bytes,
    /// Ordered string headers.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
    /// Event type (CloudEvents `type`), e.g. `order.created`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Producer of the event (CloudEvents `source`), e.g. `/billing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When the event happened (CloudEvents `time`); set to now by [`Message::new`].
    pub time: DateTime<Utc>,
    /// Media type of the payload (CloudEvents `datacontenttype`).
    #[serde(
        rename = "datacontenttype",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub content_type: Option<String>,
}

impl Message {
    /// A message with `payload`, a fresh UUIDv7 id and the current time.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            id: new_id(),
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
            event_type: None,
            source: None,
            time: Utc::now(),
            content_type: None,
        }
    }

    /// A message whose payload is `value` serialized as JSON, with content type
    /// `application/json`. Fails with [`crate::ErrorKind::Decode`] if `value` cannot be serialized.
    pub fn json<T: Serialize>(value: &T) -> crate::Result<Self> {
        let body = serde_json_bytes(value)?;
        Ok(Self::new(body).with_content_type("application/json"))
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the partition key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds or replaces a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the event type.
    pub fn with_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Sets the source.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the event time.
    pub fn with_time(mut self, time: DateTime<Utc>) -> Self {
        self.time = time;
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the event's schema version (header [`VERSION`]): consumers' upcasters
    /// ([`crate::Consumer::upcast`]) bring older versions up to date. Unset means version 1.
    pub fn with_version(mut self, version: u32) -> Self {
        self.headers.insert(VERSION, version.to_string());
        self
    }

    /// The event's schema version: the [`VERSION`] header, 1 when absent; `None` when the
    /// header is not a number (a foreign producer's own scheme; upcasters leave it alone).
    pub fn version(&self) -> Option<u32> {
        version_of(&self.headers)
    }

    /// Sets the correlation id (header [`CORRELATION_ID`]): the id of the event that started
    /// the chain this one belongs to.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.headers.insert(CORRELATION_ID, id);
        self
    }

    /// The correlation id: the [`CORRELATION_ID`] header, or the message's own id when it
    /// starts a chain (the header is then left out on the wire).
    pub fn correlation_id(&self) -> &str {
        self.headers.get(CORRELATION_ID).unwrap_or(&self.id)
    }

    /// The causation id (header [`CAUSATION_ID`]): the id of the event whose handling
    /// published this one; `None` for the first event of a chain.
    pub fn causation_id(&self) -> Option<&str> {
        self.headers.get(CAUSATION_ID)
    }

    /// Makes this message the consequence of handling `cause`: it takes `cause`'s correlation
    /// id and `cause`'s id as causation id. The consumer runner does this by itself for
    /// messages published while a handler runs (in the handler's task); call it for messages
    /// published from tasks a handler spawned, or from outside the runner.
    pub fn caused_by(mut self, cause: &Message) -> Self {
        self.headers
            .insert(CORRELATION_ID, cause.correlation_id().to_owned());
        self.headers.insert(CAUSATION_ID, cause.id.clone());
        self
    }

    /// The size counted against `message_max_bytes`: payload plus key, headers and metadata.
    pub fn encoded_len(&self) -> usize {
        self.payload.len()
            + self.id.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.headers.encoded_len()
            + self.event_type.as_ref().map_or(0, String::len)
            + self.source.as_ref().map_or(0, String::len)
            + self.content_type.as_ref().map_or(0, String::len)
    }
}

fn serde_json_bytes<T: Serialize>(value: &T) -> crate::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| {
        crate::Error::new(
            crate::ErrorKind::Decode,
            "cannot serialize the value as JSON",
        )
        .with_source(e)
    })
}

/// A new message id: a UUIDv7, hyphenated, lower case — encoded into a stack buffer, which
/// costs a fraction of `to_string` (the formatting machinery) on a publish's hot path.
fn new_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

/// The CloudEvents `source` on the wire of a message whose `source` is unset (binary mode
/// needs one); read back as unset.
pub const DEFAULT_SOURCE: &str = "/busbar";

/// The CloudEvents `type` on the wire of a message whose `event_type` is unset; read back as
/// unset.
pub const DEFAULT_TYPE: &str = "busbar.message";

/// Header of the correlation id (a CloudEvents extension attribute name): the id of the
/// event that started the chain. Absent on the first event of a chain.
pub const CORRELATION_ID: &str = "correlationid";

/// Header of the causation id (a CloudEvents extension attribute name): the id of the event
/// whose handling published this one.
pub const CAUSATION_ID: &str = "causationid";

/// Header of the event's schema version (a CloudEvents extension attribute name): a decimal
/// number, version 1 when absent.
pub const VERSION: &str = "dataversion";

pub(crate) fn version_of(headers: &Headers) -> Option<u32> {
    match headers.get(VERSION) {
        None => Some(1),
        Some(v) => v.trim().parse().ok(),
    }
}

/// The longest id, event type or content type of a message, in bytes (AMQP short strings):
/// one limit on every backend, checked before anything of a publish call is sent.
pub const METADATA_MAX_BYTES: usize = 255;

/// The first of `m`'s id, event type and content type longer than [`METADATA_MAX_BYTES`].
pub(crate) fn oversized_metadata(m: &Message) -> Option<&'static str> {
    let too_long = |s: Option<&str>| s.is_some_and(|s| s.len() > METADATA_MAX_BYTES);
    if too_long(Some(&m.id)) {
        Some("id")
    } else if too_long(m.event_type.as_deref()) {
        Some("event type")
    } else if too_long(m.content_type.as_deref()) {
        Some("content type")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_uuid_v7_and_now() {
        let before = Utc::now();
        let m = Message::new("x");
        let id = uuid::Uuid::parse_str(&m.id).expect("uuid");
        assert_eq!(id.get_version_num(), 7);
        assert!(m.time >= before && m.time <= Utc::now());
    }

    #[test]
    fn serde_uses_cloudevents_names() {
        let m = Message::new("hi")
            .with_key("k")
            .with_type("t")
            .with_source("/s")
            .with_content_type("text/plain")
            .with_header("a", "1");
        let v = serde_json::to_value(&m).expect("json");
        for field in [
            "id",
            "partitionkey",
            "data",
            "type",
            "source",
            "time",
            "datacontenttype",
        ] {
            assert!(v.get(field).is_some(), "{field} missing in {v}");
        }
        let back: Message = serde_json::from_value(v).expect("back");
        assert_eq!(back, m);
    }

    #[test]
    fn headers_keep_order_and_replace_in_place() {
        let mut h: Headers = [("b", "1"), ("a", "2")].into_iter().collect();
        h.insert("b", "3");
        let v: Vec<_> = h.iter().collect();
        assert_eq!(v, vec![("b", "3"), ("a", "2")]);
        assert_eq!(h.remove("b").as_deref(), Some("3"));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn json_constructor_sets_content_type() {
        let m = Message::json(&serde_json::json!({"a": 1})).expect("json");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(&m.payload[..], br#"{"a":1}"#);
    }
}
