//! The consumer runner: pulls deliveries, runs an async handler with per-key ordering,
//! retries failures with backoff, dead-letters what keeps failing, and shuts down gracefully.
//!
//! Guarantees (each one is tested in `runner::tests`):
//! - messages of one key are handled strictly one after another, in delivery order; different
//!   keys (and messages without a key) run concurrently, at most `concurrency` at a time;
//! - a failed message is retried in-process after the retry policy's backoff while later
//!   messages of its key wait and other keys keep flowing; when the policy gives up it is
//!   published to the dead-letter topic and only then acked (if that publish fails, the
//!   delivery is left unacked, so nothing is lost);
//! - a panicking handler counts as a failed attempt; the consumer keeps running;
//! - on shutdown it stops pulling, lets in-flight handlers finish within `drain_timeout`,
//!   acks what finished and leaves the rest unacked for redelivery; deliveries no handler
//!   received yet (queued behind their key) are released ([`Delivery::release`]), so their
//!   next delivery does not count an attempt nobody made; the returned [`ConsumerReport`]
//!   says how many of each;
//! - at most `max_in_flight` deliveries are held (running, retrying or queued behind their key).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::bus::{Delivery, Event, EventBus, Subscriber};
use crate::error::{Error, ErrorKind, Result};
use crate::options::{StartPosition, SubscribeOptions};
use crate::policy::{DeadLetterPolicy, RetryDecision, RetryPolicy};
use crate::Message;

mod chain;

pub(crate) use chain::inherit;
use chain::{Cause, Upcasters, HANDLING};

use crate::idempotency::{Idempotency, IdempotencyStore};

/// What a consumer run did, returned when it stops.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Deliveries received from the subscriber.
    pub received: u64,
    /// Deliveries handled successfully and acked.
    pub processed: u64,
    /// Failed attempts that were retried in-process.
    pub retried: u64,
    /// Deliveries published to the dead-letter topic and acked.
    pub dead_lettered: u64,
    /// Deliveries left unacked (for redelivery) at shutdown or because settling failed.
    pub left_unacked: u64,
    /// Deliveries acked without calling the handler: the idempotency store had already
    /// recorded them as processed ([`Consumer::idempotent`]).
    pub skipped: u64,
    /// The error that stopped the run, if it did not stop by shutdown or end of stream.
    pub error: Option<Error>,
}

/// Builds and runs a consumer of one topic in one consumer group.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use busbar_core::{memory::MemoryBus, Consumer, EventBus, Message, PublishOptions, RetryPolicy};
/// let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
/// let consumer = Consumer::new(bus.clone(), "orders")
///     .group("billing")
///     .concurrency(8)
///     .retry(RetryPolicy::builder().max_attempts(3).build()?);
/// bus.provision("orders", &consumer.subscribe_options()).await?;
/// bus.publish("orders", Message::new("hi").with_key("a"), &PublishOptions::default()).await?;
/// let report = consumer
///     .run_until(
///         |event| async move {
///             assert_eq!(event.key(), Some("a"));
///             Ok::<(), std::io::Error>(())
///         },
///         tokio::time::sleep(std::time::Duration::from_millis(100)),
///     )
///     .await?;
/// assert_eq!(report.processed, 1);
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
pub struct Consumer {
    bus: Arc<dyn EventBus>,
    topic: String,
    options: SubscribeOptions,
    concurrency: usize,
    retry: RetryPolicy,
    drain_timeout: Duration,
    upcasters: Upcasters,
    lag_interval: Option<Duration>,
    idempotency: Option<Idempotency>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("backend", &self.bus.backend())
            .field("topic", &self.topic)
            .field("options", &self.options)
            .field("concurrency", &self.concurrency)
            .field("retry", &self.retry)
            .field("drain_timeout", &self.drain_timeout)
            .field("upcasters", &self.upcasters)
            .field("lag_interval", &self.lag_interval)
            .field("idempotency", &self.idempotency)
            .finish()
    }
}

impl Consumer {
    /// Default handler concurrency.
    pub const DEFAULT_CONCURRENCY: usize = 16;
    /// Default interval of the consumer-lag gauge.
    pub const DEFAULT_LAG_INTERVAL: Duration = Duration::from_secs(15);
    /// Default time in-flight handlers get to finish at shutdown.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

    /// A consumer of `topic` on `bus`, in group `default`, with default policies.
    pub fn new(bus: Arc<dyn EventBus>, topic: impl Into<String>) -> Self {
        Self {
            bus,
            topic: topic.into(),
            options: SubscribeOptions::new("default"),
            concurrency: Self::DEFAULT_CONCURRENCY,
            retry: RetryPolicy::default(),
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
            upcasters: Upcasters::default(),
            lag_interval: Some(Self::DEFAULT_LAG_INTERVAL),
            idempotency: None,
        }
    }

