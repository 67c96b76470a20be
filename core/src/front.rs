//! [`Bus`]: the one front door every backend sits behind. It checks the contract once,
//! with one wording per error, and dead-letters through one path.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::bus::{check_publish, Delivery, Event, EventBus, Subscriber};
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::options::{PublishOptions, StartPosition, SubscribeOptions};
use crate::policy::{DeadLetterPolicy, DEAD_LETTER_GROUP};
use crate::raw::{Backend, Connect};
use crate::telemetry::{PublishRegistry, SubscriptionMetrics};

/// An event bus: one backend behind the checks every backend keeps the same way.
///
/// Each backend names its own: `busbar::redis::RedisBus` is `Bus<Redis>`,
/// [`crate::memory::MemoryBus`] is `Bus<Memory>`. Cloning gives another handle to the same
/// connection. Applications use it through [`EventBus`] (often as `Arc<dyn EventBus>`).
pub struct Bus<B> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    backend: B,
    closed: AtomicBool,
    metrics: PublishRegistry,
}

impl<B> Clone for Bus<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for Bus<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner.backend, f)
    }
}

impl<B: Backend> Bus<B> {
    /// The bus in front of `backend` (for backend authors and tests; applications connect
    /// with [`Bus::connect`] or `busbar::connect`).
    pub fn from_backend(backend: B) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                closed: AtomicBool::new(false),
                metrics: PublishRegistry::default(),
            }),
        }
    }

    /// The backend behind this bus (its own methods: configuration, broker details).
    pub fn raw(&self) -> &B {
        &self.inner.backend
    }

    fn name(&self) -> &'static str {
        B::IDENTITY.name
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            Err(Error::closed(&format!("{} bus", self.name())).with_backend(self.name()))
        } else {
            Ok(())
        }
    }

    /// Publishes `messages` in a `busbar.publish` span (whose trace context goes into their
    /// headers with the `otel` feature; published from a runner's handler, they join the
    /// handled event's chain: correlation and causation ids), after checking all of them — trace headers included —
    /// so nothing is sent when one is invalid; timed and counted. An empty batch is a no-op.
    async fn send(
        &self,
        topic: &str,
        mut messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()> {
        let n = messages.len();
        let span = tracing::debug_span!(
            "busbar.publish",
            messaging.system = self.name(),
            messaging.destination.name = topic,
            messaging.operation.type = "send",
            messaging.batch.message_count = n,
        );
        crate::runner::inherit(&mut messages);
        #[cfg(feature = "otel")]
        crate::telemetry::otel::inject(&span, &mut messages);
        check_publish(self.name(), &self.capabilities(), topic, &messages, options)?;
        if messages.is_empty() {
            return Ok(());
        }
        let metrics = self.inner.metrics.get(self.name(), topic);
        let started = std::time::Instant::now();
        let result = self
            .inner
            .backend
            .publish(topic, messages, options)
            .instrument(span)
            .await;
        metrics.duration.record(started.elapsed().as_secs_f64());
        if result.is_ok() {
            metrics.sent.increment(n as u64);
        }
        result
    }

    /// The checks of `subscribe` and `provision`: open bus, valid names and options, and a
    /// start position the backend can honour.
    fn check_subscribe(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        let tag = |e: Error| e.with_backend(self.name());
        crate::topic::validate_topic(topic).map_err(tag)?;
        options.validate().map_err(tag)?;
        if options.dead_letter != DeadLetterPolicy::default() {
            // A topic of the user's: checked now rather than at the first dead letter (the
            // default, `<topic>.dlq`, is valid for every valid topic but a dead-letter topic).
            crate::topic::validate_topic(&options.dead_letter.topic_for(topic)).map_err(tag)?;
        }
        if options.start == StartPosition::Earliest && !self.capabilities().replay {
            return Err(Error::unsupported(
                self.name(),
                "starting a group at the earliest message (capability replay is off: the broker keeps nothing for a group before it exists)",
            ));
        }
        Ok(())
    }
}

