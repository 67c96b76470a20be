//! The traits every backend implements: [`EventBus`], [`Subscriber`] and [`Ack`], and the
//! [`Delivery`] handed to consumers.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::front::DeadLetters;
use crate::message::{Headers, Message};
use crate::options::{PublishOptions, SubscribeOptions};

/// A connection to one broker: publish, subscribe, close.
///
/// Object safe: applications hold an `Arc<dyn EventBus>` and swap brokers by URL.
/// Every method validates its input first ([`crate::limits::validate_topic`], payload size against
/// [`Capabilities::message_max_bytes`]) and returns a typed error rather than panicking.
#[async_trait]
pub trait EventBus: Send + Sync + fmt::Debug {
    /// The short name of the backend (`memory`, `redis`, ...), used in errors and reports.
    fn backend(&self) -> &'static str;

    /// What this backend can do (on the server it is connected to: capabilities that depend
    /// on the server's version are decided at connect time).
    fn capabilities(&self) -> Capabilities;

    /// The version the broker reported when this bus connected (`"2.15.1"` for NATS,
    /// `"4.0.5"` for RabbitMQ, ...), or `None` where the protocol does not say.
    fn server_version(&self) -> Option<String> {
        None
    }

    /// Publishes one message to `topic` and returns once the broker has accepted it durably
    /// (as durable as the backend is).
    ///
    /// Errors: `InvalidTopic`, `PayloadTooLarge`, `Unsupported` (a delay without
    /// `publish_with_delay`), `Closed`, `Connection`, `Timeout`, `Broker`.
    async fn publish(&self, topic: &str, message: Message, options: &PublishOptions) -> Result<()>;

    /// Publishes several messages to `topic`, keeping their order per key, and returns once
    /// all are accepted. Nothing is published when the input is invalid.
    ///
    /// Errors: as [`EventBus::publish`], plus `InvalidInput` for a batch larger than
    /// [`Capabilities::batch_max_size`].
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()>;

    /// Subscribes to `topic` as a member of `options.group`, creating the group at
    /// `options.start` if it does not exist.
    ///
    /// Errors: `InvalidTopic`, `InvalidInput` (bad options), `Unsupported` (`Earliest`
    /// without `replay`), `Closed`, `Connection`, `Broker`.
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>>;

    /// Creates the consumer group `options.group` on `topic` without consuming, so messages
    /// published from now on are kept for it. Idempotent.
    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()>;

    /// How many messages of `topic` group `group` has not received yet (its consumer lag;
    /// what each broker counts exactly: its README), and records it as the gauge
    /// [`crate::telemetry::CONSUMER_LAG`]. A group that does not exist has no lag: 0.
    ///
    /// Errors: `Unsupported` (capability `consumer_lag` off), `InvalidTopic`, `Closed`,
    /// `Connection`, `Broker`.
    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let _ = (topic, group);
        Err(Error::unsupported(self.backend(), "reading consumer lag"))
    }

    /// Reads messages of `topic` without a consumer group: nothing is consumed, acked,
    /// counted or made invisible, and no group is created (capability `browse`). Oldest
    /// first: each partition in its order (so each key in its order), partitions merged by
    /// time. What the broker no longer holds (retention) is not there.
    ///
    /// Errors: `Unsupported` (capability `browse` off), `InvalidTopic`, `InvalidInput` (a
    /// limit of 0 or past [`crate::limits::BROWSE_LIMIT_MAX`]), `Closed`, `Connection`.
    async fn browse(&self, topic: &str, options: &crate::BrowseOptions) -> Result<Vec<Message>> {
        let _ = (topic, options);
        Err(Error::unsupported(self.backend(), "browsing a topic"))
    }

    /// Closes the connection: later publishes, subscriptions and acks fail with `Closed`,
    /// open subscribers end. Idempotent.
    async fn close(&self) -> Result<()>;
}

/// A stream of deliveries for one member of a consumer group.
#[async_trait]
pub trait Subscriber: Send {
    /// Waits for the next delivery. `Ok(None)` means the subscription ended (closed).
    ///
    /// At most `max_in_flight` deliveries are unacked at once; past that this waits for an
    /// ack. Errors: `Connection`, `Broker`, `Decode` (the message stays unacked).
    async fn next(&mut self) -> Result<Option<Delivery>>;

