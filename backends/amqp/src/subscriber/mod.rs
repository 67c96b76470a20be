//! One member of a consumer group on RabbitMQ.
//!
//! The group's partition queues have `x-single-active-consumer`: whoever consumes a queue,
//! RabbitMQ delivers to one consumer at a time. Members spread the queues among themselves:
//! each announces itself every second on the group's fanout exchange, and the live members,
//! sorted by id, take the partitions `p` with `p % members == index`. A member giving a queue
//! up first stops handing its messages out, waits (bounded) for the deliveries out to settle,
//! then closes that queue's channel: RabbitMQ puts the unacked messages back at the head of
//! the queue, in order, and makes the next consumer active — so a key is never processed by
//! two members at once and nothing is reordered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::raw::inflight::{next_handed_batch, State, Token};
use busbar_core::raw::ownership::{self, Activity};
use busbar_core::raw::Ack;
use busbar_core::{Delivery, Error, Result, SubscribeOptions, Subscriber};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod membership;

use membership::{member_connection, Member};

use crate::attempts::{self, Ledger};
use crate::{codec, config, map_err, Inner, BACKEND};

/// How often a member announces itself.
const HEARTBEAT: Duration = Duration::from_millis(1000);
/// How long a joining member listens for the others before taking queues.
const JOIN_LISTEN: Duration = Duration::from_millis(400);
/// A member not heard of for this long is gone.
const MEMBER_TTL: Duration = Duration::from_millis(3500);
/// The longest one broker call of a member may take. Generous: a RabbitMQ busy creating or
/// deleting quorum queues was seen taking over 5 s to declare a queue; the bound is there so
/// that a broker that stopped answering cannot freeze a member, not to hurry a slow one.
const BROKER_CALL: Duration = Duration::from_secs(20);
/// The longest a partition being given up waits for its deliveries to settle.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// A member leaving lets its last acks settle: this long without an ack…
const ACK_SETTLE_QUIET: Duration = Duration::from_millis(250);
/// …or at most this long.
const ACK_SETTLE_MAX: Duration = Duration::from_secs(2);

/// Runs one broker call, failing with a retryable timeout after [`BROKER_CALL`]: a broker
/// that stops answering must not freeze a member (its queues would be served by nobody).
async fn bounded<T>(what: &str, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(BROKER_CALL, call).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            busbar_core::ErrorKind::Timeout,
            format!("{what}: no answer from RabbitMQ within {BROKER_CALL:?}"),
        )
        .with_backend(BACKEND)),
    }
}

/// What the member's tasks and its deliveries share.
pub(crate) struct Shared {
    /// The member's id (in logs and announcements).
    member: String,
    state: Mutex<State>,
    wake: Notify,
    stop: AtomicBool,
    stopped: Notify,
    failure: Mutex<Option<Error>>,
    /// The channel consuming each owned partition, with the partition's epoch.
    channels: Mutex<HashMap<i32, (u64, Channel)>>,
    /// When the last `basic.ack` went out.
    last_ack: Mutex<Option<Instant>>,
    /// What the member knows of each owned partition's attempts (see `attempts`).
    ledgers: Mutex<HashMap<i32, Ledger>>,
    /// One attempts-queue read or write at a time on the member's attempts channel.
    attempts_io: tokio::sync::Mutex<()>,
    topic: Arc<str>,
    options: SubscribeOptions,
    inner: Arc<Inner>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acked_now(&self) {
        *self.last_ack.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// How long ago the last ack went out (a long time when none did).
    fn last_ack_age(&self) -> Duration {
        self.last_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(Duration::MAX, |t| t.elapsed())
    }

    /// Asks the member to leave; `next` then ends. `why` is logged.
    pub(crate) fn shut_down(&self, why: &str) {
        if !self.is_stopped() {
            tracing::debug!(member = %self.member, group = %self.options.group, why, "amqp: member asked to leave");
        }
        self.stop.store(true, AtomicOrdering::Release);
        self.stopped.notify_waiters();
        self.wake.notify_one();
    }

    fn is_stopped(&self) -> bool {
        self.stop.load(AtomicOrdering::Acquire)
    }

    fn fail(&self, e: Error) {
        tracing::warn!(group = %self.options.group, error = %e, "amqp: member failed");
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
        self.shut_down("failed");
    }

    fn ledgers(&self) -> MutexGuard<'_, HashMap<i32, Ledger>> {
        self.ledgers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The attempt of a delivery of `message` on partition `p`: the partition's attempts
    /// queue is read when its first delivery arrives (the member is the active consumer then).
    async fn attempt_of(
        &self,
        attempts: &Channel,
        p: i32,
        message: &busbar_core::Message,
        tag: i64,
        count: u64,
    ) -> u32 {
        let needs_load = self.ledgers().get(&p).is_some_and(Ledger::needs_load);
        if needs_load {
            let loaded = {
                let _io = self.attempts_io.lock().await;
                bounded(
                    "reading the attempts queue",
                    attempts::load(
                        attempts,
                        &self.topic,
                        &self.options.group,
                        p as u32,
                        self.inner.config.queue_expires,
                    ),
                )
                .await
            };
            let ledger = loaded.unwrap_or_else(|e| {
                tracing::warn!(partition = p, error = %e, "amqp: reading the attempts queue failed; attempts start from RabbitMQ's delivery count");
                Ledger::unreadable()
            });
            if let Some(l) = self.ledgers().get_mut(&p) {
                *l = ledger;
            }
        }
        match self.ledgers().get_mut(&p) {
            Some(l) => l.attempt(&message.id, tag, count),
            None => u32::try_from(count.saturating_add(1)).unwrap_or(u32::MAX),
        }
    }

    fn channel_for(&self, t: Token) -> Option<Channel> {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&t.partition)
            .filter(|(epoch, _)| *epoch == t.epoch)
            .map(|(_, c)| c.clone())
    }
}

