//! Redis client errors mapped onto busbar's error kinds.

use busbar_core::{Error, ErrorKind};
use redis::RedisError;

use crate::BACKEND;

/// Converts a redis-rs error, saying what busbar was doing.
pub(crate) fn map(e: RedisError, doing: &str) -> Error {
    if busbar_core::raw::tls::error_is_tls_trust_failure(&e) {
        let what = format!(
            "{doing}: the server's TLS certificate is not trusted (see the URL option tls_ca)"
        );
        return Error::new(ErrorKind::Auth, what)
            .with_backend(BACKEND)
            .with_source(e);
    }
    let kind = if e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code() == Some("WRONGPASS")
        || e.code() == Some("NOAUTH")
        || e.code() == Some("NOPERM")
    {
        ErrorKind::Auth
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.code() == Some("LOADING")
    {
        ErrorKind::Connection
    } else if e.kind() == redis::ErrorKind::InvalidClientConfig {
        ErrorKind::Config
    } else if matches!(
        e.kind(),
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
    ) {
        ErrorKind::Decode
    } else {
        ErrorKind::Broker
    };
    let what = match kind {
        ErrorKind::Auth => format!("{doing}: Redis refused the credentials or the permission"),
        ErrorKind::Connection => format!("{doing}: cannot reach Redis"),
        _ => format!("{doing}: {e}"),
    };
    Error::new(kind, what).with_backend(BACKEND).with_source(e)
}

/// Converts an error of connecting to `url`: a reply busbar cannot parse there means the
/// server speaks another protocol — a `Connection` error saying so, not a `Decode` error.
pub(crate) fn connecting(e: RedisError, url: &str) -> Error {
    let e = map(e, "connecting to Redis");
    if e.kind() != ErrorKind::Decode {
        return e;
    }
    Error::new(
        ErrorKind::Connection,
        format!(
            "the server at {} does not answer in the Redis protocol (another service on that port?): {e}",
            busbar_core::raw::redact_url(url)
        ),
    )
    .with_backend(BACKEND)
}

/// A reply of an unexpected shape.
pub(crate) fn decode(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, what).with_backend(BACKEND)
}
