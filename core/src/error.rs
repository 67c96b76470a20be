//! The one error type every busbar operation returns.

use std::fmt;

/// A boxed error from a broker client, kept reachable through [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of every busbar operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, independent of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The topic name is empty, too long or contains characters no broker accepts.
    InvalidTopic,
    /// Some other argument is invalid (an empty group name, a zero limit, ...).
    InvalidInput,
    /// The payload (with its metadata) is larger than the backend accepts.
    PayloadTooLarge,
    /// The backend does not support the operation; see [`crate::Capabilities`].
    Unsupported,
    /// The broker cannot be reached or the connection broke.
    Connection,
    /// The broker did not answer in time.
    Timeout,
    /// The broker refused the credentials or the permission.
    Auth,
    /// The bus, subscriber or delivery was closed.
    Closed,
    /// The delivery was already acked, nacked or dead-lettered.
    AlreadySettled,
    /// The broker refused the operation (authentication, missing resource, quota, ...).
    Broker,
    /// A message could not be decoded from its wire form.
    Decode,
    /// The configuration or URL is invalid.
    Config,
    /// A message handler failed (used by the consumer runner for handler errors and panics).
    Handler,
}

impl ErrorKind {
    /// Whether retrying the same operation later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Broker | ErrorKind::Handler
        )
    }

    /// A short lowercase name of the kind, as printed in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidTopic => "invalid topic",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Connection => "connection error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Closed => "closed",
            ErrorKind::AlreadySettled => "already settled",
            ErrorKind::Broker => "broker error",
            ErrorKind::Decode => "decode error",
            ErrorKind::Config => "configuration error",
            ErrorKind::Handler => "handler error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A busbar error: a [`ErrorKind`], a human message, the backend that raised it and the
/// underlying client error, if any.
#[derive(Debug, thiserror::Error)]
#[error("{}{kind}: {message}", backend_prefix(.backend))]
pub struct Error {
    kind: ErrorKind,
    message: String,
    backend: Option<&'static str>,
    #[source]
    source: Option<BoxError>,
}

fn backend_prefix(backend: &Option<&'static str>) -> String {
    backend.map(|b| format!("[{b}] ")).unwrap_or_default()
}

impl Error {
    /// Creates an error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            backend: None,
            source: None,
        }
    }

    /// Names the backend that raised the error.
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An [`ErrorKind::Unsupported`] error naming the backend and the operation.
    pub fn unsupported(backend: &'static str, operation: &str) -> Self {
        Self::new(
            ErrorKind::Unsupported,
            format!("{operation} is not supported by the {backend} backend"),
        )
        .with_backend(backend)
    }

    /// An [`ErrorKind::Closed`] error for `what` (bus, subscriber, delivery).
    pub fn closed(what: &str) -> Self {
        Self::new(ErrorKind::Closed, format!("the {what} is closed"))
    }

    /// The kind of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The backend that raised the error, if known.
    pub fn backend(&self) -> Option<&'static str> {
        self.backend
    }

    /// Whether retrying the same operation later can succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_backend_kind_and_message() {
        let e = Error::unsupported("memory", "publish with delay");
        assert_eq!(
            e.to_string(),
            "[memory] unsupported: publish with delay is not supported by the memory backend"
        );
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(!e.is_retryable());
    }

    #[test]
    fn source_is_reachable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::new(ErrorKind::Connection, "cannot connect").with_source(io);
        let src = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(src.as_deref(), Some("refused"));
        assert!(e.is_retryable());
    }
}