    /// Makes the consumer idempotent: a message the group already processed successfully
    /// (recorded in `store` less than `ttl` ago) is acked without calling the handler, and
    /// each success is recorded before its ack. A store that cannot answer hands the
    /// delivery back for later (never handled unchecked); a record that fails is logged
    /// (that message would be handled again if redelivered). See [`crate::idempotency`].
    pub fn idempotent(mut self, store: Arc<dyn IdempotencyStore>, ttl: Duration) -> Self {
        self.idempotency = Some(Idempotency { store, ttl });
        self
    }

    /// Sets the consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.options.group = group.into();
        self
    }

    /// Sets how many handlers run at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the dead-letter policy.
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.options.dead_letter = policy;
        self
    }

    /// Sets where a new group starts.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.options.start = start;
        self
    }

    /// Sets the ack timeout of the subscription.
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.options.ack_timeout = d;
        self
    }

    /// Sets the most deliveries held at once.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.options.max_in_flight = n;
        self
    }

    /// Sets how long in-flight handlers may run after shutdown is requested.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Adds an upcaster: events of `event_type` at version `from` ([`Message::version`]) are
    /// passed through `f` and become version `to` before the handler sees them. Steps chain
    /// (v1→v2, v2→v3: a v1 event reaches the handler as v3), so handlers only know the newest
    /// version. An upcaster's error (or panic) dead-letters the original event at once: no
    /// retry can fix it. Versions start at 1 and `to` must be greater than `from` (checked
    /// when the consumer starts: [`ErrorKind::InvalidInput`]).
    ///
    /// ```
    /// # use busbar_core::{Consumer, Message, memory::MemoryBus, EventBus};
    /// # use std::sync::Arc;
    /// # let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    /// let consumer = Consumer::new(bus, "orders").upcast("order.created", 1, 2, |mut m: Message| {
    ///     // v2 renamed `total` to `amount`.
    ///     let mut v: serde_json::Value = serde_json::from_slice(&m.payload)?;
    ///     if let Some(total) = v.as_object_mut().and_then(|o| o.remove("total")) {
    ///         v["amount"] = total;
    ///     }
    ///     m.payload = serde_json::to_vec(&v)?.into();
    ///     Ok::<_, serde_json::Error>(m)
    /// });
    /// ```
    pub fn upcast<F, E>(mut self, event_type: impl Into<String>, from: u32, to: u32, f: F) -> Self
    where
        F: Fn(Message) -> std::result::Result<Message, E> + Send + Sync + 'static,
        E: fmt::Display,
    {
        self.upcasters.add(event_type.into(), from, to, f);
        self
    }

    /// Sets how often the runner reads its group's lag into the gauge
    /// [`crate::telemetry::CONSUMER_LAG`] (where the backend has capability `consumer_lag`);
    /// `None` never. Default [`Self::DEFAULT_LAG_INTERVAL`].
    pub fn lag_interval(mut self, every: Option<Duration>) -> Self {
        self.lag_interval = every;
        self
    }

    /// The subscription options this consumer uses (for `EventBus::provision`).
    pub fn subscribe_options(&self) -> SubscribeOptions {
        self.options.clone()
    }

    /// Runs until the subscription ends (the bus closes) or a fatal error.
    pub async fn run<H, Fut, E>(self, handler: H) -> Result<ConsumerReport>
    where
        H: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        self.run_until(handler, futures::future::pending()).await
    }

    /// Runs until `shutdown` completes, the subscription ends or a fatal error, then drains.
    ///
    /// Errors (before anything is consumed): invalid options or a failed subscribe.
    pub async fn run_until<H, Fut, E, S>(self, handler: H, shutdown: S) -> Result<ConsumerReport>
    where
        H: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
        S: Future<Output = ()> + Send,
    {
        if self.concurrency == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "concurrency must be at least 1",
            ));
        }
        self.upcasters.check()?;
        let subscriber = self
            .bus
            .subscribe(&self.topic, self.options.clone())
            .await?;
        let lag = self.lag_interval.filter(|_| self.bus.capabilities().consumer_lag).map(|every| {
            let (bus, topic, group) = (self.bus.clone(), self.topic.clone(), self.options.group.clone());
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = bus.lag(&topic, &group).await {
                        tracing::debug!(error = %e, "busbar consumer: reading the consumer lag failed");
                    }
                }
            }))
        });
        let handler: BoxedHandler =
            Arc::new(move |e: Event| handler(e).map(|r| r.map_err(Failure::of)).boxed());
        let run = Run {
            shared: Arc::new(RunShared {
                retry: self.retry,
                extend_by: self
                    .bus
                    .capabilities()
                    .ack_deadline_can_extend
                    .then_some(self.options.ack_timeout),
                concurrency: Arc::new(Semaphore::new(self.concurrency)),
                lanes: Mutex::new(HashMap::new()),
                stopping: AtomicBool::new(false),
                stop: Notify::new(),
                stats: Stats::default(),
                handler,
                upcasters: self.upcasters,
                idempotency: self.idempotency,
                group: self.options.group.clone(),
            }),
            in_flight: Arc::new(Semaphore::new(self.options.max_in_flight)),
            tasks: JoinSet::new(),
        };
        let report = run.run(subscriber, shutdown, self.drain_timeout).await;
        drop(lag);
        Ok(report)
    }
}

