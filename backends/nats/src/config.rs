//! `nats://` / `tls://` URL parsing and the names busbar uses on JetStream.

use std::fmt;
use std::time::Duration;

use busbar_core::raw::tls::TlsFiles;
use busbar_core::raw::{redact_url, UrlOptions};
use busbar_core::{Error, ErrorKind, Result};

use crate::BACKEND;

/// How to authenticate.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    None,
    /// User and password from the URL.
    UserPassword(String, String),
    /// A token (the URL's user part when there is no password).
    Token(String),
    /// A `.creds` file (URL option `creds`).
    CredsFile(String),
    /// A file holding an nkey seed (URL option `nkey`), as `nats --nkey` takes.
    NkeyFile(String),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword(u, _) => write!(f, "UserPassword({u:?}, ***)"),
            Auth::Token(_) => f.write_str("Token(***)"),
            Auth::CredsFile(p) => write!(f, "CredsFile({p:?})"),
            Auth::NkeyFile(p) => write!(f, "NkeyFile({p:?})"),
        }
    }
}

/// Configuration of a [`crate::NatsBus`].
///
/// URL: `nats://[user:password@|token@]host:port[?options]`, or `tls://...` to require TLS.
/// Options: `partitions` (subjects per new topic, default 8), `retention` (messages kept per
/// topic stream, default 1,000,000), `lease_ttl_ms` (partition lease, default 6000),
/// `creds` (path of a `.creds` file), `nkey` (path of a file holding an nkey seed, `SU...`,
/// as `nats --nkey` takes), `name` (client name); on `tls://` only, `tls_ca` (PEM
/// certificates to trust instead of the system's), `tls_cert` and `tls_key` (a client
/// certificate and its key, for servers that verify clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// `host:port` of the server.
    pub server: String,
    /// Whether TLS is required (`tls://`).
    pub tls: bool,
    /// Credentials.
    pub auth: Auth,
    /// Partitions of a topic created by this client.
    pub partitions: u32,
    /// Messages kept per topic stream.
    pub retention: i64,
    /// Partition lease TTL.
    pub lease_ttl: Duration,
    /// Client name shown by the server.
    pub name: String,
    /// TLS files (`tls://` only).
    pub tls_files: TlsFiles,
}

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend(BACKEND)
}

impl NatsConfig {
    /// Parses a `nats://` or `tls://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| config_error(format!("invalid NATS URL {}: {e}", redact_url(url))))?;
        let tls = match parsed.scheme() {
            "nats" => false,
            "tls" => true,
            other => {
                return Err(config_error(format!(
                    "expected a nats:// or tls:// URL, got scheme {other:?}"
                )))
            }
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| config_error(format!("the NATS URL {} has no host", redact_url(url))))?;
        let port = parsed.port().unwrap_or(4222);
        let user = busbar_core::raw::decode_userinfo(parsed.username());
        let auth = match (user.is_empty(), parsed.password()) {
            (true, _) => Auth::None,
            (false, Some(p)) => Auth::UserPassword(user, busbar_core::raw::decode_userinfo(p)),
            (false, None) => Auth::Token(user),
        };
        let mut cfg = Self {
            server: format!("{host}:{port}"),
            tls,
            auth,
            partitions: 8,
            retention: 1_000_000,
            lease_ttl: Duration::from_secs(6),
            name: "busbar".into(),
            tls_files: TlsFiles::default(),
        };
        const KNOWN: [&str; 9] = [
            "partitions",
            "retention",
            "lease_ttl_ms",
            "creds",
            "nkey",
            "name",
            "tls_ca",
            "tls_cert",
            "tls_key",
        ];
        let options = UrlOptions::parse("NATS", BACKEND, parsed.query());
        for o in options.clone() {
            if cfg.tls_files.take(&o)? {
                continue;
            }
            match o.key() {
                "partitions" => cfg.partitions = o.number_as(1..=1024)?,
                "retention" => cfg.retention = o.number_as(1..=i64::MAX as u64)?,
                "lease_ttl_ms" => cfg.lease_ttl = o.millis(300..=u64::MAX)?,
                "creds" => cfg.auth = Auth::CredsFile(o.value().to_owned()),
                "nkey" => cfg.auth = Auth::NkeyFile(o.value().to_owned()),
                "name" => cfg.name = o.value().to_owned(),
                _ => return Err(options.unknown(&o, &KNOWN)),
            }
        }
        cfg.tls_files.check(cfg.tls, "NATS", "tls://", BACKEND)?;
        Ok(cfg)
    }
}

