#![doc = include_str!("../README.md")]

mod attempts;
mod codec;
pub mod config;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod history;
mod server;
mod subscriber;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use async_trait::async_trait;
use busbar_core::raw::{known, partition_for, Backend, Connect, Identity};
use busbar_core::{
    Bus, Capabilities, Error, ErrorKind, Message, Ordering, PublishOptions, Result,
    SubscribeOptions, Subscriber,
};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use config::AmqpConfig;

pub(crate) const BACKEND: &str = known::AMQP.name;

/// The longest the declarations of one group may take before they are made again.
const DECLARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The group that keeps a dead-letter topic's messages until they are redriven.
use busbar_core::dead_letter::GROUP as REDRIVE_GROUP;

/// Converts a lapin error, saying what busbar was doing.
pub(crate) fn map_err(e: lapin::Error, doing: &str) -> Error {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let kind = if lower.contains("access_refused") || lower.contains("auth") {
        ErrorKind::Auth
    } else if lower.contains("precondition_failed") || lower.contains("not_allowed") {
        ErrorKind::Config
    } else if lower.contains("io") || lower.contains("connection") || lower.contains("closed") {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    };
    Error::new(kind, format!("{doing}: {text}"))
        .with_backend(BACKEND)
        .with_source(e)
}

/// A failure of the client's channel or connection state rather than a refusal by the server.
fn transient(e: &Error) -> bool {
    let text = e.to_string();
    e.kind() == ErrorKind::Timeout
        || text.contains("invalid channel state")
        || text.contains("invalid connection state")
}

pub(crate) fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// The arguments of a partition queue of `topic`: quorum, single active consumer, optional
/// expiry, optional delivery limit with at-least-once dead-lettering into `<topic>.dlq`
/// (the routing key, the partition, is kept); without one, whatever makes the server keep a
/// message however often it is handed back (see [`server::Server::unlimited_delivery_limit`]).
fn queue_arguments(config: &AmqpConfig, server: &server::Server, topic: &str) -> FieldTable {
    let mut args = vec![
        (
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        ),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
    ];
    if let Some(d) = config.queue_expires {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        args.push(("x-expires", AMQPValue::LongLongInt(ms)));
    }
    let limit = config.delivery_limit.filter(|_| !topic.ends_with(".dlq"));
    if limit.is_none() {
        if let Some(unlimited) = server.unlimited_delivery_limit() {
            args.push(("x-delivery-limit", AMQPValue::LongLongInt(unlimited)));
        }
    }
    if let Some(limit) = limit {
        let dlq = config::exchange(&busbar_core::dead_letter::default_topic(topic));
        args.extend([
            ("x-delivery-limit", AMQPValue::LongLongInt(i64::from(limit))),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from(dlq.as_str())),
            ),
            (
                "x-dead-letter-strategy",
                AMQPValue::LongString(LongString::from("at-least-once")),
            ),
            // at-least-once dead-lettering requires it.
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("reject-publish")),
            ),
        ]);
    }
    table(&args)
}

/// Opens a channel. lapin may still be closing a channel whose id it hands out again
/// ("invalid channel state: Closing"); that is retried a few times.
pub(crate) async fn create_channel(conn: &Connection) -> Result<Channel> {
    let mut attempt = 0;
    loop {
        match conn.create_channel().await {
            Ok(c) => return Ok(c),
            Err(e) if attempt < 10 && e.to_string().contains("invalid channel state") => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(map_err(e, "opening a channel")),
        }
    }
}

/// The TLS settings of an `amqps://` connection: the URL's `tls_ca` besides the system's
/// CAs, and its client certificate.
fn tls_config(config: &AmqpConfig) -> Result<OwnedTLSConfig> {
    let cert_chain = config
        .tls
        .read_ca(BACKEND)?
        .map(|pem| {
            String::from_utf8(pem).map_err(|_| {
                Error::new(
                    ErrorKind::Config,
                    "URL option tls_ca: the file is not UTF-8 PEM text",
                )
                .with_backend(BACKEND)
            })
        })
        .transpose()?;
    let identity = config
        .tls
        .read_identity(BACKEND)?
        .map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key });
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