    /// Waits for the next deliveries: at least one and at most `max` (a `max` of 0 counts
    /// as 1), in the order [`Subscriber::next`] would hand them out, so each key's order
    /// holds within and across batches. An empty batch means the subscription ended.
    ///
    /// Backends answer with what they can hand out without waiting once the first is there
    /// (what one broker read returned, what is already buffered), within `max_in_flight`.
    /// Cancel-safe as `next` is: a call dropped before it returns hands nothing out. The
    /// default takes one delivery from `next`.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let _ = max;
        Ok(self.next().await?.into_iter().collect())
    }

    /// Leaves the group. Unacked deliveries are handed back for redelivery; acking them
    /// afterwards fails with `Closed` or has no effect.
    async fn close(&mut self) -> Result<()>;
}

impl dyn Subscriber {
    /// Turns the subscriber into a `futures::Stream` of deliveries that ends when it closes.
    pub fn into_stream(self: Box<Self>) -> BoxStream<'static, Result<Delivery>> {
        Box::pin(futures::stream::unfold(Some(self), |state| async move {
            let mut sub = state?;
            match sub.next().await {
                Ok(Some(d)) => Some((Ok(d), Some(sub))),
                Ok(None) => None,
                Err(e) => Some((Err(e), Some(sub))),
            }
        }))
    }
}

/// What to do with a delivery that was not processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NackAction {
    /// Redeliver as soon as possible.
    Redeliver,
    /// Redeliver no sooner than the delay (capability `nack_can_delay`).
    RedeliverAfter(Duration),
    /// Move to the dead-letter topic with this reason; it is not redelivered.
    DeadLetter {
        /// Why the message is dead-lettered (stored in the `busbar-dlq-error` header).
        reason: String,
    },
}

/// The backend side of a delivery: how to settle it. Implemented by backends; users call
/// the methods of [`Delivery`], which also guards against settling twice and dead-letters
/// (a backend never does: see [`crate::raw::Backend`]).
#[async_trait]
pub trait Ack: Send + Sync {
    /// Acknowledges the delivery: it is not delivered to this group again.
    async fn ack(&self) -> Result<()>;
    /// Hands the delivery back for redelivery no sooner than `after` from now (zero: as soon
    /// as possible; at most [`crate::limits::DURATION_MAX`], checked before). The redelivery counts
    /// as an attempt.
    async fn redeliver(&self, after: Duration) -> Result<()>;
    /// Pushes the ack timeout back by `by` from now (capability `ack_deadline_can_extend`).
    async fn extend_deadline(&self, by: Duration) -> Result<()>;
    /// Hands the delivery back as if it had never been handed out: no handler saw it, so its
    /// next delivery carries the same attempt, and it never counts toward a delivery limit.
    /// Backends that cannot take a hand-out back uncounted keep this default, a plain
    /// redeliver (say so in their README).
    async fn release(&self) -> Result<()> {
        self.redeliver(Duration::ZERO).await
    }
}

/// The read-only part of a delivery: what handlers of the consumer runner receive.
#[derive(Debug, Clone)]
pub struct Event {
    topic: Arc<str>,
    message: Arc<Message>,
    attempt: u32,
}

impl Event {
    /// An event of `topic` carrying `message`, delivered for the `attempt`-th time (1 = first).
    pub fn new(topic: impl Into<Arc<str>>, message: Message, attempt: u32) -> Self {
        Self {
            topic: topic.into(),
            message: Arc::new(message),
            attempt,
        }
    }

    /// The shared message (no copy).
    pub(crate) fn shared_message(&self) -> &Arc<Message> {
        &self.message
    }

    /// An event sharing an already reference-counted message (for backends that keep one).
    pub fn from_shared(topic: impl Into<Arc<str>>, message: Arc<Message>, attempt: u32) -> Self {
        Self {
            topic: topic.into(),
            message,
            attempt,
        }
    }

