//! `kafka://` / `kafkas://` URL parsing and the librdkafka settings busbar derives from it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use busbar_core::raw::tls::TlsFiles;
use busbar_core::raw::{redact_url, UrlOptions};
use busbar_core::{Error, ErrorKind, Result};

use crate::BACKEND;

/// Configuration of a [`crate::KafkaBus`].
///
/// URL: `kafka://[user:password@]host:port[,host:port...][?options]`; `kafkas://` turns TLS
/// on. A user and password in the URL mean SASL (mechanism `PLAIN` unless
/// `sasl.mechanism` says otherwise, e.g. `SCRAM-SHA-512`).
///
/// busbar options: `partitions` (partitions of a topic busbar creates, default 8),
/// `replication` (replication factor of topics busbar creates, default 1),
/// `partitioner` (how keys map to partitions, default `murmur2_random` as the Java client;
/// `consistent_random` as librdkafka-based clients), `max_message_bytes` (largest record,
/// default 1,000,000 — keep it at or below the
/// broker's `message.max.bytes`), `commit_interval_ms` (how often acked progress is
/// committed, default 200), `session_timeout_ms` (group session timeout, default 10,000).
/// On `kafkas://`: `tls_ca` (PEM certificates to trust — librdkafka then trusts them
/// instead of the system's), `tls_cert` and `tls_key` (a client certificate and its key,
/// for brokers that require one), as on every busbar URL.
/// Any option containing a dot (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`,
/// `client.id`, `linger.ms`, ...) is passed to librdkafka unchanged, for producers and
/// consumers alike; it wins over busbar's tuning defaults (the producer's `linger.ms` 0 and
/// `message.timeout.ms` 30,000), never over the settings busbar's guarantees rest on (the
/// producer's `enable.idempotence` and `acks=all`; the consumer's group, manual commits and
/// start position).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Partitions of a topic created by busbar.
    pub partitions: i32,
    /// Replication factor of a topic created by busbar.
    pub replication: i32,
    /// Largest record accepted, in bytes (librdkafka `message.max.bytes`).
    pub max_message_bytes: usize,
    /// How often acked progress is committed.
    pub commit_interval: Duration,
    /// Consumer group session timeout.
    pub session_timeout: Duration,
    /// librdkafka `partitioner` of the producer: `murmur2_random` (default: the Java client's
    /// placement of keys) or `consistent_random` (librdkafka's own default: confluent-kafka,
    /// kcat), or another of librdkafka's. Every producer of a topic must place keys alike.
    pub partitioner: String,
    /// The URL's `tls_ca`, `tls_cert` and `tls_key` (`kafkas://` only): librdkafka's
    /// `ssl.ca.location`, `ssl.certificate.location` and `ssl.key.location`.
    pub tls: TlsFiles,
    /// librdkafka settings applied to every client (security, SASL, TLS, client.id, ...).
    pub client: BTreeMap<String, String>,
}

/// Keys whose values are secrets: never printed.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".pem")
        || k == "sasl.oauthbearer.config"
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client: BTreeMap<&str, &str> = self
            .client
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("commit_interval", &self.commit_interval)
            .field("session_timeout", &self.session_timeout)
            .field("partitioner", &self.partitioner)
            .field("tls", &self.tls)
            .field("client", &client)
            .finish()
    }
}

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend(BACKEND)
}