pub(crate) async fn open(config: &AmqpConfig) -> Result<Connection> {
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| map_err(e, "starting the AMQP client's runtime"))?;
    let connect = Connection::connect_with_config(
        &config.uri,
        ConnectionProperties::default(),
        tls_config(config)?,
        runtime,
    );
    match tokio::time::timeout(std::time::Duration::from_secs(15), connect).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) if busbar_core::raw::tls::error_is_tls_trust_failure(&e) => Err(Error::new(
            ErrorKind::Auth,
            format!(
                "connecting to RabbitMQ: the server's TLS certificate is not trusted (see the URL option tls_ca): {e}"
            ),
        )
        .with_backend(BACKEND)
        .with_source(e)),
        Ok(Err(e)) => Err(map_err(e, "connecting to RabbitMQ")),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!(
                "no answer from RabbitMQ at {} within 15 s",
                busbar_core::raw::redact_url(&config.uri)
            ),
        )
        .with_backend(BACKEND)),
    }
}

/// Declares the group's membership exchange (fanout, durable: it must outlive a broker
/// restart, or members could not re-join after one).
pub(crate) async fn declare_members_exchange(ch: &Channel, topic: &str, group: &str) -> Result<()> {
    ch.exchange_declare(
        ShortString::from(config::members_exchange(topic, group).as_str()),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| map_err(e, "declaring the group's membership exchange"))
}

