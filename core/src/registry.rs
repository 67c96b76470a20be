//! The scheme registry behind `busbar::connect(url)`, and URL redaction.

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::bus::EventBus;
use crate::error::{Error, ErrorKind, Result};
use crate::raw::Identity;

/// Opens a bus from a URL: [`crate::raw::connect_boxed`] of a backend.
pub type ConnectFn = fn(String) -> BoxFuture<'static, Result<Arc<dyn EventBus>>>;

/// A backend known to the registry: who it is and either a way to connect or, when its
/// feature is off, nothing (the registry then names the feature to enable).
#[derive(Clone)]
pub struct BackendEntry {
    /// Name, schemes and feature.
    pub identity: Identity,
    /// How to connect, when the feature is enabled.
    pub connect: Option<ConnectFn>,
}

impl fmt::Debug for BackendEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendEntry")
            .field("identity", &self.identity)
            .field("enabled", &self.connect.is_some())
            .finish()
    }
}

/// An explicit list of backends, searched by URL scheme.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<BackendEntry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend (enabled when `entry.connect` is set). Later entries win on a scheme
    /// that is registered twice.
    pub fn register(&mut self, entry: BackendEntry) -> &mut Self {
        self.entries.insert(0, entry);
        self
    }

    /// The registered backends.
    pub fn entries(&self) -> &[BackendEntry] {
        &self.entries
    }

    /// Connects to `url` with the backend of its scheme.
    ///
    /// Errors: [`ErrorKind::Config`] for a malformed URL, an unknown scheme (the message lists
    /// the known ones) or a known scheme whose feature is off (the message names it); otherwise
    /// whatever the backend returns.
    pub async fn connect(&self, url: &str) -> Result<Arc<dyn EventBus>> {
        let scheme = scheme_of(url)?;
        let Some(entry) = self
            .entries
            .iter()
            .find(|e| e.identity.schemes.contains(&scheme))
        else {
            let mut known: Vec<&str> = self
                .entries
                .iter()
                .flat_map(|e| e.identity.schemes.iter().copied())
                .collect();
            known.sort_unstable();
            known.dedup();
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "unknown URL scheme {scheme:?} in {}; known schemes: {}",
                    redact_url(url),
                    known.join(", ")
                ),
            ));
        };
        match entry.connect {
            Some(connect) => connect(url.to_owned()).await,
            None => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the {} backend (scheme {scheme:?}) is not compiled in; enable the `{}` feature of the busbar crate",
                    entry.identity.name, entry.identity.feature
                ),
            )),
        }
    }
}

fn scheme_of(url: &str) -> Result<&str> {
    let malformed = || {
        Error::new(
            ErrorKind::Config,
            format!(
                "malformed URL {:?}: expected <scheme>://...",
                redact_url(url)
            ),
        )
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(malformed)?;
    let valid = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid || rest.contains(char::is_whitespace) {
        return Err(malformed());
    }
    Ok(scheme)
}

/// Query parameters whose values are secrets and never printed.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "token",
    "secret",
    "sasl.password",
    "aws_secret_access_key",
    "secret_key",
    "session_token",
    "nkey",
    "creds",
];

/// `url` with its password and secret query values replaced by `***`, for logs and errors.
///
/// ```
/// assert_eq!(
///     busbar_core::raw::redact_url("redis://user:hunter2@localhost:6379/0?token=abc&x=1"),
///     "redis://user:***@localhost:6379/0?token=***&x=1"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Not parseable: hide everything between "://" and "@", which is where secrets live.
        return match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(a)) if a > s => format!("{}://***{}", &url[..s], &url[a..]),
            _ => url.to_owned(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        // A user without a password may be a token (`nats://<token>@host`): hidden too.
        let _ = parsed.set_username("***");
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = SECRET_PARAMS
                    .iter()
                    .any(|s| k.eq_ignore_ascii_case(s) || k.to_ascii_lowercase().ends_with(s));
                (
                    k.into_owned(),
                    if secret { "***".into() } else { v.into_owned() },
                )
            })
            .collect();
        let mut q = parsed.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
    }
    parsed.to_string().replace("%2A%2A%2A", "***")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBus;

    fn connect_memory(url: String) -> BoxFuture<'static, Result<Arc<dyn EventBus>>> {
        Box::pin(async move { Ok(Arc::new(MemoryBus::from_url(&url)?) as Arc<dyn EventBus>) })
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(BackendEntry {
            identity: crate::raw::known::MEMORY,
            connect: Some(connect_memory),
        });
        r.register(BackendEntry {
            identity: crate::raw::known::REDIS,
            connect: None,
        });
        r
    }

    #[tokio::test]
    async fn connects_by_scheme() {
        let bus = registry().connect("memory://").await.expect("memory");
        assert_eq!(bus.backend(), "memory");
    }

    #[tokio::test]
    async fn unknown_scheme_lists_known_ones() {
        let e = registry().connect("foo://x").await.expect_err("unknown");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("memory, redis, rediss"), "{e}");
    }

    #[tokio::test]
    async fn disabled_feature_is_named() {
        let e = registry()
            .connect("redis://u:secret@127.0.0.1")
            .await
            .expect_err("off");
        assert!(e.message().contains("enable the `redis` feature"), "{e}");
        assert!(!e.to_string().contains("secret"));
    }

    #[tokio::test]
    async fn malformed_urls_are_config_errors() {
        for url in ["", "memory", "://x", "me mory://x", "memory://a b"] {
            let e = registry().connect(url).await.expect_err(url);
            assert_eq!(e.kind(), ErrorKind::Config, "{url}");
        }
    }

    #[test]
    fn redaction_hides_secrets() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("kafka://h:9092?sasl.password=pw&sasl.username=u"),
            "kafka://h:9092?sasl.password=***&sasl.username=u"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert!(!redact_url("x://user:pa ss@h").contains("pa ss"));
        // A user without a password may be a token.
        assert_eq!(
            redact_url("nats://s3cr3tT0ken@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
    }
}
