//! rdkafka errors mapped onto busbar's error kinds.

use busbar_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

use crate::BACKEND;

/// The busbar kind of a librdkafka error code.
pub(crate) fn kind_of_code(code: Code) -> ErrorKind {
    match code {
        Code::MessageSizeTooLarge | Code::InvalidMessageSize => ErrorKind::PayloadTooLarge,
        Code::MessageTimedOut | Code::RequestTimedOut | Code::OperationTimedOut => {
            ErrorKind::Timeout
        }
        Code::AllBrokersDown
        | Code::BrokerTransportFailure
        | Code::Resolve
        | Code::NetworkException
        | Code::BrokerNotAvailable => ErrorKind::Connection,
        Code::Authentication
        | Code::SaslAuthenticationFailed
        | Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::TransactionalIdAuthorizationFailed => ErrorKind::Auth,
        Code::InvalidTopic | Code::UnknownTopic => ErrorKind::InvalidTopic,
        _ => ErrorKind::Broker,
    }
}

/// The busbar kind of an rdkafka error.
pub(crate) fn kind_of(e: &KafkaError) -> ErrorKind {
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
        _ => e
            .rdkafka_error_code()
            .map_or(ErrorKind::Broker, kind_of_code),
    }
}

/// Converts an rdkafka error, saying what busbar was doing.
pub(crate) fn map(e: KafkaError, doing: &str) -> Error {
    Error::new(kind_of(&e), format!("{doing}: {e}"))
        .with_backend(BACKEND)
        .with_source(e)
}

/// Whether the error means the group has members right now (so a commit from outside the
/// group was refused, and the members' own positions apply).
pub(crate) fn is_active_group(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(Code::RebalanceInProgress | Code::UnknownMemberId | Code::IllegalGeneration)
    )
}

/// Whether the error is a partition between leaders (just created, or its leader moving):
/// worth asking again in a moment.
pub(crate) fn is_leader_moving(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            Code::NotLeaderForPartition
                | Code::LeaderNotAvailable
                | Code::UnknownTopicOrPartition
                | Code::NotCoordinator
                | Code::CoordinatorLoadInProgress
                | Code::CoordinatorNotAvailable
        )
    )
}

/// Runs a blocking librdkafka request again while it fails with [`is_leader_moving`]
/// (backing off from 10 ms to 200 ms), for at most `limit`.
pub(crate) fn retry_while_leader_moves<T>(
    limit: std::time::Duration,
    mut request: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let deadline = std::time::Instant::now() + limit;
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match request() {
            Err(e) if is_leader_moving(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}
