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

use std::collections::hash_map::Entry;
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

mod batch;
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
    /// each success is recorded before its ack. A store that cannot answer is asked again
    /// after a pause while the delivery and its key wait (never handled unchecked, never
    /// overtaken by the next message of its key); a record that fails is logged
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
        let handler: BoxedHandler =
            Arc::new(move |e: Event| handler(e).map(|r| r.map_err(Failure::of)).boxed());
        self.launch(Mode::Each(handler), shutdown).await
    }

    /// Runs a batch handler until the subscription ends (the bus closes) or a fatal error:
    /// see [`Consumer::run_batches_until`].
    pub async fn run_batches<H, Fut, E>(
        self,
        max_batch: usize,
        handler: H,
    ) -> Result<ConsumerReport>
    where
        H: Fn(Vec<Event>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<std::result::Result<(), E>>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        self.run_batches_until(max_batch, handler, futures::future::pending())
            .await
    }

    /// Runs a batch handler until `shutdown` completes, the subscription ends or a fatal
    /// error, then drains.
    ///
    /// The handler gets up to `max_batch` events at once, **at most one per key**, and
    /// returns one outcome per event, in the events' order. Successes are acked; a failed
    /// event is retried after the retry policy's backoff in a later batch (its key waits
    /// meanwhile, so each key's events are still handled one after another, in order), and
    /// dead-lettered when the policy gives up or the error is [`Permanent`]. Missing outcomes
    /// count as failures, and a handler that panics fails every event of its batch. Up to
    /// `concurrency` batches run at once. Upcasters, idempotency, the retry and dead-letter
    /// policies, `max_in_flight` and shutdown work as with [`Consumer::run_until`]; what a
    /// batch handler publishes does not join an event chain (a batch has no single cause).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use busbar_core::{memory::MemoryBus, Consumer, Event, EventBus, Message, PublishOptions};
    /// let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    /// let consumer = Consumer::new(bus.clone(), "clicks").group("stats");
    /// bus.provision("clicks", &consumer.subscribe_options()).await?;
    /// for page in ["a", "b", "a"] {
    ///     bus.publish("clicks", Message::new(page).with_key(page), &PublishOptions::default()).await?;
    /// }
    /// let report = consumer
    ///     .run_batches_until(
    ///         100,
    ///         |events: Vec<Event>| async move {
    ///             // e.g. one INSERT for the whole batch, then one outcome per event
    ///             events.iter().map(|_| Ok::<(), std::io::Error>(())).collect::<Vec<_>>()
    ///         },
    ///         tokio::time::sleep(std::time::Duration::from_millis(200)),
    ///     )
    ///     .await?;
    /// assert_eq!(report.processed, 3);
    /// # Ok::<(), busbar_core::Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// Errors (before anything is consumed): a `max_batch` of 0, invalid options or a failed
    /// subscribe.
    pub async fn run_batches_until<H, Fut, E, S>(
        self,
        max_batch: usize,
        handler: H,
        shutdown: S,
    ) -> Result<ConsumerReport>
    where
        H: Fn(Vec<Event>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<std::result::Result<(), E>>> + Send + 'static,
        E: fmt::Display + Send + 'static,
        S: Future<Output = ()> + Send,
    {
        if max_batch == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "a batch holds at least one event: max_batch must be at least 1",
            ));
        }
        let handler: batch::BoxedBatchHandler = Arc::new(move |events: Vec<Event>| {
            handler(events)
                .map(|outcomes| {
                    outcomes
                        .into_iter()
                        .map(|r| r.map_err(Failure::of))
                        .collect()
                })
                .boxed()
        });
        let batches = batch::Batches::new(handler, max_batch);
        self.launch(Mode::Batches(batches), shutdown).await
    }

    /// Checks the settings, subscribes, and runs `mode` until `shutdown`.
    async fn launch<S>(self, mode: Mode, shutdown: S) -> Result<ConsumerReport>
    where
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
        let run = Run {
            shared: Arc::new(RunShared {
                retry: self.retry,
                extend_by: self
                    .bus
                    .capabilities()
                    .ack_deadline_can_extend
                    .then_some(self.options.ack_timeout),
                concurrency: Arc::new(Semaphore::new(self.concurrency)),
                lanes: Mutex::new(HashMap::default()),
                hasher: foldhash::fast::RandomState::default(),
                stopping: AtomicBool::new(false),
                stop: Notify::new(),
                stats: Stats::default(),
                mode,
                upcasters: self.upcasters,
                idempotency: self.idempotency,
                group: self.options.group.clone(),
            }),
            in_flight: Arc::new(Semaphore::new(self.options.max_in_flight)),
            tasks: JoinSet::new(),
            workers: self.concurrency,
        };
        let report = run.run(subscriber, shutdown, self.drain_timeout).await;
        drop(lag);
        Ok(report)
    }
}