impl<B: Connect> Bus<B> {
    /// Connects to the broker of `url`. Errors: `Config` (malformed URL or options),
    /// `Connection` (unreachable), `Auth` (refused credentials).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(B::config_from_url(url)?).await
    }

    /// Connects with an explicit configuration.
    pub async fn with_config(config: B::Config) -> Result<Self> {
        Ok(Self::from_backend(B::connect_with(config).await?))
    }

    /// The configuration this bus connected with.
    pub fn config(&self) -> &B::Config {
        self.inner.backend.config()
    }
}

#[async_trait]
impl<B: Backend> EventBus for Bus<B> {
    fn backend(&self) -> &'static str {
        self.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.backend.capabilities()
    }

    fn server_version(&self) -> Option<String> {
        self.inner.backend.server_version()
    }

    async fn publish(&self, topic: &str, message: Message, options: &PublishOptions) -> Result<()> {
        self.check_open()?;
        self.send(topic, vec![message], options).await
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()> {
        self.check_open()?;
        self.send(topic, messages, options).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        self.check_subscribe(topic, &options)?;
        let dead_letters = Arc::new(DeadLetters {
            bus: Arc::new(self.clone()),
            topic: topic.into(),
            group: options.group.clone(),
            policy: options.dead_letter.clone(),
            kept: OnceCell::new(),
            metrics: SubscriptionMetrics::new(self.name(), topic, &options.group),
        });
        let inner = self.inner.backend.subscribe(topic, options).await?;
        Ok(Box::new(FrontSubscriber {
            inner,
            dead_letters,
            over: std::collections::VecDeque::new(),
        }))
    }

    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_subscribe(topic, options)?;
        self.inner.backend.provision(topic, options).await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        self.check_open()?;
        let tag = |e: Error| e.with_backend(self.name());
        crate::topic::validate_topic(topic).map_err(tag)?;
        crate::topic::validate_group(group).map_err(tag)?;
        if !self.capabilities().consumer_lag {
            return Err(Error::unsupported(
                self.name(),
                "reading consumer lag (capability consumer_lag is off)",
            ));
        }
        let lag = self.inner.backend.lag(topic, group).await?;
        crate::telemetry::record_lag(self.name(), topic, group, lag);
        Ok(lag)
    }

    async fn browse(&self, topic: &str, options: &crate::BrowseOptions) -> Result<Vec<Message>> {
        self.check_open()?;
        let tag = |e: Error| e.with_backend(self.name());
        crate::topic::validate_topic(topic).map_err(tag)?;
        options.check().map_err(tag)?;
        if !self.capabilities().browse {
            return Err(Error::unsupported(
                self.name(),
                "browsing a topic (capability browse is off)",
            ));
        }
        let mut messages = self.inner.backend.browse(topic, options).await?;
        messages.truncate(options.limit);
        Ok(messages)
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        self.inner.backend.close().await
    }
}

/// The one dead-letter path of a subscription: `nack(DeadLetter)`, the consumer runner and
/// undecodable messages all publish here, to the subscription's [`DeadLetterPolicy`] topic.
pub(crate) struct DeadLetters {
    bus: Arc<dyn EventBus>,
    topic: Arc<str>,
    group: String,
    policy: DeadLetterPolicy,
    /// Set once the dead-letter topic has its group [`DEAD_LETTER_GROUP`].
    kept: OnceCell<()>,
    /// The subscription's metric handles.
    pub(crate) metrics: SubscriptionMetrics,
}

