//! `amqp://` / `amqps://` URL parsing and the names busbar uses on RabbitMQ.

use std::fmt;

use busbar_core::raw::fit_name;
use busbar_core::raw::tls::TlsFiles;
use busbar_core::raw::{redact_url, UrlOptions};
use busbar_core::{Error, ErrorKind, Result};

use crate::BACKEND;

/// Configuration of a [`crate::AmqpBus`].
///
/// URL: `amqp[s]://user:password@host:port/vhost[?options]` (vhost `%2f` is `/`). busbar
/// options: `partitions` (partition queues per consumer group of a new topic, default 8),
/// `max_message_bytes` (largest message accepted, default 4 MiB), `queue_expires_ms` (delete a
/// group's queues, messages included, once unused that long — for test and short-lived
/// groups; off by default), `delivery_limit` (RabbitMQ dead-letters a message into
/// `<topic>.dlq` by itself once it was delivered more than this many times — crashes and
/// hand-overs, not busbar's in-member retries; off by default), `history` (keep every
/// message of a topic for this long — `30s`, `15m`, `12h`, `7d` — in a stream queue that
/// [`busbar_core::EventBus::browse`] reads without touching any group; off by default); on
/// `amqps://` only, `tls_ca` (PEM certificates to trust besides the system's), `tls_cert` and
/// `tls_key` (a client certificate and its key, for `ssl_options.verify = verify_peer`).
/// Other options (`heartbeat`, default [`DEFAULT_HEARTBEAT_SECS`] here, `frame_max`,
/// `channel_max`, `connection_timeout`, `auth_mechanism`) go to the AMQP client.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// The AMQP URI handed to lapin (busbar's own options removed).
    pub uri: String,
    /// Partition queues per group of a topic created by this client.
    pub partitions: u32,
    /// Largest message accepted, as counted by `Message::encoded_len`.
    pub max_message_bytes: usize,
    /// Delete a group's queues after they went unused (no consumer) this long (`x-expires`);
    /// `None` keeps them forever (the default).
    pub queue_expires: Option<std::time::Duration>,
    /// `x-delivery-limit` of the group queues, with dead-lettering into `<topic>.dlq`;
    /// `None` = no native dead-lettering (the default).
    pub delivery_limit: Option<u32>,
    /// How long the history stream of each topic keeps its messages (`x-max-age`); `None` =
    /// no history, no `browse` (the default).
    pub history: Option<std::time::Duration>,
    /// The TLS files of an `amqps://` URL (paths only).
    pub tls: TlsFiles,
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &redact_url(&self.uri))
            .field("partitions", &self.partitions)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("queue_expires", &self.queue_expires)
            .field("delivery_limit", &self.delivery_limit)
            .field("history", &self.history)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The AMQP heartbeat asked for when the URL sets none, in seconds.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend(BACKEND)
}

impl AmqpConfig {
    /// Parses an `amqp://` or `amqps://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let mut parsed = url::Url::parse(url)
            .map_err(|e| config_error(format!("invalid AMQP URL {}: {e}", redact_url(url))))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") {
            return Err(config_error(format!(
                "expected an amqp:// or amqps:// URL, got scheme {:?}",
                parsed.scheme()
            )));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(config_error(format!(
                "the AMQP URL {} has no host",
                redact_url(url)
            )));
        }
        let mut cfg = Self {
            uri: String::new(),
            partitions: 8,
            max_message_bytes: 4 * 1024 * 1024,
            queue_expires: None,
            delivery_limit: None,
            history: None,
            tls: TlsFiles::default(),
        };
        let mut passed = Vec::new();
        const KNOWN: [&str; 13] = [
            "partitions",
            "max_message_bytes",
            "queue_expires_ms",
            "delivery_limit",
            "history",
            "heartbeat",
            "frame_max",
            "channel_max",
            "connection_timeout",
            "auth_mechanism",
            "tls_ca",
            "tls_cert",
            "tls_key",
        ];
        let options = UrlOptions::parse("AMQP", BACKEND, parsed.query());
        for o in options.clone() {
            if cfg.tls.take(&o)? {
                continue;
            }
            match o.key() {
                "partitions" => cfg.partitions = o.number_as(1..=1024)?,
                "max_message_bytes" => {
                    cfg.max_message_bytes = o.number_as(1024..=128 * 1024 * 1024)?
                }
                "queue_expires_ms" => {
                    cfg.queue_expires = Some(o.millis(1000..=u64::from(u32::MAX))?)
                }
                "delivery_limit" => {
                    cfg.delivery_limit = Some(o.number_as(0..=100_000)?).filter(|n| *n > 0)
                }
                "history" => cfg.history = Some(o.age(1..=HISTORY_MAX_SECS)?),
                // lapin's own options, checked by its parser below.
                "heartbeat" | "frame_max" | "channel_max" | "connection_timeout"
                | "auth_mechanism" => passed.push(o.into_pair()),
                _ => return Err(options.unknown(&o, &KNOWN)),
            }
        }
        cfg.tls
            .check(parsed.scheme() == "amqps", "AMQP", "amqps://", BACKEND)?;
        if !passed.iter().any(|(k, _)| k == "heartbeat") {
            // RabbitMQ's default (60 s) leaves a silently dead connection holding its queues'
            // single active consumer for minutes; 10 s bounds that to about 20 s.
            passed.push(("heartbeat".into(), DEFAULT_HEARTBEAT_SECS.to_string()));
        }
        parsed.set_query(None);
        if !passed.is_empty() {
            parsed.query_pairs_mut().extend_pairs(passed);
        }
        cfg.uri = parsed.to_string();
        // lapin's own parser, now: a bad option is a `Config` error, not a failed connection.
        cfg.uri.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            config_error(format!("the AMQP URL {} is invalid: {e}", redact_url(url)))
        })?;
        Ok(cfg)
    }
}

