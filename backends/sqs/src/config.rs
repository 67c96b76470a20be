//! `sqs://` URL parsing and the SNS/SQS names busbar derives from topics and groups.

use std::fmt;
use std::time::Duration;

use busbar_core::raw::tls::TlsFiles;
use busbar_core::raw::{redact_url, UrlOptions};
use busbar_core::{Error, ErrorKind, Result};

use crate::BACKEND;

/// Where the credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The standard AWS chain (environment, profile, SSO, IMDS, ...).
    DefaultChain,
    /// A static key pair from the URL's user part (`sqs://KEY:SECRET@host:port`), meant for
    /// emulators. Never printed.
    Static {
        /// Access key id.
        access_key_id: String,
        /// Secret access key.
        secret_access_key: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::DefaultChain => f.write_str("DefaultChain"),
            Credentials::Static { access_key_id, .. } => {
                write!(f, "Static({access_key_id:?}, ***)")
            }
        }
    }
}

/// Configuration of a [`crate::SqsBus`].
///
/// URL: `sqs://[KEY:SECRET@][host[:port]][?options]`. Without a host the SDK's own endpoint
/// resolution is used (real AWS); with one, both SQS and SNS are sent to
/// `https://host:port` (`http://` with `tls=false`) — an emulator or a VPC endpoint.
///
/// Options: `region` (default: the SDK chain, else `us-east-1`), `tls` (`true`/`false`,
/// default true), `fifo` (`true`/`false`, default true: FIFO topics and queues, per-key
/// order), `prefix` (prepended to every SNS topic and SQS queue name, default `busbar-`),
/// `max_receive_count` (deliveries before SQS moves a message to the group's `-dlq` queue,
/// default 50 — receives include messages handed back unprocessed, see the README; 0 turns native redrive off), `receivers` (concurrent long polls per subscriber,
/// default 2), `wait_seconds` (long-poll wait, 1–20, default 2), `retention_seconds`
/// (queue retention, default 4 days), `tls_ca` (PEM certificates trusted besides the
/// system's, e.g. a private CA of an endpoint; not with `tls=false`). The AWS SDK's HTTP
/// client presents no client certificate: `tls_cert` and `tls_key` are `Config` errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsConfig {
    /// Endpoint override (`http(s)://host:port`), if the URL names a host.
    pub endpoint: Option<String>,
    /// AWS region.
    pub region: Option<String>,
    /// Credentials.
    pub credentials: Credentials,
    /// FIFO topics and queues (per-key order) or standard ones (no order).
    pub fifo: bool,
    /// Prefix of every SNS topic and SQS queue name.
    pub prefix: String,
    /// `maxReceiveCount` of the redrive policy; `None` = no native redrive.
    pub max_receive_count: Option<u32>,
    /// Concurrent long polls per subscriber.
    pub receivers: usize,
    /// Long-poll wait.
    pub wait: Duration,
    /// Queue retention.
    pub retention: Duration,
    /// The URL's `tls_ca` (`tls_cert` and `tls_key` are refused).
    pub tls_files: TlsFiles,
}

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend(BACKEND)
}

