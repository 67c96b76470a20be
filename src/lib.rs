#![doc = include_str!("../README.md")]

pub use busbar_core::*;

use std::sync::Arc;

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

/// The backends busbar knows, each enabled when its Cargo feature is on. A known backend
/// whose feature is off is listed too, so [`connect`] can name the feature to enable.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    #[cfg(feature = "memory")]
    let memory_connect: Option<ConnectFn> = Some(memory::connect_boxed);
    #[cfg(not(feature = "memory"))]
    let memory_connect: Option<ConnectFn> = None;
    r.register(BackendEntry {
        name: "memory",
        schemes: memory::SCHEMES,
        feature: "memory",
        connect: memory_connect,
    });
    r.register(BackendEntry {
        name: "redis",
        schemes: &["redis", "rediss"],
        feature: "redis",
        #[cfg(feature = "redis")]
        connect: Some(busbar_redis::connect_boxed),
        #[cfg(not(feature = "redis"))]
        connect: None,
    });
    r.register(BackendEntry {
        name: "kafka",
        schemes: &["kafka", "kafkas"],
        feature: "kafka",
        #[cfg(feature = "kafka")]
        connect: Some(busbar_kafka::connect_boxed),
        #[cfg(not(feature = "kafka"))]
        connect: None,
    });
    r.register(BackendEntry {
        name: "nats",
        schemes: &["nats", "tls"],
        feature: "nats",
        #[cfg(feature = "nats")]
        connect: Some(busbar_nats::connect_boxed),
        #[cfg(not(feature = "nats"))]
        connect: None,
    });
    r.register(BackendEntry {
        name: "amqp",
        schemes: &["amqp", "amqps"],
        feature: "amqp",
        #[cfg(feature = "amqp")]
        connect: Some(busbar_amqp::connect_boxed),
        #[cfg(not(feature = "amqp"))]
        connect: None,
    });
    r.register(BackendEntry {
        name: "sqs",
        schemes: &["sqs"],
        feature: "sqs",
        #[cfg(feature = "sqs")]
        connect: Some(busbar_sqs::connect_boxed),
        #[cfg(not(feature = "sqs"))]
        connect: None,
    });
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
