//! One member of a consumer group: a dedicated thread polls librdkafka (fetches, rebalance
//! callbacks, commits), the async side hands deliveries out of the shared [`State`].

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::raw::Ack;
use busbar_core::{
    Delivery, Error, ErrorKind, Result, StartPosition, SubscribeOptions, Subscriber,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message as _;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::{codec, error, Inner, BACKEND};

mod ack;
mod membership;

use ack::commit;
use busbar_core::raw::inflight::{next_handed_batch, State, Token};
use membership::MemberContext;

/// How long `close` waits for the consumer thread to leave the group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the consumer thread and the async side share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when a delivery settles (revocations wait on it).
    settled: Condvar,
    /// Wakes `next` when records arrive or deliveries settle.
    wake: Notify,
    /// The thread should leave the group and stop.
    stop: AtomicBool,
    /// Leaving for good: revocations do not wait for in-flight deliveries.
    closing: AtomicBool,
    /// Fetching is paused (the buffer is full); newly assigned partitions follow it.
    paused: AtomicBool,
    /// An error for `next` to report (authorization refused, ...).
    failure: Mutex<Option<Error>>,
    topic: Arc<str>,
    options: SubscribeOptions,
    inner: Arc<Inner>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the thread to leave the group; `next` then ends.
    pub(crate) fn shut_down(&self) {
        self.closing.store(true, AtomicOrdering::Release);
        self.stop.store(true, AtomicOrdering::Release);
        self.wake.notify_one();
        self.settled.notify_all();
    }

    fn is_stopped(&self) -> bool {
        self.stop.load(AtomicOrdering::Acquire)
    }

    fn notify_settled(&self) {
        self.settled.notify_all();
        self.wake.notify_one();
    }
}

/// How long the consumer thread waits in a poll while fetching is paused.
const PAUSED_POLL: Duration = Duration::from_millis(2);

/// The consumer thread: poll, route records into the state, commit periodically, apply
/// back-pressure, and leave the group when asked.
fn run(consumer: BaseConsumer<MemberContext>, shared: Arc<Shared>, done: oneshot::Sender<()>) {
    let interval = shared.inner.config.commit_interval;
    let high_water = (shared.options.max_in_flight * 4).max(1024);
    let mut next_commit = Instant::now() + interval;
    while !shared.is_stopped() {
        // Paused, a poll returns nothing: look at the buffer again soon, or fetching resumes
        // up to a whole poll (100 ms) late.
        let wait = if shared.paused.load(AtomicOrdering::Acquire) {
            PAUSED_POLL
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(wait) {
            Some(Ok(record)) => {
                let message = codec::decode(&record);
                let (p, o) = (record.partition(), record.offset());
                if shared.state().receive(p, o, message) {
                    shared.wake.notify_one();
                }
            }
            Some(Err(e)) => {
                tracing::warn!(group = %shared.options.group, error = %e, "kafka: fetch error");
                if error::kind_of(&e) == ErrorKind::Auth {
                    *shared
                        .failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(error::map(e, "consuming"));
                    shared.wake.notify_one();
                }
            }
            None => {}
        }
        let now = Instant::now();
        if now >= next_commit {
            commit(&consumer, &shared, None);
            next_commit = now + interval;
        }
        let buffered = shared.state().buffered();
        let paused = shared.paused.load(AtomicOrdering::Acquire);
        let want_pause = buffered >= high_water || (paused && buffered > high_water / 2);
        if want_pause != paused {
            if let Ok(assigned) = consumer.assignment() {
                let r = if want_pause {
                    consumer.pause(&assigned)
                } else {
                    consumer.resume(&assigned)
                };
                match r {
                    Ok(()) => shared.paused.store(want_pause, AtomicOrdering::Release),
                    Err(e) => tracing::debug!(error = %e, "kafka: pause/resume failed"),
                }
            }
        }
    }
    commit(&consumer, &shared, None);
    // Leaving the group runs the revoke callback (which commits once more) and closes.
    drop(consumer);
    shared.wake.notify_one();
    let _ = done.send(());
}

/// A member of a consumer group on Kafka.
pub(crate) struct KafkaSubscriber {
    shared: Arc<Shared>,
    done: Option<oneshot::Receiver<()>>,
}

impl KafkaSubscriber {
    pub(crate) fn start(inner: Arc<Inner>, topic: &str, options: SubscribeOptions) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(options.ack_timeout, options.max_in_flight)),
            settled: Condvar::new(),
            wake: Notify::new(),
            stop: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            failure: Mutex::new(None),
            topic: topic.into(),
            options,
            inner: inner.clone(),
        });
        let session = inner.config.session_timeout.as_millis().max(1000);
        let consumer: BaseConsumer<MemberContext> = inner
            .config
            .base()
            .set("group.id", &shared.options.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                match shared.options.start {
                    StartPosition::Latest => "latest",
                    StartPosition::Earliest => "earliest",
                },
            )
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 10).max(100).to_string())
            .create_with_context(MemberContext {
                shared: shared.clone(),
            })
            .map_err(|e| error::map(e, "creating the Kafka consumer"))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| error::map(e, "subscribing"))?;
        let (tx, rx) = oneshot::channel();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("busbar-kafka-{}", shared.options.group))
            .spawn(move || run(consumer, thread_shared, tx))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Broker,
                    format!("starting the consumer thread: {e}"),
                )
                .with_backend(BACKEND)
            })?;
        inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&shared));
        Ok(Self {
            shared,
            done: Some(rx),
        })
    }
}