impl KafkaConfig {
    /// Parses a `kafka://` or `kafkas://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let shown = redact_url(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| config_error(format!("invalid Kafka URL {shown}: no scheme")))?;
        let tls = scheme_is_tls(scheme)?;
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = authority.trim_end_matches('/');
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut cfg = Self {
            bootstrap_servers: bootstrap_servers(hosts, &shown)?,
            partitions: 8,
            replication: 1,
            max_message_bytes: 1_000_000,
            commit_interval: Duration::from_millis(200),
            session_timeout: Duration::from_secs(10),
            partitioner: "murmur2_random".to_owned(),
            tls: TlsFiles::default(),
            client: BTreeMap::new(),
        };
        let mut sasl = false;
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            cfg.client.insert(
                "sasl.username".into(),
                busbar_core::raw::decode_userinfo(user),
            );
            cfg.client.insert(
                "sasl.password".into(),
                busbar_core::raw::decode_userinfo(password),
            );
            cfg.client.insert("sasl.mechanism".into(), "PLAIN".into());
            sasl = true;
        }
        let protocol = match (tls, sasl) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        cfg.client
            .insert("security.protocol".into(), protocol.into());
        cfg.apply(query)?;
        cfg.tls.check(tls, "Kafka", "kafkas://", BACKEND)?;
        Ok(cfg)
    }

    /// Applies the URL's query options (typed, in range; librdkafka settings pass through).
    fn apply(&mut self, query: Option<&str>) -> Result<()> {
        /// librdkafka settings busbar's guarantees rest on: the idempotent, acks=all producer
        /// and the consumer that joins the subscription's group, commits only what was acked
        /// and starts where the subscription says.
        const BUSBARS_OWN: [&str; 7] = [
            "enable.idempotence",
            "request.required.acks",
            "group.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "auto.offset.reset",
            "enable.partition.eof",
        ];
        const KNOWN: [&str; 9] = [
            "partitions",
            "replication",
            "max_message_bytes",
            "commit_interval_ms",
            "session_timeout_ms",
            "tls_ca",
            "tls_cert",
            "tls_key",
            "partitioner; librdkafka settings contain a dot, e.g. security.protocol",
        ];
        let options = UrlOptions::parse("Kafka", BACKEND, query);
        for o in options.clone() {
            if self.tls.take(&o)? {
                continue;
            }
            match o.key() {
                "partitions" => self.partitions = o.number_as(1..=10_000)?,
                "replication" => self.replication = o.number_as(1..=100)?,
                "max_message_bytes" => {
                    self.max_message_bytes = o.number_as(1024..=1_000_000_000)?
                }
                "commit_interval_ms" => self.commit_interval = o.millis(10..=60_000)?,
                "session_timeout_ms" => self.session_timeout = o.millis(1_000..=3_600_000)?,
                "partitioner" => {
                    self.partitioner = o
                        .one_of(&[
                            "murmur2_random",
                            "murmur2",
                            "consistent_random",
                            "consistent",
                            "fnv1a_random",
                            "fnv1a",
                        ])?
                        .to_owned()
                }
                key if BUSBARS_OWN.contains(&key) => {
                    return Err(config_error(format!(
                        "the librdkafka setting {key} is set by busbar (its delivery, \
                         ordering and commit guarantees rest on it); remove it from the URL"
                    )))
                }
                key if key.contains('.') => {
                    let (k, v) = o.into_pair();
                    self.client.insert(k, v);
                }
                _ => return Err(options.unknown(&o, &KNOWN)),
            }
        }
        Ok(())
    }

    /// The producer's settings: the idempotent producer (acks from all in-sync replicas) with
    /// the configured partitioner (the Java client's by default), no linger and a 30 s
    /// delivery timeout unless the URL sets `linger.ms` / `message.timeout.ms`. No linger:
    /// every busbar publish awaits its delivery report, so a linger only delays it — records
    /// that queue up while a request is out still go together in the next one (on this
    /// machine `linger.ms` 2 → 0: awaited single publishes 390 → 3,600 msgs/s, batches of 100
    /// 24 k → 58 k, 16 concurrent publishers 5 k → 12–19 k, `e2e` 17–21 k → 27–35 k).
    pub(crate) fn producer_config(&self) -> rdkafka::ClientConfig {
        let mut c = self.base_with(&[("linger.ms", "0"), ("message.timeout.ms", "30000")]);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", &self.partitioner);
        c
    }

    /// The librdkafka settings shared by producer, consumer and admin client.
    pub(crate) fn base(&self) -> rdkafka::ClientConfig {
        self.base_with(&[])
    }

    /// [`KafkaConfig::base`] with tuning `defaults` that a librdkafka setting of the URL
    /// overrides.
    pub(crate) fn base_with(&self, defaults: &[(&str, &str)]) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set(
                "message.max.bytes",
                (self.max_message_bytes + 64 * 1024).to_string(),
            )
            .set("socket.connection.setup.timeout.ms", "10000")
            // Not every Kafka-protocol broker answers client telemetry; busbar does not use it.
            .set("enable.metrics.push", "false")
            .set("log_level", "4");
        for (key, path) in [
            ("ssl.ca.location", &self.tls.ca),
            ("ssl.certificate.location", &self.tls.cert),
            ("ssl.key.location", &self.tls.key),
        ] {
            if let Some(path) = path {
                c.set(key, path.to_string_lossy());
            }
        }
        // Set last: a librdkafka setting named in the URL wins.
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// Whether a Kafka URL's scheme asks for TLS: `kafka` no, `kafkas` yes, anything else a
/// `Config` error that echoes the scheme only when it is one (the text before "://" of a
/// malformed URL can hold user info).
fn scheme_is_tls(scheme: &str) -> Result<bool> {
    match scheme {
        "kafka" => Ok(false),
        "kafkas" => Ok(true),
        other => {
            let valid = other.len() <= 32
                && other.starts_with(|c: char| c.is_ascii_alphabetic())
                && other
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            let got = if valid {
                format!("scheme {other:?}")
            } else {
                "text that is not a URL scheme".to_owned()
            };
            Err(config_error(format!(
                "expected a kafka:// or kafkas:// URL, got {got} before \"://\""
            )))
        }
    }
}