impl SqsConfig {
    /// Parses an `sqs://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| config_error(format!("invalid SQS URL {}: {e}", redact_url(url))))?;
        if parsed.scheme() != "sqs" {
            return Err(config_error(format!(
                "expected an sqs:// URL, got scheme {:?}",
                parsed.scheme()
            )));
        }
        if !matches!(parsed.path(), "" | "/") {
            return Err(config_error(format!(
                "the SQS URL {} has a path; queues are named by topic and group, not by URL",
                redact_url(url)
            )));
        }
        let credentials = credentials_of(&parsed, url)?;
        let mut cfg = Self {
            endpoint: None,
            region: None,
            credentials,
            fifo: true,
            prefix: "busbar-".into(),
            max_receive_count: Some(50),
            receivers: 2,
            wait: Duration::from_secs(2),
            retention: Duration::from_secs(4 * 24 * 3600),
            tls_files: TlsFiles::default(),
        };
        let tls = cfg.apply(parsed.query())?;
        cfg.tls_files
            .check(tls, "SQS", "sqs://host?tls=true", BACKEND)?;
        if cfg.tls_files.cert.is_some() || cfg.tls_files.key.is_some() {
            return Err(config_error(
                "the SQS URL options tls_cert and tls_key are not supported: the AWS SDK's HTTP client presents no client certificate".into(),
            ));
        }
        if let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) {
            let scheme = if tls { "https" } else { "http" };
            cfg.endpoint = Some(match parsed.port() {
                Some(port) => format!("{scheme}://{host}:{port}"),
                None => format!("{scheme}://{host}"),
            });
        }
        Ok(cfg)
    }

    /// Applies the URL's query options (typed, in range); returns whether to use TLS.
    fn apply(&mut self, query: Option<&str>) -> Result<bool> {
        let mut tls = true;
        const KNOWN: [&str; 9] = [
            "tls_ca",
            "region",
            "tls",
            "fifo",
            "prefix",
            "max_receive_count",
            "receivers",
            "wait_seconds",
            "retention_seconds",
        ];
        let options = UrlOptions::parse("SQS", BACKEND, query);
        for o in options.clone() {
            if self.tls_files.take(&o)? {
                continue;
            }
            match o.key() {
                "region" if !o.value().is_empty() => self.region = Some(o.value().to_owned()),
                "region" => {}
                "tls" => tls = o.flag()?,
                "fifo" => self.fifo = o.flag()?,
                "prefix" => {
                    if !o
                        .value()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(o.invalid("may hold only ASCII letters, digits, '-' and '_'"));
                    }
                    self.prefix = o.value().to_owned();
                }
                "max_receive_count" => {
                    self.max_receive_count = Some(o.number_as(0..=1000)?).filter(|n| *n > 0)
                }
                "receivers" => self.receivers = o.number_as(1..=64)?,
                "wait_seconds" => self.wait = o.secs(1..=20)?,
                "retention_seconds" => self.retention = o.secs(60..=1_209_600)?,
                _ => return Err(options.unknown(&o, &KNOWN)),
            }
        }
        Ok(tls)
    }

    /// The SNS topic name of a busbar topic (`.fifo` appended in FIFO mode).
    pub fn topic_name(&self, topic: &str) -> String {
        self.resource_name(&[topic], 256)
    }

    /// The SQS queue name of a consumer group of `topic`, within 76 of SQS's 80 bytes (room
    /// once kept for a `-dlq` suffix; kept so existing groups keep their queues).
    pub fn queue_name(&self, topic: &str, group: &str) -> String {
        self.resource_name(&[topic, group], QUEUE_NAME_MAX)
    }

    /// `prefix` + the escaped parts joined by `_-` (+ `.fifo`), within `max` bytes: a name
    /// that would be longer keeps its start and ends in a hash of the whole.
    fn resource_name(&self, parts: &[&str], max: usize) -> String {
        let suffix = if self.fifo { FIFO_SUFFIX } else { "" };
        let body = parts
            .iter()
            .map(|p| escape(p))
            .collect::<Vec<_>>()
            .join(SEPARATOR);
        let full = format!("{}{body}", self.prefix);
        let room = max - suffix.len();
        if full.len() <= room {
            return format!("{full}{suffix}");
        }
        let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, full.as_bytes()).simple();
        let hash = &hash.to_string()[..16];
        let keep = room - hash.len() - 1;
        format!("{}-{hash}{suffix}", &full[..keep])
    }
}

const FIFO_SUFFIX: &str = ".fifo";
const QUEUE_NAME_MAX: usize = 76;
/// Joins topic and group; [`escape`] never produces it, so names cannot collide.
const SEPARATOR: &str = "_-";

/// SNS and SQS names allow ASCII letters, digits, `-` and `_`; busbar names also allow `.`.
/// `_` escapes: `.` → `_d`, `_` → `__`, so distinct busbar names stay distinct.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '.' => out.push_str("_d"),
            '_' => out.push_str("__"),
            c => out.push(c),
        }
    }
    out
}