/// A topic name as one NATS token and stream-name part: letters, digits and `-` stay, every
/// other byte becomes `_` and two hex digits (so `a.b` is `a_2Eb` and `a_b` is `a_5Fb`).
pub fn encode_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// JetStream stream and consumer names are at most 255 characters; longer ones keep their
/// start and end in a hash of the whole (`busbar_core::raw::fit_name`).
const NAME_MAX: usize = 255;

/// The stream of a topic: `BUSBAR_<encoded topic>`.
pub fn stream_name(topic: &str) -> String {
    busbar_core::raw::fit_name(&format!("BUSBAR_{}", encode_topic(topic)), NAME_MAX)
}

/// The subject of partition `p` of a topic: `busbar.<encoded topic>.<p>`.
pub fn subject(topic: &str, p: u32) -> String {
    format!("busbar.{}.{p}", encode_topic(topic))
}

/// A subject of its own for one scheduled (delayed) message: `busbar.<encoded topic>.s<uuid>`.
/// It lies in the topic's stream but under no partition, so no group reads it; the server
/// publishes the message to its partition subject when it is due.
pub fn schedule_subject(topic: &str) -> String {
    format!(
        "busbar.{}.s{}",
        encode_topic(topic),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether a server version such as `2.15.1` (or `2.12.0-beta.1`) is at least `min`
/// (major, minor); an unreadable version counts as too old.
pub fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// The durable consumer of a group on partition `p`: `<encoded group>-p<p>`.
pub fn consumer_name(group: &str, p: u32) -> String {
    busbar_core::raw::fit_name(&format!("{}-p{p}", encode_topic(group)), NAME_MAX)
}

pub use busbar_core::raw::partition_for;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_options() {
        let c =
            NatsConfig::from_url("nats://alice:p%40ss@127.0.0.1:4223?partitions=4").expect("ok");
        assert_eq!(c.server, "127.0.0.1:4223");
        assert_eq!(c.auth, Auth::UserPassword("alice".into(), "p@ss".into()));
        assert_eq!(c.partitions, 4);
        assert!(!format!("{c:?}").contains("p@ss"));
        let plus = NatsConfig::from_url("nats://bob:a+b@127.0.0.1:4223").expect("ok");
        assert_eq!(plus.auth, Auth::UserPassword("bob".into(), "a+b".into()));
        let t = NatsConfig::from_url("tls://tok3n@example.com").expect("ok");
        assert!(t.tls);
        assert_eq!(t.auth, Auth::Token("tok3n".into()));
        assert!(!format!("{t:?}").contains("tok3n"));
        let f = NatsConfig::from_url("tls://h?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/k.pem")
            .expect("ok");
        assert_eq!(
            f.tls_files.ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        let n = NatsConfig::from_url("nats://h?nkey=/keys/app.nk").expect("ok");
        assert_eq!(n.auth, Auth::NkeyFile("/keys/app.nk".into()));
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in [
            "nats://",
            "nats://h?partitions=0",
            "nats://h?nope=1",
            "nats://h?tls_ca=/ca.pem",
            "tls://h?tls_key=/k.pem",
            "redis://h",
            "x",
        ] {
            let e = NatsConfig::from_url(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::Config, "{url}");
        }
    }

    #[test]
    fn topic_encoding_is_injective_and_token_safe() {
        assert_eq!(encode_topic("a.b"), "a_2Eb");
        assert_eq!(encode_topic("a_b"), "a_5Fb");
        assert_eq!(encode_topic("Orders-1"), "Orders-1");
        assert_eq!(subject("a.b", 3), "busbar.a_2Eb.3");
        assert_eq!(stream_name("a.b"), "BUSBAR_a_2Eb");
    }
}