/// The `bootstrap.servers` list of a URL's hosts (`host[:port]`, comma separated, default port
/// 9092), each checked by the URL parser (IPv6 in brackets works too).
fn bootstrap_servers(hosts: &str, shown: &str) -> Result<String> {
    let mut servers = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err(config_error(format!("the Kafka URL {shown} names no host")));
        }
        // Checks the host and port with the URL parser (IPv6 in brackets works too).
        let parsed = url::Url::parse(&format!("kafka://{host}")).map_err(|e| {
            config_error(format!("invalid broker address {host:?} in {shown}: {e}"))
        })?;
        let name = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| config_error(format!("invalid broker address {host:?} in {shown}")))?;
        servers.push(format!("{name}:{}", parsed.port().unwrap_or(9092)));
    }
    Ok(servers.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_options_and_credentials() {
        let c = KafkaConfig::from_url(
            "kafka://app:s%40cret@b1:9093,b2?partitions=12&replication=3&client.id=svc",
        )
        .expect("valid");
        assert_eq!(c.bootstrap_servers, "b1:9093,b2:9092");
        assert_eq!((c.partitions, c.replication), (12, 3));
        assert_eq!(c.client["sasl.username"], "app");
        assert_eq!(c.client["sasl.password"], "s@cret");
        let plus = KafkaConfig::from_url("kafka://app:a+b@b1").expect("valid");
        assert_eq!(plus.client["sasl.password"], "a+b");
        assert_eq!(c.client["security.protocol"], "sasl_plaintext");
        assert_eq!(c.client["client.id"], "svc");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s@cret"), "{shown}");
        assert_eq!(
            c.partitioner, "murmur2_random",
            "the Java client's placement by default"
        );
        let librdkafka = KafkaConfig::from_url("kafka://h?partitioner=consistent_random")
            .expect("librdkafka's placement");
        assert_eq!(librdkafka.partitioner, "consistent_random");
        let tls = KafkaConfig::from_url("kafkas://h:9093").expect("tls");
        assert_eq!(tls.client["security.protocol"], "ssl");
    }

    #[test]
    fn the_urls_librdkafka_settings_win_over_tuning_defaults_only() {
        let c = KafkaConfig::from_url("kafka://h?linger.ms=5&message.timeout.ms=5000").expect("ok");
        let p = c.producer_config();
        assert_eq!(p.get("linger.ms"), Some("5"));
        assert_eq!(p.get("message.timeout.ms"), Some("5000"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        for own in [
            "enable.idempotence=false",
            "request.required.acks=1",
            "group.id=other",
            "enable.auto.commit=true",
            "auto.offset.reset=earliest",
        ] {
            let e = KafkaConfig::from_url(&format!("kafka://h?{own}")).expect_err(own);
            assert_eq!(e.kind(), ErrorKind::Config, "{own}");
            assert!(e.to_string().contains("set by busbar"), "{own}: {e}");
        }
        let defaults = KafkaConfig::from_url("kafka://h")
            .expect("ok")
            .producer_config();
        assert_eq!(defaults.get("linger.ms"), Some("0"));
        assert_eq!(defaults.get("message.timeout.ms"), Some("30000"));
    }

    #[test]
    fn tls_files_become_librdkafka_ssl_locations_on_kafkas_only() {
        let c = KafkaConfig::from_url(
            "kafkas://u:p@h:9093?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/k.pem",
        )
        .expect("ok");
        assert_eq!(c.client["security.protocol"], "sasl_ssl");
        let base = c.base();
        assert_eq!(base.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(base.get("ssl.certificate.location"), Some("/c.pem"));
        assert_eq!(base.get("ssl.key.location"), Some("/k.pem"));
        let theirs = KafkaConfig::from_url("kafkas://h?tls_ca=/ca.pem&ssl.ca.location=/mine.pem")
            .expect("ok");
        assert_eq!(theirs.base().get("ssl.ca.location"), Some("/mine.pem"));
        for bad in [
            "kafka://h?tls_ca=/ca.pem",
            "kafkas://h?tls_cert=/c.pem",
            "kafkas://h?tls_key=/k.pem",
            "kafkas://h?tls_ca=",
        ] {
            let e = KafkaConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "http://h:1",
            "kafka://",
            "kafka://h:1,,h2",
            "kafka://h:99999",
            "kafka://h?partitions=0",
            "kafka://h?bogus=1",
            "kafka://h?partitioner=random_please",
            "kafka:h",
        ] {
            let e = KafkaConfig::from_url(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        }
        let e = KafkaConfig::from_url("kafka://u:hunter2@h?partitions=x").expect_err("bad option");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        // Found by fuzzing: what precedes "://" was echoed as the scheme, though it can hold
        // user info (here an ftp URL's password, as the URL standard reads it).
        let e = KafkaConfig::from_url("ftp:user:sup3rs3cretpassw0rd@host://x").expect_err("scheme");
        assert!(!e.to_string().contains("sup3rs3cret"), "{e}");
        let e = KafkaConfig::from_url("redis://h").expect_err("scheme");
        assert!(e.to_string().contains("\"redis\""), "{e}");
    }
}