    pub(crate) fn with_attempt(&self, attempt: u32) -> Self {
        Self {
            attempt,
            ..self.clone()
        }
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The whole message.
    pub fn message(&self) -> &Message {
        &self.message
    }
    /// Delivery attempt: 1 on the first delivery, counting redeliveries and in-process retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// Message id.
    pub fn id(&self) -> &str {
        &self.message.id
    }
    /// Partition key.
    pub fn key(&self) -> Option<&str> {
        self.message.key.as_deref()
    }
    /// Payload.
    pub fn payload(&self) -> &Bytes {
        &self.message.payload
    }
    /// Headers.
    pub fn headers(&self) -> &Headers {
        &self.message.headers
    }
    /// Event type.
    pub fn event_type(&self) -> Option<&str> {
        self.message.event_type.as_deref()
    }
    /// Source.
    pub fn source(&self) -> Option<&str> {
        self.message.source.as_deref()
    }
    /// Event time.
    pub fn time(&self) -> DateTime<Utc> {
        self.message.time
    }
    /// Content type.
    pub fn content_type(&self) -> Option<&str> {
        self.message.content_type.as_deref()
    }
    /// Schema version ([`Message::version`]); after the consumer's upcasters, the newest.
    pub fn version(&self) -> Option<u32> {
        self.message.version()
    }
    /// Correlation id ([`Message::correlation_id`]).
    pub fn correlation_id(&self) -> &str {
        self.message.correlation_id()
    }
    /// Causation id ([`Message::causation_id`]).
    pub fn causation_id(&self) -> Option<&str> {
        self.message.causation_id()
    }

    pub(crate) fn with_message(&self, message: Message) -> Self {
        Self {
            message: Arc::new(message),
            ..self.clone()
        }
    }
}

const OPEN: u8 = 0;
const SETTLING: u8 = 1;
const SETTLED: u8 = 2;

/// One received message plus the handle to settle it (ack, nack, extend its deadline).
///
/// Settling twice fails with [`ErrorKind::AlreadySettled`]; settling after the bus or
/// subscriber closed fails with [`ErrorKind::Closed`]. Dropping a delivery without settling
/// leaves it unacked: it is redelivered after the ack timeout.
pub struct Delivery {
    event: Event,
    acker: Box<dyn Ack>,
    state: AtomicU8,
    /// Where `nack(DeadLetter)` publishes: set by the [`crate::Bus`] that handed it out.
    dead_letters: Option<Arc<DeadLetters>>,
    /// Set by a backend for a message it could not decode ([`crate::raw::undecodable`]).
    undecodable: Option<Box<str>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.event.topic())
            .field("id", &self.event.id())
            .field("key", &self.event.key())
            .field("attempt", &self.event.attempt())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Builds a delivery (backends call [`crate::raw::delivery`]).
    pub(crate) fn new(event: Event, acker: Box<dyn Ack>) -> Self {
        Self {
            event,
            acker,
            state: AtomicU8::new(OPEN),
            dead_letters: None,
            undecodable: None,
        }
    }

    pub(crate) fn undecodable(mut self, error: String) -> Self {
        self.undecodable = Some(error.into());
        self
    }

    pub(crate) fn undecodable_error(&self) -> Option<&str> {
        self.undecodable.as_deref()
    }

