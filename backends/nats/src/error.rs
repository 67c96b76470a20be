//! async-nats errors mapped onto busbar's error kinds.

use busbar_core::{Error, ErrorKind};

use crate::BACKEND;

/// Converts an async-nats error, saying what busbar was doing. `kind` is chosen by the caller
/// from the typed error kind of the failed call.
pub(crate) fn map(
    kind: ErrorKind,
    e: impl Into<busbar_core::raw::BoxError> + std::fmt::Display,
    doing: &str,
) -> Error {
    Error::new(kind, format!("{doing}: {e}"))
        .with_backend(BACKEND)
        .with_source(e)
}

/// A reply or message of an unexpected shape.
pub(crate) fn decode(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, what).with_backend(BACKEND)
}

/// The kind of a JetStream publish failure.
pub(crate) fn publish_kind(k: async_nats::jetstream::context::PublishErrorKind) -> ErrorKind {
    use async_nats::jetstream::context::PublishErrorKind as K;
    match k {
        K::TimedOut => ErrorKind::Timeout,
        K::BrokenPipe => ErrorKind::Connection,
        K::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        _ => ErrorKind::Broker,
    }
}

/// The kind of a connect failure.
pub(crate) fn connect_kind(k: async_nats::ConnectErrorKind) -> ErrorKind {
    use async_nats::ConnectErrorKind as K;
    match k {
        K::ServerParse | K::Tls => ErrorKind::Config,
        K::Authentication | K::AuthorizationViolation => ErrorKind::Auth,
        K::TimedOut => ErrorKind::Timeout,
        K::Dns | K::Io | K::MaxReconnects => ErrorKind::Connection,
    }
}

/// Converts a failure to connect: a server certificate the client does not trust is `Auth`
/// (as a refused password is), the rest by [`connect_kind`].
pub(crate) fn connecting(e: async_nats::ConnectError) -> Error {
    if busbar_core::raw::tls::error_is_tls_trust_failure(&e) {
        let what = "connecting to NATS: the server's TLS certificate is not trusted (see the URL option tls_ca)";
        return Error::new(ErrorKind::Auth, what)
            .with_backend(BACKEND)
            .with_source(e);
    }
    map(connect_kind(e.kind()), e, "connecting to NATS")
}

/// Any other request failure: a time-out when the text says so, otherwise a broker error.
pub(crate) fn request_kind(e: &dyn std::fmt::Display) -> ErrorKind {
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("timed out") || text.contains("timeout") {
        ErrorKind::Timeout
    } else if text.contains("broken pipe")
        || text.contains("disconnect")
        || text.contains("connection")
    {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    }
}
