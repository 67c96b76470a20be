//! `redis://` / `rediss://` URL parsing: the connection part goes to redis-rs, busbar's own
//! options are taken out of the query string.

use std::fmt;
use std::time::Duration;

use busbar_core::raw::tls::TlsFiles;
use busbar_core::raw::{redact_url, UrlOptions};
use busbar_core::{Error, ErrorKind, Result};

use crate::BACKEND;

/// Configuration of a [`crate::RedisBus`].
///
/// URL options (query string), all optional:
/// `prefix` (key prefix, default `busbar`), `partitions` (streams per new topic, default 8),
/// `retention` (approximate `MAXLEN` per partition stream, default 1,000,000),
/// `max_message_bytes` (default 1 MiB), `lease_ttl_ms` (partition lease, default 6000),
/// `block_ms` (longest blocking read, default 200); on `rediss://` only, `tls_ca` (PEM
/// certificates to trust instead of the system's), `tls_cert` and `tls_key` (a client
/// certificate and its key, for `tls-auth-clients yes`). Other query options go to redis-rs
/// (for example `protocol=resp3`).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The URL handed to redis-rs (busbar options removed).
    pub connection_url: String,
    /// Prefix of every key busbar writes.
    pub prefix: String,
    /// Partition streams of a topic created by this client.
    pub partitions: u32,
    /// Approximate maximum entries kept per partition stream (`XADD MAXLEN ~`).
    pub retention: u64,
    /// Largest accepted message ([`busbar_core::Message::encoded_len`]).
    pub max_message_bytes: usize,
    /// How long a partition lease lives without a heartbeat.
    pub lease_ttl: Duration,
    /// Longest time one blocking read waits for new entries.
    pub block: Duration,
    /// Entries fetched per read at most.
    pub fetch_count: usize,
    /// TLS files (`rediss://` only).
    pub tls: TlsFiles,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("connection_url", &redact_url(&self.connection_url))
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("retention", &self.retention)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("lease_ttl", &self.lease_ttl)
            .field("block", &self.block)
            .field("tls", &self.tls)
            .finish()
    }
}

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend(BACKEND)
}

impl RedisConfig {
    /// Parses a `redis://` or `rediss://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let mut parsed = url::Url::parse(url)
            .map_err(|e| config_error(format!("invalid Redis URL {}: {e}", redact_url(url))))?;
        if !busbar_core::raw::known::REDIS
            .schemes
            .contains(&parsed.scheme())
        {
            return Err(config_error(format!(
                "expected a redis:// or rediss:// URL, got {}",
                redact_url(url)
            )));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(config_error(format!(
                "the Redis URL {} has no host",
                redact_url(url)
            )));
        }
        let mut cfg = Self {
            connection_url: String::new(),
            prefix: "busbar".into(),
            partitions: 8,
            retention: 1_000_000,
            max_message_bytes: 1024 * 1024,
            lease_ttl: Duration::from_secs(6),
            block: Duration::from_millis(200),
            fetch_count: 100,
            tls: TlsFiles::default(),
        };
        let mut rest = Vec::new();
        for o in UrlOptions::parse("Redis", BACKEND, parsed.query()) {
            if cfg.tls.take(&o)? {
                continue;
            }
            match o.key() {
                "prefix" => {
                    busbar_core::limits::validate_topic(o.value())
                        .map_err(|_| o.invalid("is not a valid name"))?;
                    cfg.prefix = o.value().to_owned();
                }
                "partitions" => cfg.partitions = o.number_as(1..=1024)?,
                "retention" => cfg.retention = o.number(1..=u64::MAX)?,
                "max_message_bytes" => cfg.max_message_bytes = o.number_as(1..=u64::MAX)?,
                "lease_ttl_ms" => cfg.lease_ttl = o.millis(300..=u64::MAX)?,
                "block_ms" => cfg.block = o.millis(1..=u64::MAX)?,
                // The Redis client's own options (`protocol`, ...) are handed on.
                _ => rest.push(o.into_pair()),
            }
        }
        cfg.tls
            .check(parsed.scheme() == "rediss", "Redis", "rediss://", BACKEND)?;
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        cfg.connection_url = parsed.to_string();
        Ok(cfg)
    }

    /// The stream of partition `p` of `topic`.
    pub fn stream_key(&self, topic: &str, p: u32) -> String {
        format!("{}:{topic}:{p}", self.prefix)
    }

    /// The prefix of the partition streams of `topic` (the partition number follows).
    pub fn stream_prefix(&self, topic: &str) -> String {
        format!("{}:{topic}:", self.prefix)
    }

    /// The hash holding the topic's partition count.
    pub fn meta_key(&self, topic: &str) -> String {
        format!("{}:{topic}:meta", self.prefix)
    }

    /// The sorted set of live members of a group.
    pub fn members_key(&self, topic: &str, group: &str) -> String {
        format!("{}:{topic}:g:{group}:members", self.prefix)
    }

    /// The counter bumped whenever a group's membership changes.
    pub fn generation_key(&self, topic: &str, group: &str) -> String {
        format!("{}:{topic}:g:{group}:gen", self.prefix)
    }

    /// The prefix of a group's partition leases (the partition number follows).
    pub fn lease_prefix(&self, topic: &str, group: &str) -> String {
        format!("{}:{topic}:g:{group}:lease:", self.prefix)
    }

    /// The sorted set of delayed messages of a topic (score = due time in ms).
    pub fn delayed_key(&self, topic: &str) -> String {
        format!("{}:{topic}:delayed", self.prefix)
    }

    /// The prefix of the lists holding delayed messages' fields.
    pub fn delayed_entry_prefix(&self, topic: &str) -> String {
        format!("{}:{topic}:delayed:", self.prefix)
    }
}

pub use busbar_core::raw::partition_for;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busbar_options_are_taken_out_of_the_url() {
        let c = RedisConfig::from_url(
            "redis://user:pw@127.0.0.1:6380/2?partitions=4&prefix=app&protocol=resp3&lease_ttl_ms=1000",
        )
        .expect("valid");
        assert_eq!(c.partitions, 4);
        assert_eq!(c.prefix, "app");
        assert_eq!(c.lease_ttl, Duration::from_secs(1));
        assert_eq!(
            c.connection_url,
            "redis://user:pw@127.0.0.1:6380/2?protocol=resp3"
        );
        assert!(!format!("{c:?}").contains("pw"));
        let c = RedisConfig::from_url("rediss://h?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/k.pem")
            .expect("valid");
        assert_eq!(c.tls.key.as_deref(), Some(std::path::Path::new("/k.pem")));
        assert_eq!(c.connection_url, "rediss://h");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in [
            "redis://",
            "redis://h?partitions=0",
            "redis://h?partitions=x",
            // Was silently taken as 1024 before the shared option parser.
            "redis://h?partitions=5000",
            "redis://h?lease_ttl_ms=100",
            "redis://h?prefix=a%20b",
            // TLS files need rediss://, a certificate needs its key.
            "redis://h?tls_ca=/ca.pem",
            "rediss://h?tls_cert=/c.pem",
            "rediss://h?tls_key=",
            "http://h",
            "not a url",
        ] {
            let e = RedisConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::Config, "{url}");
        }
    }
}