    pub(crate) fn with_dead_letters(mut self, dead_letters: Arc<DeadLetters>) -> Self {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// The read-only event.
    pub fn event(&self) -> &Event {
        &self.event
    }
    /// The topic the message was published to.
    pub fn topic(&self) -> &str {
        self.event.topic()
    }
    /// The whole message.
    pub fn message(&self) -> &Message {
        self.event.message()
    }
    /// Delivery attempt (1 on the first delivery).
    pub fn attempt(&self) -> u32 {
        self.event.attempt()
    }
    /// Message id.
    pub fn id(&self) -> &str {
        self.event.id()
    }
    /// Partition key.
    pub fn key(&self) -> Option<&str> {
        self.event.key()
    }
    /// Payload.
    pub fn payload(&self) -> &Bytes {
        self.event.payload()
    }
    /// Headers.
    pub fn headers(&self) -> &Headers {
        self.event.headers()
    }
    /// Whether the delivery was acked or nacked already.
    pub fn is_settled(&self) -> bool {
        self.state.load(AtomicOrdering::Acquire) == SETTLED
    }

    /// Acknowledges the delivery. Errors: `AlreadySettled`, `Closed`, `Connection`, `Broker`.
    pub async fn ack(&self) -> Result<()> {
        self.settle("ack", self.acker.ack()).await?;
        if let Some(m) = self.metrics() {
            m.acked.increment(1);
        }
        Ok(())
    }

    /// The metric handles of the subscription that handed this delivery out.
    pub(crate) fn metrics(&self) -> Option<&crate::telemetry::SubscriptionMetrics> {
        self.dead_letters.as_deref().map(|d| &d.metrics)
    }

    async fn redeliver(&self, after: Duration) -> Result<()> {
        self.settle("nack", self.acker.redeliver(after)).await?;
        if let Some(m) = self.metrics() {
            m.nacked.increment(1);
        }
        Ok(())
    }

    /// Hands the delivery back (see [`NackAction`]). `RedeliverAfter` needs
    /// `nack_can_delay` and at most [`crate::limits::DURATION_MAX`]. `DeadLetter` publishes the
    /// message to the subscription's dead-letter topic ([`crate::SubscribeOptions::dead_letter`],
    /// default `<topic>.dlq`, where it is kept for the group `busbar-redrive`) and then acks
    /// it; if the publish fails the delivery stays open. Errors: `AlreadySettled`,
    /// `Unsupported`, `InvalidInput`, `Closed`, `Connection`.
    pub async fn nack(&self, action: NackAction) -> Result<()> {
        match action {
            NackAction::Redeliver => self.redeliver(Duration::ZERO).await,
            NackAction::RedeliverAfter(delay) => {
                crate::options::check_duration("a redelivery delay", delay)?;
                self.redeliver(delay).await
            }
            NackAction::DeadLetter { reason } => {
                self.dead_letter(&reason, self.event.attempt()).await
            }
        }
    }

    /// The one dead-letter path: publish to the dead-letter topic, then ack.
    pub(crate) async fn dead_letter(&self, reason: &str, attempts: u32) -> Result<()> {
        let Some(dead_letters) = &self.dead_letters else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "dead-lettering needs a delivery handed out by a busbar Bus (this one was built without one)",
            ));
        };
        self.settle("dead_letter", async {
            dead_letters.send(&self.event, attempts, reason).await?;
            self.acker.ack().await
        })
        .await?;
        dead_letters.metrics.dead_lettered.increment(1);
        Ok(())
    }

    /// Hands the delivery back unseen: as if it had never been handed out, so its next
    /// delivery carries the same attempt (for code that took a delivery it will not process,
    /// such as the consumer runner's queue at shutdown). Errors: `AlreadySettled`, `Closed`,
    /// `Connection`.
    pub async fn release(&self) -> Result<()> {
        self.settle("release", self.acker.release()).await
    }

    /// Pushes the ack timeout back by `by` (capability `ack_deadline_can_extend`; at most
    /// [`crate::limits::DURATION_MAX`]).
    pub async fn extend_deadline(&self, by: Duration) -> Result<()> {
        if self.state.load(AtomicOrdering::Acquire) != OPEN {
            return Err(already_settled());
        }
        crate::options::check_duration("a deadline extension", by)?;
        self.acker.extend_deadline(by).await
    }

    /// Runs the settle operation `name` once (span `busbar.settle`, debug level).
    async fn settle(
        &self,
        name: &'static str,
        op: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        if self
            .state
            .compare_exchange(
                OPEN,
                SETTLING,
                AtomicOrdering::AcqRel,
                AtomicOrdering::Acquire,
            )
            .is_err()
        {
            return Err(already_settled());
        }
        let span = tracing::debug_span!(
            "busbar.settle",
            messaging.operation.type = "settle",
            messaging.operation.name = name,
            messaging.destination.name = self.topic(),
            messaging.message.id = self.id(),
        );
        let result = tracing::Instrument::instrument(op, span).await;
        let next = if result.is_ok() { SETTLED } else { OPEN };
        self.state.store(next, AtomicOrdering::Release);
        result
    }
}

fn already_settled() -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        "the delivery was already acked or nacked",
    )
}

/// Conveniences over [`EventBus`], implemented for every bus.
#[async_trait]
pub trait EventBusExt: EventBus {
    /// Publishes `payload` to `topic` with default options.
    async fn publish_bytes(&self, topic: &str, payload: Bytes) -> Result<()> {
        self.publish(topic, Message::new(payload), &PublishOptions::default())
            .await
    }

    /// Publishes `value` as JSON to `topic`, with partition key `key`.
    async fn publish_json<T: serde::Serialize + Sync>(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &T,
    ) -> Result<()> {
        let mut msg = Message::json(value)?;
        msg.key = key.map(str::to_owned);
        self.publish(topic, msg, &PublishOptions::default()).await
    }
}

impl<T: EventBus + ?Sized> EventBusExt for T {}