/// The longest `history` accepted: ten years.
const HISTORY_MAX_SECS: u64 = 10 * 366 * 24 * 3600;

/// AMQP names (exchanges, queues) are short strings: at most 255 bytes. Longer ones keep
/// their start and end in a hash of the whole (`busbar_core::raw::fit_name`).
const NAME_MAX: usize = 255;

/// The exchange of a topic.
pub(crate) fn exchange(topic: &str) -> String {
    fit_name(&format!("busbar.{topic}"), NAME_MAX)
}

/// The partition queue `p` of a group.
pub(crate) fn queue(topic: &str, group: &str, p: u32) -> String {
    fit_name(&format!("busbar.{topic}.{group}.{p}"), NAME_MAX)
}

/// The attempts queue of partition `p` of a group (see `attempts`).
pub(crate) fn attempts_queue(topic: &str, group: &str, p: u32) -> String {
    fit_name(&format!("busbar.{topic}.{group}.{p}.attempts"), NAME_MAX)
}

/// The stream queue that keeps a topic's history (URL option `history`). Group queues end
/// in their partition number, so no group's queue has this name.
pub(crate) fn history_queue(topic: &str) -> String {
    fit_name(&format!("busbar.{topic}.history"), NAME_MAX)
}

/// The fanout exchange a group's members announce themselves on.
pub(crate) fn members_exchange(topic: &str, group: &str) -> String {
    fit_name(&format!("busbar.{topic}.{group}.members"), NAME_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_the_password() {
        let c = AmqpConfig::from_url("amqp://u:s3cret@h:5672/%2f?partitions=4&heartbeat=10")
            .expect("ok");
        assert_eq!(c.partitions, 4);
        assert!(c.uri.contains("heartbeat=10") && !c.uri.contains("partitions"));
        assert!(!format!("{c:?}").contains("s3cret"));
        for bad in [
            "http://h",
            "amqp://",
            "amqp://h?partitions=0",
            "amqp://h?heartbeat=abc",
            "amqp://h?heartbeat=70000",
            "amqp://h?channel_max=-1",
            "amqp://h?connection_timeout=soon",
            "amqp://h?auth_mechanism=magic",
            "amqp://h?x=1",
            "amqp://h?history=7",
            "amqp://h?history=0s",
            "amqp://h?history=7w",
            "amqp://h?history=-1d",
            "amqp://h?history=99999999999999999999d",
            "amqp://h?history=4000d",
            "amqp://h?tls_ca=/ca.pem",
            "amqps://h?tls_cert=/c.pem",
            "amqps://h?tls_key=/k.pem",
            "amqps://h?tls_ca=",
        ] {
            assert_eq!(
                AmqpConfig::from_url(bad).map_err(|e| e.kind()),
                Err(ErrorKind::Config),
                "{bad}"
            );
        }
    }

    #[test]
    fn tls_files_are_taken_on_amqps_and_not_handed_to_lapin() {
        let c = AmqpConfig::from_url(
            "amqps://u:p@h/%2f?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/k.pem&partitions=2",
        )
        .expect("ok");
        assert_eq!(c.tls.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(c.tls.key.as_deref(), Some(std::path::Path::new("/k.pem")));
        assert!(!c.uri.contains("tls_"), "{}", c.uri);
        assert!(c.uri.starts_with("amqps://"), "{}", c.uri);
        assert!(AmqpConfig::from_url("amqps://h")
            .expect("ok")
            .tls
            .is_empty());
    }

    #[test]
    fn history_ages() {
        let age = |q: &str| {
            AmqpConfig::from_url(&format!("amqp://h/%2f?{q}"))
                .expect("ok")
                .history
                .map(|d| d.as_secs())
        };
        assert_eq!(age(""), None);
        assert_eq!(age("history=30s"), Some(30));
        assert_eq!(age("history=15m"), Some(900));
        assert_eq!(age("history=12h"), Some(43_200));
        assert_eq!(age("history=7d"), Some(604_800));
    }

    #[test]
    fn heartbeat_defaults_to_10_s_and_the_url_wins() {
        let c = AmqpConfig::from_url("amqp://h/%2f").expect("ok");
        assert!(c.uri.ends_with("?heartbeat=10"), "{}", c.uri);
        let c = AmqpConfig::from_url("amqp://h/%2f?heartbeat=30").expect("ok");
        assert!(c.uri.ends_with("?heartbeat=30"), "{}", c.uri);
    }
}