pub(crate) struct Inner {
    pub(crate) config: AmqpConfig,
    /// The server, as its handshake described it.
    server: server::Server,
    /// Replaced by a new connection when the old one is lost (broker restart, network).
    conn: tokio::sync::Mutex<Arc<Connection>>,
    publisher: tokio::sync::Mutex<Option<Channel>>,
    declarer: tokio::sync::Mutex<Option<Channel>>,
    exchanges: Mutex<HashSet<String>>,
    groups: Mutex<HashSet<(String, String)>>,
    closed: AtomicBool,
    round_robin: AtomicU32,
    pub(crate) subscribers: Mutex<Vec<Weak<subscriber::Shared>>>,
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(AtomicOrdering::Acquire) {
            Err(Error::closed("amqp bus").with_backend(BACKEND))
        } else {
            Ok(())
        }
    }

    /// The connection, re-opened first when it was lost.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut conn = self.conn.lock().await;
        if !conn.status().connected() {
            self.check_open()?;
            tracing::info!("amqp: the connection was lost; reconnecting");
            *conn = Arc::new(open(&self.config).await?);
        }
        Ok(conn.clone())
    }

    /// The channel for declarations, kept open and reused: opening and closing channels in
    /// quick succession makes lapin reuse the id of a channel still closing. A refused
    /// declaration closes the channel; the next call opens a new one.
    async fn declare_channel(&self) -> Result<Channel> {
        let mut guard = self.declarer.lock().await;
        if let Some(ch) = guard.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let ch = create_channel(&*self.connection().await?).await?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// A channel of its own (the publisher's confirm-mode channel).
    async fn new_channel(&self) -> Result<Channel> {
        create_channel(&*self.connection().await?).await
    }

    /// Declares the topic's exchange (direct, durable; the partition count is recorded in
    /// its arguments, so a client configured with another count gets a clear error).
    async fn ensure_exchange(&self, topic: &str) -> Result<()> {
        let name = config::exchange(topic);
        if self
            .exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&name)
        {
            return Ok(());
        }
        let ch = self.declare_channel().await?;
        ch.exchange_declare(
            ShortString::from(name.as_str()),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-busbar-partitions", AMQPValue::LongInt(self.config.partitions as i32))]),
        )
        .await
        .map_err(|e| {
            let mut err = map_err(e, &format!("declaring the exchange of topic {topic}"));
            if err.kind() == ErrorKind::Config {
                err = Error::new(
                    ErrorKind::Config,
                    format!("{err} (the topic exists with another partition count: set ?partitions= to match)"),
                )
                .with_backend(BACKEND);
            }
            err
        })?;
        if let Some(age) = self.config.history {
            history::declare(&ch, topic, self.config.partitions, age).await?;
        }
        self.exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name);
        Ok(())
    }

    /// The group's lag: the ready messages of its partition queues (passive declarations on a
    /// channel of its own, since a missing queue closes the channel). Messages delivered and
    /// not yet acked are not counted. No queue: no lag.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let ch = self.new_channel().await?;
        let mut total = 0u64;
        for p in 0..self.config.partitions {
            let q = config::queue(topic, group, p);
            let declared = ch
                .queue_declare(
                    ShortString::from(q.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(queue) => total += u64::from(queue.message_count()),
                // The group's queues are declared together: none, no lag.
                Err(e) if e.to_string().contains("NOT_FOUND") => return Ok(total),
                Err(e) => return Err(map_err(e, &format!("reading the depth of queue {q}"))),
            }
        }
        let _ = ch.close(200, ShortString::from("lag read")).await;
        Ok(total)
    }

    /// Up to `options.limit` messages of `topic`'s history stream (URL option `history`).
    pub(crate) async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        // A channel of its own: a missing stream closes it, and its consumer ends with it.
        let ch = self.new_channel().await?;
        let read = history::browse(&ch, topic, options).await;
        let _ = ch.close(200, ShortString::from("history read")).await;
        read
    }

    /// Declares the group's partition queues (quorum, single active consumer) bound to the
    /// topic's exchange, and the group's membership exchange.
    pub(crate) async fn ensure_group(&self, topic: &str, group: &str) -> Result<()> {
        let mut attempt = 0;
        loop {
            let declared =
                tokio::time::timeout(DECLARE_TIMEOUT, self.declare_group(topic, group)).await;
            let e = match declared {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if !transient(&e) => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => Error::new(
                    ErrorKind::Timeout,
                    format!("declaring group {group} of topic {topic} took longer than {DECLARE_TIMEOUT:?}"),
                )
                .with_backend(BACKEND),
            };
            if attempt >= 3 {
                return Err(e);
            }
            // The declaration channel or connection broke under us (seen with lapin 4.12 under
            // load, with no error on the server): declarations are idempotent, so they are made
            // again on a fresh channel, and from the second retry on a fresh connection.
            attempt += 1;
            tracing::debug!(error = %e, attempt, "amqp: declaring the group again");
            *self.declarer.lock().await = None;
            if attempt >= 2 {
                self.reconnect().await?;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
        }
    }

    /// Replaces the connection with a new one, whatever state the old one claims.
    async fn reconnect(&self) -> Result<()> {
        self.check_open()?;
        let mut conn = self.conn.lock().await;
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            conn.close(200, ShortString::from("reconnecting")),
        )
        .await;
        *conn = Arc::new(open(&self.config).await?);
        Ok(())
    }

    async fn declare_group(&self, topic: &str, group: &str) -> Result<()> {
        let key = (topic.to_owned(), group.to_owned());
        if self
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&key)
        {
            return Ok(());
        }
        self.ensure_exchange(topic).await?;
        if self.config.delivery_limit.is_some() && !topic.ends_with(".dlq") {
            // RabbitMQ's dead letters need somewhere to go: the dead-letter topic and its
            // redrive group exist before the first queue points at them.
            let dlq = busbar_core::dead_letter::default_topic(topic);
            Box::pin(self.ensure_group(&dlq, REDRIVE_GROUP)).await?;
        }
        let ch = self.declare_channel().await?;
        for p in 0..self.config.partitions {
            let q = config::queue(topic, group, p);
            ch.queue_declare(
                ShortString::from(q.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                queue_arguments(&self.config, &self.server, topic),
            )
            .await
            .map_err(|e| map_err(e, &format!("declaring queue {q}")))?;
            ch.queue_bind(
                ShortString::from(q.as_str()),
                ShortString::from(config::exchange(topic).as_str()),
                ShortString::from(p.to_string().as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(e, &format!("binding queue {q}")))?;
        }
        declare_members_exchange(&ch, topic, group).await?;
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
        Ok(())
    }

    async fn publisher(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Channel>>> {
        let mut guard = self.publisher.lock().await;
        let usable = guard.as_ref().is_some_and(|c| c.status().connected());
        if !usable {
            let ch = self.new_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| map_err(e, "enabling publisher confirms"))?;
            *guard = Some(ch);
        }
        Ok(guard)
    }

    /// Publishes in order (mandatory, persistent, confirmed) and returns once RabbitMQ
    /// confirmed every message. A message no group receives is an error, not a silent loss.
    pub(crate) async fn publish_many(&self, topic: &str, messages: &[Message]) -> Result<()> {
        // Checked before anything is sent: a batch is published whole or not at all.
        for m in messages {
            codec::check(m)?;
        }
        self.ensure_exchange(topic).await?;
        let exchange = config::exchange(topic);
        let n = self.config.partitions;
        let mut confirms = Vec::with_capacity(messages.len());
        {
            let guard = self.publisher().await?;
            let Some(ch) = guard.as_ref() else {
                return Err(Error::closed("amqp publisher channel").with_backend(BACKEND));
            };
            for m in messages {
                let p = match &m.key {
                    Some(k) => partition_for(k, n),
                    None => self.round_robin.fetch_add(1, AtomicOrdering::Relaxed) % n,
                };
                let confirm = ch
                    .basic_publish(
                        ShortString::from(exchange.as_str()),
                        ShortString::from(p.to_string().as_str()),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &m.payload,
                        codec::encode(m),
                    )
                    .await
                    .map_err(|e| map_err(e, &format!("publishing {}", m.id)))?;
                confirms.push((m, confirm));
            }
        }
        for (m, confirm) in confirms {
            match confirm.await.map_err(|e| map_err(e, &format!("publishing {}", m.id)))? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        format!(
                            "message {} was returned unroutable: topic {topic} has no consumer group; \
                             provision one first (RabbitMQ keeps messages only in a group's queues)",
                            m.id
                        ),
                    )
                    .with_backend(BACKEND))
                }
                Confirmation::Nack(_) => {
                    return Err(Error::new(
                        ErrorKind::Broker,
                        format!("RabbitMQ refused message {} (nack)", m.id),
                    )
                    .with_backend(BACKEND))
                }
            }
        }
        Ok(())
    }
}