/// A member of a consumer group on RabbitMQ.
pub(crate) struct AmqpSubscriber {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl AmqpSubscriber {
    pub(crate) async fn start(
        inner: Arc<Inner>,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Self> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let (conn, control, heard) = member_connection(&inner, topic, &options.group, &id).await?;
        let shared = Arc::new(Shared {
            member: id.clone(),
            state: Mutex::new(State::new(options.ack_timeout, options.max_in_flight)),
            wake: Notify::new(),
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            failure: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            last_ack: Mutex::new(None),
            ledgers: Mutex::new(HashMap::new()),
            attempts_io: tokio::sync::Mutex::new(()),
            topic: topic.into(),
            options,
            inner: inner.clone(),
        });
        let member = Member::new(id, conn, control, shared.clone());
        let task = tokio::spawn(member.run(heard));
        inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&shared));
        Ok(Self {
            shared,
            task: Some(task),
        })
    }
}

impl Drop for AmqpSubscriber {
    fn drop(&mut self) {
        self.shared.shut_down("subscriber dropped");
    }
}

#[async_trait]
impl Subscriber for AmqpSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1).await?.pop())
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let shared = &self.shared;
        let handed = next_handed_batch(&shared.state, &shared.wake, max, || {
            let failure = shared
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match failure {
                Some(e) => Some(Err(e)),
                None => shared.is_stopped().then_some(Ok(Vec::new())),
            }
        })
        .await?;
        Ok(handed
            .into_iter()
            .map(|h| {
                let acker = Box::new(AmqpAck {
                    shared: shared.clone(),
                    token: h.token(),
                });
                h.into_delivery(shared.topic.clone(), acker)
            })
            .collect())
    }

    async fn close(&mut self) -> Result<()> {
        self.shared.shut_down("subscriber closed");
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        Ok(())
    }
}

/// Settles one delivery.
struct AmqpAck {
    shared: Arc<Shared>,
    token: Token,
}

impl AmqpAck {
    fn check_open(&self) -> Result<()> {
        if self.shared.is_stopped() {
            Err(Error::closed("amqp subscriber").with_backend(BACKEND))
        } else {
            Ok(())
        }
    }

    /// Acks in the state and, when that counted, on the broker.
    async fn settle(&self) -> Result<()> {
        let counted = self.shared.state().ack(self.token);
        if counted {
            if let Some(l) = self.shared.ledgers().get_mut(&self.token.partition) {
                l.settled(self.token.offset);
            }
            if let Some(ch) = self.shared.channel_for(self.token) {
                let ack = async {
                    let sent = ch
                        .basic_ack(self.token.offset as u64, BasicAckOptions::default())
                        .await
                        .map_err(|e| map_err(e, "acking"));
                    self.shared.acked_now();
                    sent
                };
                if let Err(e) = bounded("acking", ack).await {
                    if self.shared.channel_for(self.token).is_some() {
                        return Err(e);
                    }
                    // The queue was handed over (or the connection lost) meanwhile: RabbitMQ
                    // hands the message out again, as for any ack that came too late.
                    tracing::debug!(?self.token, error = %e, "amqp: ack raced a hand-over; the message comes back");
                }
            }
        } else {
            tracing::debug!(?self.token, "amqp: ack of a delivery no longer held; ignored");
        }
        self.shared.wake.notify_one();
        Ok(())
    }
}

#[async_trait]
impl Ack for AmqpAck {
    async fn ack(&self) -> Result<()> {
        self.check_open()?;
        self.settle().await
    }

    async fn redeliver(&self, after: Duration) -> Result<()> {
        self.check_open()?;
        let at = (!after.is_zero()).then(|| Instant::now() + after);
        self.shared.state().nack(self.token, at);
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.check_open()?;
        self.shared.state().extend(self.token, Instant::now() + by);
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        self.check_open()?;
        // Back to the head of its key inside the member, same attempt; should the member
        // hand the partition over first, the attempts record says no handler saw it.
        self.shared.state().release(self.token);
        self.shared.wake.notify_one();
        Ok(())
    }
}