/// How the runner hands events to the application.
enum Mode {
    /// One event per call, per-key lanes ([`Consumer::run_until`]).
    Each(BoxedHandler),
    /// Batches ([`Consumer::run_batches_until`]).
    Batches(batch::Batches),
}

/// What the idempotency store said of a delivery (`Settled`: nothing left to do).
enum Seen {
    Settled,
    Fresh(String),
}

/// How long a delivery waits before the idempotency store is asked again after a failure.
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
    /// `None` only if the subscriber answered with more than it was asked for.
    _permit: Option<OwnedSemaphorePermit>,
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
    /// Deliveries waiting behind the running message of their key's lane ([`lane_of`]). A
    /// lane present here has a task running.
    lanes: Mutex<HashMap<u64, VecDeque<Held>, foldhash::fast::RandomState>>,
    hasher: foldhash::fast::RandomState,
    stopping: AtomicBool,
    stop: Notify,
    stats: Stats,
    mode: Mode,
    upcasters: Upcasters,
    idempotency: Option<Idempotency>,
    group: String,
}

struct Run {
    shared: Arc<RunShared>,
    in_flight: Arc<Semaphore>,
    tasks: JoinSet<()>,
    /// Batch workers to start (batch mode).
    workers: usize,
}

/// The most deliveries the runner asks a subscriber for at once.
const PULL_MAX: usize = 256;

/// What one pull of the runner got.
enum Pulled {
    /// Deliveries, each holding an in-flight permit.
    Batch(Vec<Held>),
    /// Shutdown was requested.
    Stop,
    /// The subscription ended.
    Ended,
    /// Receiving failed for good.
    Failed(Error),
}

/// Pulls deliveries within `max_in_flight`: waits for one free in-flight permit, takes as
/// many more as are free (up to [`PULL_MAX`]) and asks the subscriber for that many at once;
/// retries failed receives with backoff (20 in a row end the run).
struct Puller {
    subscriber: Box<dyn Subscriber>,
    in_flight: Arc<Semaphore>,
    failures: u32,
}

impl Puller {
    async fn pull<S: Future<Output = ()>>(
        &mut self,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Pulled {
        loop {
            let mut permits = tokio::select! {
                biased;
                _ = &mut shutdown => return Pulled::Stop,
                p = self.in_flight.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Pulled::Stop,
                },
            };
            let more = self.in_flight.available_permits().min(PULL_MAX - 1);
            if more > 0 {
                if let Ok(extra) = self.in_flight.clone().try_acquire_many_owned(more as u32) {
                    permits.merge(extra);
                }
            }
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => return Pulled::Stop,
                n = self.subscriber.next_batch(permits.num_permits()) => n,
            };
            match next {
                Ok(batch) if batch.is_empty() => return Pulled::Ended,
                Ok(batch) => {
                    self.failures = 0;
                    // One permit per delivery; the rest go back to the semaphore.
                    let held = batch
                        .into_iter()
                        .map(|delivery| Held {
                            delivery,
                            _permit: permits.split(1),
                        })
                        .collect();
                    return Pulled::Batch(held);
                }
                Err(e) if e.is_retryable() && self.failures < 20 => {
                    self.failures += 1;
                    let wait = RetryPolicy::default().backoff(self.failures);
                    tracing::warn!(error = %e, ?wait, "busbar consumer: receive failed, retrying");
                    tokio::select! {
                        _ = &mut shutdown => return Pulled::Stop,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "busbar consumer: receive failed, stopping");
                    return Pulled::Failed(e);
                }
            }
        }
    }
}