/// What the idempotency store said of a delivery (`Settled`: nothing left to do).
enum Seen {
    Settled,
    Fresh(String),
}

/// How long a delivery waits before it is handed back when the idempotency store fails.
const STORE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A task that ends with its handle.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type BoxedHandler = Arc<
    dyn Fn(Event) -> futures::future::BoxFuture<'static, std::result::Result<(), Failure>>
        + Send
        + Sync,
>;

/// A handler error that retrying cannot fix (the input is invalid, say): the consumer runner
/// dead-letters the message at once, with this reason, instead of spending its retries.
/// Return it as the handler's error — directly, or boxed in a `Box<dyn Error + Send + Sync>`.
///
/// ```
/// # use busbar_core::{Event, Permanent};
/// async fn handle(event: Event) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     let order: serde_json::Value = serde_json::from_slice(event.payload())
///         .map_err(|e| Permanent::new(format!("not JSON: {e}")))?;
///     # let _ = order;
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permanent(String);

impl Permanent {
    /// A permanent failure, for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }

    /// Why retrying cannot help.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "permanent failure: {}", self.0)
    }
}

impl std::error::Error for Permanent {}

/// A handler's failure as the runner sees it.
struct Failure {
    text: String,
    /// Retrying cannot help ([`Permanent`]).
    permanent: bool,
}

impl Failure {
    fn of<E: fmt::Display + 'static>(e: E) -> Self {
        let any: &dyn std::any::Any = &e;
        let permanent = any.is::<Permanent>()
            || any
                .downcast_ref::<Box<dyn std::error::Error + Send + Sync>>()
                .is_some_and(|b| b.is::<Permanent>())
            || any
                .downcast_ref::<Box<dyn std::error::Error>>()
                .is_some_and(|b| b.is::<Permanent>());
        Self {
            text: e.to_string(),
            permanent,
        }
    }

    fn panic(text: String) -> Self {
        Self {
            text,
            permanent: false,
        }
    }
}

