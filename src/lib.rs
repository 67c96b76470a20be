#![doc = include_str!("../README.md")]

pub use busbar_core::{
    dead_letter, envelope, idempotency, limits, memory, retry, telemetry, BrowseFrom,
    BrowseOptions, Bus, Capabilities, Consumer, ConsumerReport, DeadLetterPolicy, Delivery, Error,
    ErrorKind, Event, EventBus, EventBusExt, Headers, Message, NackAction, Ordering, Permanent,
    PublishOptions, Result, RetryPolicy, StartPosition, SubscribeOptions, Subscriber,
};

use std::sync::Arc;

use busbar_core::raw::{known, BackendEntry, ConnectFn, Identity, Registry};

/// The NATS JetStream backend, re-exported when the `nats` feature is on.
#[cfg(feature = "nats")]
pub use busbar_nats as nats;

/// The Kafka backend, re-exported when the `kafka` feature is on.
#[cfg(feature = "kafka")]
pub use busbar_kafka as kafka;

/// The RabbitMQ backend, re-exported when the `amqp` feature is on.
#[cfg(feature = "amqp")]
pub use busbar_amqp as amqp;

/// The AWS SQS + SNS backend, re-exported when the `sqs` feature is on.
#[cfg(feature = "sqs")]
pub use busbar_sqs as sqs;

/// The Redis backend, re-exported when the `redis` feature is on.
#[cfg(feature = "redis")]
pub use busbar_redis as redis;

/// How to connect to the backend `id`, when its feature is on.
fn enabled(id: &Identity) -> Option<ConnectFn> {
    match id.name {
        #[cfg(feature = "memory")]
        "memory" => Some(memory::connect_boxed),
        #[cfg(feature = "redis")]
        "redis" => Some(busbar_core::raw::connect_boxed::<busbar_redis::Redis>),
        #[cfg(feature = "kafka")]
        "kafka" => Some(busbar_core::raw::connect_boxed::<busbar_kafka::Kafka>),
        #[cfg(feature = "nats")]
        "nats" => Some(busbar_core::raw::connect_boxed::<busbar_nats::Nats>),
        #[cfg(feature = "amqp")]
        "amqp" => Some(busbar_core::raw::connect_boxed::<busbar_amqp::Amqp>),
        #[cfg(feature = "sqs")]
        "sqs" => Some(busbar_core::raw::connect_boxed::<busbar_sqs::Sqs>),
        _ => None,
    }
}

/// The backends busbar knows, each with a way to connect when its Cargo feature is on (a
/// known backend whose feature is off is listed too, so [`connect`] can name the feature).
fn registry() -> Registry {
    let mut r = Registry::new();
    for identity in known::ALL {
        r.register(BackendEntry {
            identity,
            connect: enabled(&identity),
        });
    }
    r
}

/// Connects to the broker named by `url`, choosing the backend by scheme.
///
/// Errors: [`ErrorKind::Config`] for a malformed URL, an unknown scheme (the message lists
/// the known ones) or a backend whose feature is off (the message names the feature);
/// otherwise the backend's own connection errors.
pub async fn connect(url: &str) -> Result<Arc<dyn EventBus>> {
    registry().connect(url).await
}