/// Checks what every backend checks before publishing: a valid topic, each message within
/// `message_max_bytes`, a batch within `batch_max_size`, and a delay only where supported.
pub fn check_publish(
    backend: &'static str,
    caps: &Capabilities,
    topic: &str,
    messages: &[Message],
    options: &PublishOptions,
) -> Result<()> {
    crate::topic::validate_topic(topic)?;
    if let Some((i, m, field)) = messages
        .iter()
        .enumerate()
        .find_map(|(i, m)| crate::message::oversized_metadata(m).map(|field| (i, m, field)))
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "message {i}: its {field} is longer than {} bytes (id starts {:?})",
                crate::message::METADATA_MAX_BYTES,
                m.id.chars().take(40).collect::<String>()
            ),
        )
        .with_backend(backend));
    }
    if let (Some(max), n) = (caps.batch_max_size, messages.len()) {
        if n > max {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a batch holds at most {max} messages; got {n}"),
            )
            .with_backend(backend));
        }
    }
    if let Some(max) = caps.message_max_bytes {
        if let Some((i, m)) = messages
            .iter()
            .enumerate()
            .find(|(_, m)| m.encoded_len() > max)
        {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "message {i} ({}) is {} bytes with its metadata; the limit is {max}",
                    m.id,
                    m.encoded_len()
                ),
            )
            .with_backend(backend));
        }
    }
    if let Some(delay) = options.delay {
        if !caps.publish_with_delay {
            return Err(Error::unsupported(backend, "publish with delay"));
        }
        crate::options::check_duration("a publish delay", delay)
            .map_err(|e| e.with_backend(backend))?;
        if let Some(max) = caps.publish_delay_max {
            if delay > max {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("a delay of {delay:?} exceeds the backend's maximum of {max:?}"),
                )
                .with_backend(backend));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct CountingAck(Arc<AtomicUsize>, bool);

    #[async_trait]
    impl Ack for CountingAck {
        async fn ack(&self) -> Result<()> {
            self.0.fetch_add(1, AtomicOrdering::SeqCst);
            if self.1 {
                Err(Error::new(ErrorKind::Connection, "down"))
            } else {
                Ok(())
            }
        }
        async fn redeliver(&self, _: Duration) -> Result<()> {
            self.0.fetch_add(1, AtomicOrdering::SeqCst);
            Ok(())
        }
        async fn extend_deadline(&self, _: Duration) -> Result<()> {
            Ok(())
        }
    }

    fn delivery(fail: bool) -> (Delivery, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        let d = Delivery::new(
            Event::new("t", Message::new("x"), 1),
            Box::new(CountingAck(n.clone(), fail)),
        );
        (d, n)
    }

    #[tokio::test]
    async fn settling_twice_is_a_typed_error() {
        let (d, n) = delivery(false);
        d.ack().await.expect("first ack");
        let e = d.ack().await.expect_err("second ack");
        assert_eq!(e.kind(), ErrorKind::AlreadySettled);
        let e = d
            .nack(NackAction::Redeliver)
            .await
            .expect_err("nack after ack");
        assert_eq!(e.kind(), ErrorKind::AlreadySettled);
        assert_eq!(n.load(AtomicOrdering::SeqCst), 1, "backend called once");
        assert!(d.is_settled());
    }

    #[tokio::test]
    async fn failed_ack_can_be_retried() {
        let (d, n) = delivery(true);
        assert_eq!(
            d.ack().await.map_err(|e| e.kind()),
            Err(ErrorKind::Connection)
        );
        assert!(!d.is_settled());
        assert!(d.ack().await.is_err());
        assert_eq!(n.load(AtomicOrdering::SeqCst), 2);
    }

    #[test]
    fn check_publish_limits() {
        let mut caps = Capabilities::none();
        caps.message_max_bytes = Some(10);
        caps.batch_max_size = Some(2);
        let small = Message::new("").with_id("1");
        let big = Message::new(vec![0u8; 10]).with_id("2");
        let opts = PublishOptions::default();
        assert!(check_publish("t", &caps, "a", std::slice::from_ref(&small), &opts).is_ok());
        let e = check_publish("t", &caps, "a", &[big], &opts).expect_err("too big");
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        let three = vec![small.clone(), small.clone(), small];
        let e = check_publish("t", &caps, "a", &three, &opts).expect_err("batch");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = check_publish(
            "t",
            &caps,
            "a",
            &[],
            &opts.clone().delay(Duration::from_secs(1)),
        )
        .expect_err("delay");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = check_publish("t", &caps, "", &[], &PublishOptions::default()).expect_err("topic");
        assert_eq!(e.kind(), ErrorKind::InvalidTopic);
    }
}