/// A delivery and the in-flight permit it holds until it is settled or dropped.
struct Held {
    delivery: Delivery,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Stats {
    received: AtomicU64,
    processed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
}

struct RunShared {
    retry: RetryPolicy,
    extend_by: Option<Duration>,
    concurrency: Arc<Semaphore>,
    /// Deliveries waiting behind the running message of their key. A key present here has a
    /// lane task running.
    lanes: Mutex<HashMap<String, VecDeque<Held>>>,
    stopping: AtomicBool,
    stop: Notify,
    stats: Stats,
    handler: BoxedHandler,
    upcasters: Upcasters,
    idempotency: Option<Idempotency>,
    group: String,
}

struct Run {
    shared: Arc<RunShared>,
    in_flight: Arc<Semaphore>,
    tasks: JoinSet<()>,
}

impl Run {
    async fn run<S: Future<Output = ()> + Send>(
        mut self,
        mut subscriber: Box<dyn Subscriber>,
        shutdown: S,
        drain_timeout: Duration,
    ) -> ConsumerReport {
        tokio::pin!(shutdown);
        let mut error = None;
        let mut failures = 0u32;
        loop {
            while self.tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                p = self.in_flight.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                n = subscriber.next() => n,
            };
            match next {
                Ok(Some(delivery)) => {
                    failures = 0;
                    self.shared
                        .stats
                        .received
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    self.dispatch(Held {
                        delivery,
                        _permit: permit,
                    });
                }
                Ok(None) => break,
                Err(e) if e.is_retryable() && failures < 20 => {
                    failures += 1;
                    let wait = RetryPolicy::default().backoff(failures);
                    tracing::warn!(error = %e, ?wait, "busbar consumer: receive failed, retrying");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "busbar consumer: receive failed, stopping");
                    error = Some(e);
                    break;
                }
            }
        }
        self.shared.stopping.store(true, AtomicOrdering::Release);
        self.shared.stop.notify_waiters();
        let drained = tokio::time::timeout(drain_timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?drain_timeout,
                "busbar consumer: handlers still running at the drain deadline; leaving them unacked"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        // Whatever is still queued behind a key was never handed to the handler: released
        // (uncounted), key by key in delivery order.
        let queued: Vec<VecDeque<Held>> = self
            .shared
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, q)| q)
            .collect();
        for held in queued.into_iter().flatten() {
            if let Err(e) = held.delivery.release().await {
                tracing::debug!(id = held.delivery.id(), error = %e, "busbar consumer: releasing an unhandled delivery failed; it comes back after its ack timeout");
            }
        }
        if let Err(e) = subscriber.close().await {
            tracing::warn!(error = %e, "busbar consumer: closing the subscriber failed");
        }
        let s = &self.shared.stats;
        let received = s.received.load(AtomicOrdering::Acquire);
        let processed = s.processed.load(AtomicOrdering::Acquire);
        let dead_lettered = s.dead_lettered.load(AtomicOrdering::Acquire);
        let skipped = s.skipped.load(AtomicOrdering::Acquire);
        ConsumerReport {
            received,
            processed,
            retried: s.retried.load(AtomicOrdering::Acquire),
            dead_lettered,
            left_unacked: received.saturating_sub(processed + dead_lettered + skipped),
            skipped,
            error,
        }
    }

    /// Starts a task for the delivery, or queues it behind the running message of its key.
    fn dispatch(&mut self, held: Held) {
        let shared = self.shared.clone();
        let Some(key) = held.delivery.key().map(str::to_owned) else {
            self.tasks.spawn(async move { shared.process(held).await });
            return;
        };
        {
            let mut lanes = shared.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(queue) = lanes.get_mut(&key) {
                queue.push_back(held);
                return;
            }
            lanes.insert(key.clone(), VecDeque::new());
        }
        self.tasks.spawn(async move {
            let mut current = Some(held);
            while let Some(held) = current {
                shared.process(held).await;
                let mut lanes = shared.lanes.lock().unwrap_or_else(PoisonError::into_inner);
                if shared.stopping.load(AtomicOrdering::Acquire) {
                    // What waits behind this key is released when the run ends.
                    return;
                }
                current = match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => Some(next),
                    None => {
                        lanes.remove(&key);
                        None
                    }
                };
            }
        });
    }
}

impl RunShared {
    fn stopping(&self) -> bool {
        self.stopping.load(AtomicOrdering::Acquire)
    }