impl Run {
    async fn run<S: Future<Output = ()> + Send>(
        mut self,
        subscriber: Box<dyn Subscriber>,
        shutdown: S,
        drain_timeout: Duration,
    ) -> ConsumerReport {
        tokio::pin!(shutdown);
        let mut puller = Puller {
            subscriber,
            in_flight: self.in_flight.clone(),
            failures: 0,
        };
        if matches!(self.shared.mode, Mode::Batches(_)) {
            for _ in 0..self.workers {
                let shared = self.shared.clone();
                self.tasks.spawn(async move {
                    if let Mode::Batches(batches) = &shared.mode {
                        batches.work(&shared).await;
                    }
                });
            }
        }
        let error = loop {
            while self.tasks.try_join_next().is_some() {}
            match puller.pull(shutdown.as_mut()).await {
                Pulled::Batch(batch) => {
                    self.shared
                        .stats
                        .received
                        .fetch_add(batch.len() as u64, AtomicOrdering::Relaxed);
                    self.dispatch(batch);
                }
                Pulled::Stop | Pulled::Ended => break None,
                Pulled::Failed(e) => break Some(e),
            }
        };
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
        let queued: Vec<Held> = match &self.shared.mode {
            Mode::Each(_) => self
                .shared
                .lanes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain()
                .flat_map(|(_, q)| q)
                .collect(),
            Mode::Batches(batches) => batches.unhandled(),
        };
        release_unhandled(queued).await;
        close_subscriber(puller.subscriber).await;
        self.shared.stats.report(error)
    }

    /// Starts a task per delivery without a key and per key not running yet; deliveries of a
    /// key already running queue behind it (one lock for the whole batch).
    fn dispatch(&mut self, batch: Vec<Held>) {
        if let Mode::Batches(batches) = &self.shared.mode {
            batches.admit(&self.shared, batch);
            return;
        }
        let mut start = Vec::new();
        {
            let mut lanes = self
                .shared
                .lanes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for held in batch {
                let Some(lane) = held.delivery.key().map(|k| lane_of(&self.shared.hasher, k))
                else {
                    start.push((None, held));
                    continue;
                };
                match lanes.entry(lane) {
                    Entry::Occupied(mut queue) => queue.get_mut().push_back(held),
                    Entry::Vacant(v) => {
                        v.insert(VecDeque::new());
                        start.push((Some(lane), held));
                    }
                }
            }
        }
        for (lane, held) in start {
            let shared = self.shared.clone();
            match lane {
                None => self.tasks.spawn(async move { shared.process(held).await }),
                Some(lane) => self
                    .tasks
                    .spawn(async move { shared.run_lane(lane, held).await }),
            };
        }
    }
}

/// The lane of a key: messages of one key always share a lane, so they run one after
/// another; two keys whose hashes collide share one too (still in order, less concurrent).
fn lane_of(hasher: &foldhash::fast::RandomState, key: &str) -> u64 {
    std::hash::BuildHasher::hash_one(hasher, key)
}

/// Hands deliveries no handler received back to the broker, uncounted.
async fn release_unhandled(queued: Vec<Held>) {
    for held in queued {
        if let Err(e) = held.delivery.release().await {
            tracing::debug!(id = held.delivery.id(), error = %e, "busbar consumer: releasing an unhandled delivery failed; it comes back after its ack timeout");
        }
    }
}

async fn close_subscriber(mut subscriber: Box<dyn Subscriber>) {
    if let Err(e) = subscriber.close().await {
        tracing::warn!(error = %e, "busbar consumer: closing the subscriber failed");
    }
}

