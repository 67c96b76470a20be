//! AWS SDK errors mapped onto busbar's error kinds.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use busbar_core::{Error, ErrorKind};

use crate::BACKEND;

/// Error codes of refused credentials or permissions (SQS and SNS spell them differently).
const AUTH_CODES: &[&str] = &[
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AccessDeniedException",
    "AuthorizationError",
    "UnrecognizedClientException",
    "ExpiredToken",
    "InvalidSecurity",
    "MissingAuthenticationToken",
    "IncompleteSignature",
];

/// Error codes of throttling; the SDK already retried them with backoff.
const THROTTLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "AWS.SimpleQueueService.RequestThrottled",
];

/// Error codes of a missing queue or topic.
const MISSING_CODES: &[&str] = &[
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
    "NotFound",
    "NotFoundException",
];

/// Converts an SDK error, saying what busbar was doing.
pub(crate) fn map<E, R>(e: SdkError<E, R>, doing: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let text = DisplayErrorContext(&e).to_string();
    let untrusted = matches!(e, SdkError::DispatchFailure(_))
        && busbar_core::raw::tls::is_tls_trust_failure(&text);
    let kind = match &e {
        _ if untrusted => ErrorKind::Auth,
        SdkError::ConstructionFailure(_) if text.contains("credentials") => ErrorKind::Auth,
        SdkError::ConstructionFailure(_) => ErrorKind::Config,
        SdkError::TimeoutError(_) => ErrorKind::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => ErrorKind::Timeout,
        SdkError::DispatchFailure(_) if text.contains("credentials") => ErrorKind::Auth,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => ErrorKind::Connection,
        SdkError::ServiceError(s) => code_kind(s.err().code()),
        _ => ErrorKind::Broker,
    };
    let code = e.code().map(|c| format!(" [{c}]")).unwrap_or_default();
    let what = match (kind, e.code()) {
        _ if untrusted => {
            " (the server's TLS certificate is not trusted; see the URL option tls_ca)"
        }
        (ErrorKind::Auth, _) => " (the credentials or permissions were refused)",
        (_, Some(c)) if MISSING_CODES.contains(&c) => " (the queue or topic does not exist)",
        (ErrorKind::Timeout, Some(_)) => " (throttled, after the SDK's retries with backoff)",
        _ => "",
    };
    Error::new(kind, format!("{doing}{code}{what}: {text}"))
        .with_backend(BACKEND)
        .with_source(e)
}

fn code_kind(code: Option<&str>) -> ErrorKind {
    match code {
        Some(c) if AUTH_CODES.contains(&c) => ErrorKind::Auth,
        Some(c) if THROTTLE_CODES.contains(&c) => ErrorKind::Timeout,
        _ => ErrorKind::Broker,
    }
}

/// Whether `e` says the queue is gone (deleted under a running subscriber).
pub(crate) fn is_missing<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code().is_some_and(|c| MISSING_CODES.contains(&c))
}

/// The same error again, without its source (errors are not `Clone`), for several waiters.
pub(crate) fn copy(e: &Error) -> Error {
    Error::new(e.kind(), e.message()).with_backend(BACKEND)
}

/// A reply of an unexpected shape.
pub(crate) fn decode(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, what).with_backend(BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_choose_kinds() {
        assert_eq!(code_kind(Some("InvalidClientTokenId")), ErrorKind::Auth);
        assert_eq!(code_kind(Some("RequestThrottled")), ErrorKind::Timeout);
        assert_eq!(code_kind(Some("QueueDoesNotExist")), ErrorKind::Broker);
        assert_eq!(code_kind(None), ErrorKind::Broker);
    }
}