/// An event bus on Amqp: [`Amqp`] behind the checks of [`Bus`]. Connect with
/// `AmqpBus::connect(url)` or `AmqpBus::with_config(config)`.
pub type AmqpBus = Bus<Amqp>;

/// The backend (applications use it as [`AmqpBus`]).
pub struct Amqp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Amqp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Connect for Amqp {
    type Config = AmqpConfig;

    fn config_from_url(url: &str) -> Result<AmqpConfig> {
        AmqpConfig::from_url(url)
    }

    /// Connects to the RabbitMQ server. Errors: `Config`, `Connection` (unreachable), `Auth`
    /// (refused).
    async fn connect_with(config: AmqpConfig) -> Result<Self> {
        let conn = open(&config).await?;
        let server = server::probe(&config.uri, std::time::Duration::from_secs(5)).await;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                server,
                conn: tokio::sync::Mutex::new(Arc::new(conn)),
                publisher: tokio::sync::Mutex::new(None),
                declarer: tokio::sync::Mutex::new(None),
                exchanges: Mutex::new(HashSet::new()),
                groups: Mutex::new(HashSet::new()),
                closed: AtomicBool::new(false),
                round_robin: AtomicU32::new(0),
                subscribers: Mutex::new(Vec::new()),
            }),
        })
    }

    fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Backend for Amqp {
    const IDENTITY: Identity = known::AMQP;

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.ordering = Ordering::PerKey;
        c.consumer_groups = true;
        c.persistent = true;
        c.nack_can_delay = true;
        c.ack_deadline_can_extend = true;
        c.message_max_bytes = Some(self.inner.config.max_message_bytes);
        c.native_dead_letter = self.inner.config.delivery_limit.is_some();
        // busbar's attempts records keep hand-backs uncounted; RabbitMQ's own delivery
        // limit, when the URL sets one, counts every return (see the README).
        c.exact_attempts = self.inner.config.delivery_limit.is_none();
        c.consumer_lag = true;
        c.browse = self.inner.config.history.is_some();
        c
    }

    fn server_version(&self) -> Option<String> {
        self.inner.server.version.clone()
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
        _options: &PublishOptions,
    ) -> Result<()> {
        // No delay to honour: the bus in front refuses one (capability off).
        self.inner.publish_many(topic, &messages).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        self.inner.ensure_group(topic, &options.group).await?;
        let sub = subscriber::AmqpSubscriber::start(self.inner.clone(), topic, options).await?;
        Ok(Box::new(sub))
    }

    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.inner.ensure_group(topic, &options.group).await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        self.inner.lag(topic, group).await
    }

    async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        self.inner.browse(topic, options).await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        let subs = std::mem::take(
            &mut *self
                .inner
                .subscribers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for s in subs.iter().filter_map(Weak::upgrade) {
            s.shut_down("bus closed");
        }
        let conn = self.inner.conn.lock().await.clone();
        // Bounded: a broker that stopped answering must not hang the caller's shutdown
        // (the connection is dropped either way).
        let close = conn.close(200, ShortString::from("bye"));
        if tokio::time::timeout(std::time::Duration::from_secs(5), close)
            .await
            .is_err()
        {
            tracing::warn!(
                "amqp: RabbitMQ did not confirm closing the bus's connection within 5 s"
            );
        }
        Ok(())
    }
}