impl Drop for KafkaSubscriber {
    fn drop(&mut self) {
        // Dropped without close: leave the group in the background; unacked deliveries go
        // back to the group.
        self.shared.shut_down();
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1).await?.pop())
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let shared = &self.shared;
        let handed = next_handed_batch(&shared.state, &shared.wake, max, || {
            if shared.is_stopped() {
                return Some(Ok(Vec::new()));
            }
            let failure = shared
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            failure.map(Err)
        })
        .await?;
        Ok(handed
            .into_iter()
            .map(|h| {
                let acker = Box::new(KafkaAck {
                    shared: shared.clone(),
                    token: h.token(),
                });
                h.into_delivery(shared.topic.clone(), acker)
            })
            .collect())
    }

    async fn close(&mut self) -> Result<()> {
        self.shared.shut_down();
        if let Some(done) = self.done.take() {
            if tokio::time::timeout(CLOSE_TIMEOUT, done).await.is_err() {
                tracing::warn!(group = %self.shared.options.group,
                    "kafka: the consumer did not close within {CLOSE_TIMEOUT:?}; leaving it behind");
            }
        }
        Ok(())
    }
}

/// Settles one delivery.
struct KafkaAck {
    shared: Arc<Shared>,
    token: Token,
}

impl KafkaAck {
    fn check_open(&self) -> Result<()> {
        if self.shared.is_stopped() {
            Err(Error::closed("kafka subscriber").with_backend(BACKEND))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Ack for KafkaAck {
    async fn ack(&self) -> Result<()> {
        self.check_open()?;
        if !self.shared.state().ack(self.token) {
            tracing::debug!(?self.token, "kafka: ack of a delivery no longer held (revoked or delivered again); ignored");
        }
        self.shared.notify_settled();
        Ok(())
    }

    async fn redeliver(&self, after: Duration) -> Result<()> {
        self.check_open()?;
        let at = (!after.is_zero()).then(|| Instant::now() + after);
        self.shared.state().nack(self.token, at);
        self.shared.notify_settled();
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        self.check_open()?;
        self.shared.state().release(self.token);
        self.shared.notify_settled();
        Ok(())
    }

    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.check_open()?;
        self.shared.state().extend(self.token, Instant::now() + by);
        Ok(())
    }
}