impl DeadLetters {
    /// Publishes `event`'s message, with the dead-letter headers, to the dead-letter topic.
    /// Before the first one, the topic gets its group [`DEAD_LETTER_GROUP`], so dead letters
    /// are retained (and readable, and redrivable) on every backend, even those that keep
    /// nothing for a topic no group reads (SNS, RabbitMQ).
    pub(crate) async fn send(&self, event: &Event, attempts: u32, reason: &str) -> Result<()> {
        let dlq = self.policy.topic_for(&self.topic);
        self.kept
            .get_or_try_init(|| async {
                self.bus
                    .provision(&dlq, &SubscribeOptions::new(DEAD_LETTER_GROUP))
                    .await
            })
            .await?;
        let message = self.policy.dead_letter_message(
            event.message(),
            &self.topic,
            &self.group,
            attempts,
            reason,
        );
        let span = tracing::info_span!(
            "busbar.dead_letter",
            messaging.destination.name = %self.topic,
            messaging.consumer.group.name = %self.group,
            messaging.message.id = event.id(),
            dead_letter_topic = %dlq,
        );
        self.bus
            .publish(&dlq, message, &PublishOptions::default())
            .instrument(span)
            .await
    }
}

struct FrontSubscriber {
    inner: Box<dyn Subscriber>,
    dead_letters: Arc<DeadLetters>,
    /// What a backend's batch held beyond the `max` asked for: handed out first next time.
    over: std::collections::VecDeque<Delivery>,
}

impl FrontSubscriber {
    /// Attaches the subscription's dead-letter path to a delivery from the backend; hands
    /// back (as `Err`) one the backend could not decode, with the reason.
    fn admit(&self, delivery: Delivery) -> std::result::Result<Delivery, (Delivery, String)> {
        let delivery = delivery.with_dead_letters(self.dead_letters.clone());
        match delivery.undecodable_error().map(str::to_owned) {
            None => Ok(delivery),
            Some(error) => Err((delivery, error)),
        }
    }

    /// Dead-letters an undecodable message at once: it never reaches the application.
    async fn reject(delivery: Delivery, error: String) {
        tracing::error!(topic = %delivery.topic(), id = delivery.id(), %error, "busbar: undecodable message; dead-lettering it");
        if let Err(e) = delivery.dead_letter(&error, delivery.attempt()).await {
            // Left unacked: the broker hands it out again after the ack timeout.
            tracing::error!(topic = %delivery.topic(), id = delivery.id(), error = %e, "busbar: dead-lettering an undecodable message failed; it stays unacked");
        }
    }
}

#[async_trait]
impl Subscriber for FrontSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        if let Some(delivery) = self.over.pop_front() {
            return Ok(Some(delivery));
        }
        loop {
            let Some(delivery) = self.inner.next().await? else {
                return Ok(None);
            };
            match self.admit(delivery) {
                Ok(delivery) => {
                    self.dead_letters.metrics.consumed.increment(1);
                    return Ok(Some(delivery));
                }
                Err((delivery, error)) => Self::reject(delivery, error).await,
            }
        }
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        loop {
            if !self.over.is_empty() {
                let n = max.min(self.over.len());
                return Ok(self.over.drain(..n).collect());
            }
            let batch = self.inner.next_batch(max).await?;
            if batch.is_empty() {
                return Ok(batch);
            }
            if batch.len() <= max && batch.iter().all(|d| d.undecodable_error().is_none()) {
                self.dead_letters
                    .metrics
                    .consumed
                    .increment(batch.len() as u64);
                let dead_letters = &self.dead_letters;
                return Ok(batch
                    .into_iter()
                    .map(|d| d.with_dead_letters(dead_letters.clone()))
                    .collect());
            }
            let mut rejected = Vec::new();
            let mut admitted = 0;
            for delivery in batch {
                match self.admit(delivery) {
                    Ok(delivery) => {
                        admitted += 1;
                        // Kept here until returned, so a call cancelled while an undecodable
                        // message is dead-lettered loses none of them; beyond `max` (the
                        // contract's bound) they wait for the next call, in order.
                        self.over.push_back(delivery);
                    }
                    Err(bad) => rejected.push(bad),
                }
            }
            self.dead_letters.metrics.consumed.increment(admitted);
            for (delivery, error) in rejected {
                Self::reject(delivery, error).await;
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        // Deliveries held here were never handed out: back to the broker, uncounted.
        for delivery in self.over.drain(..) {
            let _ = delivery.release().await;
        }
        self.inner.close().await
    }
}