impl Stats {
    fn report(&self, error: Option<Error>) -> ConsumerReport {
        let received = self.received.load(AtomicOrdering::Acquire);
        let processed = self.processed.load(AtomicOrdering::Acquire);
        let dead_lettered = self.dead_lettered.load(AtomicOrdering::Acquire);
        let skipped = self.skipped.load(AtomicOrdering::Acquire);
        ConsumerReport {
            received,
            processed,
            retried: self.retried.load(AtomicOrdering::Acquire),
            dead_lettered,
            left_unacked: received.saturating_sub(processed + dead_lettered + skipped),
            skipped,
            error,
        }
    }
}

impl RunShared {
    fn stopping(&self) -> bool {
        self.stopping.load(AtomicOrdering::Acquire)
    }

    /// Handles `first` and then what queues behind it in its lane, one after another, until
    /// the lane is empty (then it is removed) or the run stops (what waits is released then).
    async fn run_lane(&self, lane: u64, first: Held) {
        let mut current = first;
        loop {
            self.process(current).await;
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            if self.stopping() {
                return;
            }
            match lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
                Some(next) => current = next,
                None => {
                    lanes.remove(&lane);
                    return;
                }
            }
        }
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
                let Mode::Each(handler) = &self.mode else {
                    return;
                };
                let handler = handler.clone();
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
                    self.succeeded(delivery, record_key.as_deref())
                        .instrument(handler_span)
                        .await;
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
                    self.count_retry(delivery, backoff).await;
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

    /// A handling succeeded: recorded in the idempotency store (if any), then acked.
    async fn succeeded(&self, delivery: &Delivery, record_key: Option<&str>) {
        if let (Some(key), Some(idem)) = (record_key, &self.idempotency) {
            if let Err(e) = idem.store.record(key, idem.ttl).await {
                tracing::warn!(id = delivery.id(), error = %e, "busbar consumer: recording the processed message failed; a redelivery would be handled again");
            }
        }
        if settle(delivery.ack().await, "ack") {
            self.stats.processed.fetch_add(1, AtomicOrdering::Relaxed);
        }
    }

    /// A failed handling will be retried after `backoff`: counted, and the delivery's ack
    /// deadline pushed past the wait where the backend can.
    async fn count_retry(&self, delivery: &Delivery, backoff: Duration) {
        self.stats.retried.fetch_add(1, AtomicOrdering::Relaxed);
        if let Some(m) = delivery.metrics() {
            m.retried.increment(1);
        }
        if let Some(by) = self.extend_by {
            // Keep the delivery ours while it waits; failure only risks a duplicate.
            let _ = delivery.extend_deadline(by + backoff).await;
        }
    }

    /// With an idempotency store: `Seen::Settled` when the delivery was processed before (it
    /// is acked here), else its record key. A store that cannot answer is asked again after
    /// a pause while the delivery (and so its key) waits: never handled unchecked, never
    /// overtaken by the next message of its key. At shutdown it is released (`Settled`).
    async fn already_processed(&self, delivery: &Delivery) -> Option<Seen> {
        let idem = self.idempotency.as_ref()?;
        let key = crate::idempotency::key(&self.group, delivery.topic(), delivery.id());
        loop {
            match idem.store.contains(&key).await {
                Ok(false) => return Some(Seen::Fresh(key)),
                Ok(true) => {
                    tracing::debug!(
                        id = delivery.id(),
                        "busbar consumer: processed before, acking without the handler"
                    );
                    if settle(delivery.ack().await, "ack") {
                        self.stats.skipped.fetch_add(1, AtomicOrdering::Relaxed);
                    }
                    return Some(Seen::Settled);
                }
                Err(e) => {
                    tracing::warn!(id = delivery.id(), error = %e, ?STORE_RETRY_PAUSE, "busbar consumer: the idempotency store did not answer; asking again after a pause");
                    let stop = self.stop.notified();
                    tokio::pin!(stop);
                    stop.as_mut().enable();
                    if !self.stopping() {
                        tokio::select! {
                            _ = stop => {}
                            _ = tokio::time::sleep(STORE_RETRY_PAUSE) => {}
                        }
                    }
                    if self.stopping() {
                        let _ = delivery.release().await;
                        return Some(Seen::Settled);
                    }
                }
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
