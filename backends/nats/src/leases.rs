//! A tiny compare-and-set store on a JetStream stream, for partition leases and group
//! members: one subject per key, one message kept per subject, messages expire after the
//! lease TTL (`max_age`). Writes carry `Nats-Expected-Last-Subject-Sequence`, so a write
//! based on a stale read fails. An empty value is a released key.
//!
//! (async-nats's KV API cannot be used: it does not parse nats-server 2.9's account info.)

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use base64::Engine as _;
use busbar_core::{ErrorKind, Result};
use bytes::Bytes;

use crate::error::{decode, map, publish_kind, request_kind};

/// The lease store of one lease TTL.
pub(crate) struct LeaseStore {
    js: jetstream::Context,
    stream: String,
    subject_prefix: String,
}

/// A key's current value and the sequence a write must expect.
pub(crate) struct Current {
    /// Sequence of the last write (0 when the key never existed or expired).
    pub(crate) seq: u64,
    /// The value (empty when released).
    pub(crate) value: Bytes,
}

impl LeaseStore {
    /// Opens (creating when missing) the lease stream for `ttl`.
    pub(crate) async fn open(js: &jetstream::Context, ttl: Duration) -> Result<Self> {
        let ms = ttl.as_millis();
        Self::open_named(
            js,
            format!("BUSBAR_LEASES_{ms}"),
            format!("busbar-lease.{ms}"),
            "busbar partition leases and group members",
            Some(ttl),
        )
        .await
    }

    /// Opens (creating when missing) the store of hand-outs no handler saw (see
    /// `subscriber::Unseen`): like the leases, without expiry.
    pub(crate) async fn open_unseen(js: &jetstream::Context) -> Result<Self> {
        Self::open_named(
            js,
            "BUSBAR_UNSEEN".to_owned(),
            "busbar-unseen".to_owned(),
            "busbar: deliveries no handler saw, per group partition (attempt corrections)",
            None,
        )
        .await
    }

    async fn open_named(
        js: &jetstream::Context,
        name: String,
        subject_prefix: String,
        description: &str,
        max_age: Option<Duration>,
    ) -> Result<Self> {
        let cfg = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject_prefix}.>")],
            description: Some(description.into()),
            // File storage: entries survive a server restart.
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            max_age: max_age.unwrap_or_default(),
            duplicate_window: Duration::from_secs(1).min(max_age.unwrap_or(Duration::MAX)),
            ..Default::default()
        };
        js.get_or_create_stream(cfg).await.map_err(|e| {
            let k = request_kind(&e);
            map(k, e, "creating a busbar bookkeeping stream")
        })?;
        Ok(Self {
            js: js.clone(),
            stream: name,
            subject_prefix,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.subject_prefix)
    }

    /// The current value of `key`.
    pub(crate) async fn get(&self, key: &str) -> Result<Current> {
        let request = serde_json::json!({ "last_by_subj": self.subject(key) });
        let reply = self
            .js
            .client()
            .request(
                format!("$JS.API.STREAM.MSG.GET.{}", self.stream),
                Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| {
                let k = request_kind(&e);
                map(k, e, "reading a lease")
            })?;
        let v: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| decode(format!("unreadable lease answer: {e}")))?;
        if let Some(err) = v.get("error") {
            // 10037: no message found for the subject (never written, or expired).
            if err.get("err_code").and_then(serde_json::Value::as_u64) == Some(10037) {
                return Ok(Current {
                    seq: 0,
                    value: Bytes::new(),
                });
            }
            return Err(busbar_core::Error::new(
                ErrorKind::Broker,
                format!("reading a lease: {err}"),
            )
            .with_backend(crate::BACKEND));
        }
        let msg = v
            .get("message")
            .ok_or_else(|| decode("lease answer without message"))?;
        let seq = msg
            .get("seq")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| decode("lease answer without seq"))?;
        let data = msg
            .get("data")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        let value = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| decode(format!("lease value is not base64: {e}")))?;
        Ok(Current {
            seq,
            value: value.into(),
        })
    }

    /// Writes `value` if the key's last sequence is still `expected` (0: no message).
    /// Returns the new sequence, or `None` when another write came first.
    pub(crate) async fn put_if(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<Option<u64>> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(self.subject(key), headers, value)
            .await
            .map_err(|e| map(publish_kind(e.kind()), e, "writing a lease"))?;
        match ack.await {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence =>
            {
                Ok(None)
            }
            Err(e) => {
                // nats-server 2.9 reports a sequence mismatch as a generic API error.
                if e.to_string().contains("wrong last sequence") {
                    return Ok(None);
                }
                Err(map(publish_kind(e.kind()), e, "writing a lease"))
            }
        }
    }
}