    /// Handles one delivery to the end: success + ack, or retries, or dead-letter + ack, or
    /// left unacked at shutdown.
    async fn process(&self, held: Held) {
        let delivery = &held.delivery;
        let mut attempt = delivery.attempt().max(1);
        let upcast = match self.upcasters.apply(delivery.event()) {
            Ok(upcast) => upcast,
            Err(error) => {
                tracing::debug!(id = delivery.id(), error = %error, "busbar consumer: upcasting failed, dead-lettering");
                self.dead_letter(delivery, attempt, &error).await;
                return;
            }
        };
        let record_key = match self.already_processed(delivery).await {
            Some(Seen::Settled) => return,
            Some(Seen::Fresh(key)) => Some(key),
            None => None,
        };
        let event = upcast.as_ref().unwrap_or(delivery.event());
        let cause = Cause::of(delivery.event());
        let mut handled = false;
        let mut handler_span: tracing::Span;
        loop {
            if self.stopping() {
                if !handled {
                    // Never reached the handler: hand it back uncounted.
                    let _ = delivery.release().await;
                }
                return;
            }
            let outcome = {
                let Ok(_permit) = self.concurrency.acquire().await else {
                    return;
                };
                let event = event.with_attempt(attempt);
                let handler = self.handler.clone();
                handled = true;
                let span = tracing::info_span!(
                    "busbar.process",
                    messaging.operation.type = "process",
                    messaging.destination.name = delivery.topic(),
                    messaging.message.id = delivery.id(),
                    attempt,
                );
                #[cfg(feature = "otel")]
                crate::telemetry::otel::continue_from(&span, delivery.headers());
                // Settling (and dead-lettering) happens in the handler's span too.
                handler_span = span.clone();
                let started = std::time::Instant::now();
                let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(event))) {
                    Ok(fut) => HANDLING
                        .scope(cause.clone(), AssertUnwindSafe(fut).catch_unwind())
                        .instrument(span)
                        .await
                        .unwrap_or_else(|panic| Err(Failure::panic(panic_text(panic)))),
                    Err(panic) => Err(Failure::panic(panic_text(panic))),
                };
                if let Some(m) = delivery.metrics() {
                    m.process.record(started.elapsed().as_secs_f64());
                }
                outcome
            };
            let error = match outcome {
                Ok(()) => {
                    if let (Some(key), Some(idem)) = (&record_key, &self.idempotency) {
                        if let Err(e) = idem.store.record(key, idem.ttl).await {
                            tracing::warn!(id = delivery.id(), error = %e, "busbar consumer: recording the processed message failed; a redelivery would be handled again");
                        }
                    }
                    if settle(delivery.ack().instrument(handler_span.clone()).await, "ack") {
                        self.stats.processed.fetch_add(1, AtomicOrdering::Relaxed);
                    }
                    return;
                }
                Err(e) => e,
            };
            if error.permanent {
                tracing::debug!(id = delivery.id(), attempt, error = %error.text, "busbar consumer: permanent failure, dead-lettering");
                self.dead_letter(delivery, attempt, &error.text)
                    .instrument(handler_span)
                    .await;
                return;
            }
            let error = error.text;
            match self.retry.decide(attempt) {
                RetryDecision::RetryAfter(backoff) => {
                    tracing::debug!(id = delivery.id(), attempt, error = %error, ?backoff, "busbar consumer: handler failed, retrying");
                    self.stats.retried.fetch_add(1, AtomicOrdering::Relaxed);
                    if let Some(m) = delivery.metrics() {
                        m.retried.increment(1);
                    }
                    if let Some(by) = self.extend_by {
                        // Keep the delivery ours while it waits; failure only risks a duplicate.
                        let _ = delivery.extend_deadline(by + backoff).await;
                    }
                    let stop = self.stop.notified();
                    tokio::pin!(stop);
                    stop.as_mut().enable();
                    if self.stopping() {
                        return;
                    }
                    tokio::select! {
                        _ = stop => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    attempt += 1;
                }
                RetryDecision::GiveUp => {
                    self.dead_letter(delivery, attempt, &error)
                        .instrument(handler_span)
                        .await;
                    return;
                }
            }
        }
    }

    /// With an idempotency store: `Seen::Settled` when the delivery was processed before (it is
    /// acked here, or handed back when the store cannot answer), else its record key.
    async fn already_processed(&self, delivery: &Delivery) -> Option<Seen> {
        let idem = self.idempotency.as_ref()?;
        let key = crate::idempotency::key(&self.group, delivery.topic(), delivery.id());
        match idem.store.contains(&key).await {
            Ok(false) => Some(Seen::Fresh(key)),
            Ok(true) => {
                tracing::debug!(
                    id = delivery.id(),
                    "busbar consumer: processed before, acking without the handler"
                );
                if settle(delivery.ack().await, "ack") {
                    self.stats.skipped.fetch_add(1, AtomicOrdering::Relaxed);
                }
                Some(Seen::Settled)
            }
            Err(e) => {
                tracing::warn!(id = delivery.id(), error = %e, "busbar consumer: the idempotency store did not answer; handing the delivery back");
                // Not in a hot loop: the delivery comes back after a pause.
                let stop = self.stop.notified();
                tokio::pin!(stop);
                stop.as_mut().enable();
                if !self.stopping() {
                    tokio::select! {
                        _ = stop => {}
                        _ = tokio::time::sleep(STORE_RETRY_PAUSE) => {}
                    }
                }
                let _ = delivery.release().await;
                Some(Seen::Settled)
            }
        }
    }

    async fn dead_letter(&self, delivery: &Delivery, attempts: u32, error: &str) {
        tracing::warn!(
            id = delivery.id(),
            attempts,
            error,
            "busbar consumer: giving up, dead-lettering"
        );
        match delivery.dead_letter(error, attempts).await {
            Ok(()) => {
                self.stats
                    .dead_lettered
                    .fetch_add(1, AtomicOrdering::Relaxed);
            }
            Err(e) => {
                tracing::error!(id = delivery.id(), error = %e, "busbar consumer: dead-lettering failed; leaving the delivery unacked for redelivery");
            }
        }
    }
}

fn settle(result: Result<()>, what: &str) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "busbar consumer: {what} failed; the delivery will be redelivered");
            false
        }
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    format!("handler panicked: {text}")
}

#[cfg(test)]
mod tests;
