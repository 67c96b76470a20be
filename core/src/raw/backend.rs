//! The trait a broker backend implements, and who each backend is.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::bus::{EventBus, Subscriber};
use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::front::Bus;
use crate::message::Message;
use crate::options::{PublishOptions, SubscribeOptions};

/// Who a backend is: its name (in errors and reports), its URL schemes and the Cargo feature
/// of the `busbar` crate that enables it. Written once, in [`known`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Backend name (`redis`, `kafka`, ...).
    pub name: &'static str,
    /// URL schemes it serves.
    pub schemes: &'static [&'static str],
    /// The Cargo feature of the `busbar` crate that enables it.
    pub feature: &'static str,
}

/// The backends busbar knows (the facade registers each, enabled or not, so an URL of a
/// backend whose feature is off gets an error naming the feature).
pub mod known {
    use super::Identity;

    /// The embedded in-memory backend.
    pub const MEMORY: Identity = Identity {
        name: "memory",
        schemes: &["memory"],
        feature: "memory",
    };
    /// Redis Streams.
    pub const REDIS: Identity = Identity {
        name: "redis",
        schemes: &["redis", "rediss"],
        feature: "redis",
    };
    /// Apache Kafka.
    pub const KAFKA: Identity = Identity {
        name: "kafka",
        schemes: &["kafka", "kafkas"],
        feature: "kafka",
    };
    /// NATS JetStream.
    pub const NATS: Identity = Identity {
        name: "nats",
        schemes: &["nats", "tls"],
        feature: "nats",
    };
    /// RabbitMQ (AMQP 0-9-1).
    pub const AMQP: Identity = Identity {
        name: "amqp",
        schemes: &["amqp", "amqps"],
        feature: "amqp",
    };
    /// AWS SQS + SNS.
    pub const SQS: Identity = Identity {
        name: "sqs",
        schemes: &["sqs"],
        feature: "sqs",
    };
    /// Every known backend.
    pub const ALL: [Identity; 6] = [MEMORY, REDIS, KAFKA, NATS, AMQP, SQS];
}

/// What a broker backend implements: the translation to its broker, nothing more.
///
/// The [`Bus`] in front of it has already checked everything the contract asks before any
/// method is called: the bus is open; topic and group names are valid; options are within
/// bounds; every message of a batch fits [`Capabilities::message_max_bytes`] and the
/// metadata limits; a batch is not empty and within [`Capabilities::batch_max_size`]; a
/// delay is supported and within [`Capabilities::publish_delay_max`]; `Earliest` is asked
/// only with [`Capabilities::replay`]. Dead letters are published by the [`Bus`] too (a
/// subscriber hands an unreadable message over with [`super::undecodable`]), so a backend
/// never publishes one itself. What a backend still decides: how names map to the broker
/// (within the broker's limits: [`super::fit_name`]), and limits only the broker knows
/// (report them as the typed error the contract names: `PayloadTooLarge`, `InvalidInput`).
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Who this backend is.
    const IDENTITY: Identity;

    /// What this backend can do on the server it is connected to.
    fn capabilities(&self) -> Capabilities;

    /// The version the broker reported at connect time, where the protocol says.
    fn server_version(&self) -> Option<String> {
        None
    }

    /// Publishes `messages` (at least one, already checked) to `topic`, in order, all or
    /// none where the broker allows, and returns once the broker accepted them.
    async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()>;

    /// Joins `options.group` on `topic` (creating the group at `options.start`).
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>>;

    /// Creates the group without consuming. Idempotent.
    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()>;

    /// How many messages of `topic` the group has not received yet (0 for a group or topic
    /// that does not exist). Called only with capability `consumer_lag` on.
    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let _ = (topic, group);
        Err(crate::Error::unsupported(
            Self::IDENTITY.name,
            "reading consumer lag",
        ))
    }

    /// Reads up to `options.limit` messages of `topic` without a group (see
    /// [`crate::EventBus::browse`]; [`merge_by_time`](crate::raw::merge_by_time) merges
    /// partitions). Called only with capability `browse` on, with checked options.
    async fn browse(
        &self,
        topic: &str,
        options: &crate::BrowseOptions,
    ) -> Result<Vec<crate::Message>> {
        let _ = (topic, options);
        Err(crate::Error::unsupported(
            Self::IDENTITY.name,
            "browsing a topic",
        ))
    }

    /// Closes the connection: open subscribers end, later acks fail with `Closed`. Called
    /// once.
    async fn close(&self) -> Result<()>;
}

/// A backend that connects from a URL or an explicit configuration: [`Bus::connect`],
/// [`Bus::with_config`] and [`Bus::config`] come from here.
#[async_trait]
pub trait Connect: Backend + Sized {
    /// The backend's configuration type.
    type Config: fmt::Debug + Send + Sync + 'static;

    /// Parses `url` into a configuration. Errors: `Config`.
    fn config_from_url(url: &str) -> Result<Self::Config>;

    /// Connects with `config`. Errors: `Connection`, `Auth`, `Config`.
    async fn connect_with(config: Self::Config) -> Result<Self>;

    /// The configuration this backend connected with.
    fn config(&self) -> &Self::Config;
}

/// Opens a bus of backend `B` from a URL, as a trait object: the registry's [`super::ConnectFn`]
/// for `B` is `connect_boxed::<B>`.
pub fn connect_boxed<B: Connect>(url: String) -> BoxFuture<'static, Result<Arc<dyn EventBus>>> {
    Box::pin(async move { Ok(Arc::new(Bus::<B>::connect(&url).await?) as Arc<dyn EventBus>) })
}