/// The credentials of a URL: `KEY:SECRET@` (percent-decoded), or none for the SDK's default
/// chain; one without the other is a `Config` error.
fn credentials_of(parsed: &url::Url, url: &str) -> Result<Credentials> {
    let user = busbar_core::raw::decode_userinfo(parsed.username());
    match (user.is_empty(), parsed.password()) {
        (true, None) => Ok(Credentials::DefaultChain),
        (false, Some(secret)) => Ok(Credentials::Static {
            access_key_id: user,
            secret_access_key: busbar_core::raw::decode_userinfo(secret),
        }),
        _ => Err(config_error(format!(
            "the SQS URL {} must carry both KEY and SECRET (KEY:SECRET@) or neither",
            redact_url(url)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_emulator_urls_and_options() {
        let c = SqsConfig::from_url(
            "sqs://test:se%2Fcret@127.0.0.1:4566?region=us-east-1&tls=false&fifo=false&max_receive_count=0&receivers=3&wait_seconds=5&prefix=app-",
        )
        .expect("valid");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.region.as_deref(), Some("us-east-1"));
        assert_eq!(
            c.credentials,
            Credentials::Static {
                access_key_id: "test".into(),
                secret_access_key: "se/cret".into()
            }
        );
        assert!(!format!("{c:?}").contains("se/cret"), "secret not printed");
        // AWS secret keys contain '+': a literal plus is not a space in a URL's userinfo.
        let plus = SqsConfig::from_url("sqs://AKIA:wJal+rX%2Bk@127.0.0.1:4566?region=us-east-1")
            .expect("valid");
        assert_eq!(
            plus.credentials,
            Credentials::Static {
                access_key_id: "AKIA".into(),
                secret_access_key: "wJal+rX+k".into()
            }
        );
        assert!(!c.fifo);
        assert_eq!(c.max_receive_count, None);
        assert_eq!((c.receivers, c.wait), (3, Duration::from_secs(5)));
        assert_eq!(c.prefix, "app-");

        let aws = SqsConfig::from_url("sqs://").expect("real AWS");
        assert_eq!(aws.endpoint, None);
        assert_eq!(aws.credentials, Credentials::DefaultChain);
        assert!(aws.fifo);
        assert_eq!(aws.max_receive_count, Some(50));
        let https = SqsConfig::from_url("sqs://vpce.example?region=eu-west-1").expect("https");
        assert_eq!(https.endpoint.as_deref(), Some("https://vpce.example"));
        let ca = SqsConfig::from_url("sqs://vpce.example?region=eu-west-1&tls_ca=/ca.pem")
            .expect("a private CA");
        assert_eq!(
            ca.tls_files.ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
    }

    #[test]
    fn rejects_bad_urls_with_config_errors() {
        for url in [
            "sqs:/x",
            "http://127.0.0.1:4566",
            "sqs://127.0.0.1:4566/queue",
            "sqs://onlykey@127.0.0.1",
            "sqs://127.0.0.1?fifo=maybe",
            "sqs://127.0.0.1?wait_seconds=21",
            "sqs://127.0.0.1?receivers=0",
            "sqs://127.0.0.1?prefix=a.b",
            "sqs://127.0.0.1?colour=blue",
            "sqs://127.0.0.1?tls=false&tls_ca=/ca.pem",
            "sqs://127.0.0.1?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/k.pem",
        ] {
            let e = SqsConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::Config, "{url}: {e}");
        }
        let e = SqsConfig::from_url("sqs://key:hunter2@127.0.0.1/q").expect_err("path");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn names_are_valid_distinct_and_bounded() {
        let fifo = SqsConfig::from_url("sqs://").expect("url");
        assert_eq!(
            fifo.topic_name("orders.created"),
            "busbar-orders_dcreated.fifo"
        );
        assert_ne!(fifo.topic_name("a.b"), fifo.topic_name("a_b"));
        assert_ne!(fifo.queue_name("a-_b", "c"), fifo.queue_name("a", "b_-c"));
        assert_ne!(fifo.queue_name("a_", "-b"), fifo.queue_name("a", "b"));
        let q = fifo.queue_name("orders", "billing");
        assert_eq!(q, "busbar-orders_-billing.fifo");
        let long = fifo.queue_name(&"t".repeat(200), &"g".repeat(120));
        assert!(long.len() <= 80 - 4, "{}", long.len());
        assert!(long.ends_with(".fifo"));
        assert_ne!(long, fifo.queue_name(&"t".repeat(200), &"h".repeat(120)));
        let standard = SqsConfig::from_url("sqs://?fifo=false").expect("url");
        assert_eq!(standard.queue_name("a", "b"), "busbar-a_-b");
        for name in [long, fifo.topic_name(&"x.y_z-".repeat(30))] {
            let base = name.trim_end_matches(".fifo");
            assert!(base
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        }
    }
}
