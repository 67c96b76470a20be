//! One member of a consumer group: long polls on the group's queue, hands messages out one key
//! at a time, settles them with SQS calls.
//!
//! Per-key order on a FIFO queue: SQS hands out the messages of one `MessageGroupId` (the key)
//! in order and none of that group to anyone while one of them is in flight. One receive can
//! return several messages of a key; this member hands them out one at a time, the next only
//! once the previous is acked. When a delivery is nacked (or found too close to its visibility
//! deadline) the messages of its key still waiting here are made visible again too, so SQS
//! returns the whole key, in order, to whichever member receives next.

mod ack;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use busbar_core::raw::{self, coalesce::Coalescer};
use busbar_core::{
    Delivery, Error, ErrorKind, Event, Message, Result, SubscribeOptions, Subscriber,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use self::ack::{delete_coalescer, SqsAck};
use self::state::{Received, State};
use crate::{codec, error, GroupQueue, Inner, BACKEND, VISIBILITY_MAX};

/// A received message that is due too close to its visibility deadline is not handed out.
const STALE_MARGIN: Duration = Duration::from_millis(300);
/// The most messages one SQS receive, delete or visibility call takes.
const SQS_BATCH_MAX: usize = 10;

struct Shared {
    inner: Arc<Inner>,
    queue: GroupQueue,
    topic: Arc<str>,
    options: SubscribeOptions,
    /// The visibility timeout of every receive: the ack timeout in whole seconds.
    visibility: Duration,
    /// Whether messages are handed out one at a time per key (FIFO queues).
    per_key: bool,
    state: Mutex<State>,
    /// Wakes `next` (a message is ready, an error, closed).
    ready: Notify,
    /// Wakes receivers (capacity was freed, closed).
    capacity: Notify,
    /// Acks become `DeleteMessageBatch` calls here.
    deletes: Coalescer<(), String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A message SQS moved here by native redrive (into the `busbar-redrive` queue of a
    /// dead-letter topic) carries no dead-letter headers of busbar's; it gets them, so it reads
    /// and redrives like any dead letter.
    fn natively_dead_lettered(&self, mut m: Message) -> Message {
        use busbar_core::dead_letter::headers;
        let Some(original) = self.topic.strip_suffix(".dlq") else {
            return m;
        };
        if m.headers.get(headers::ORIGINAL_TOPIC).is_none() {
            m.headers.insert(headers::ORIGINAL_TOPIC, original);
            m.headers.insert(
                headers::ERROR,
                format!(
                    "SQS moved it here after {} receives (native redrive, max_receive_count)",
                    self.inner
                        .config
                        .max_receive_count
                        .map_or_else(|| "too many".to_owned(), |n| n.to_string())
                ),
            );
        }
        m
    }

    fn key_of(&self, m: &Message) -> Option<String> {
        m.key.clone().filter(|k| self.per_key && !k.is_empty())
    }

    fn check_handed(&self, token: u64) -> Result<()> {
        let st = self.lock();
        if st.closed || self.inner.is_closed() {
            return Err(Error::closed("sqs subscriber").with_backend(BACKEND));
        }
        if !st.is_handed(token) {
            return Err(Error::new(
                ErrorKind::Closed,
                "the delivery was handed back to SQS (its visibility deadline passed or the subscriber closed)",
            )
            .with_backend(BACKEND));
        }
        Ok(())
    }

    /// Marks a handed-out delivery settled. With `release_key`, the messages waiting behind
    /// its key are returned (the caller makes them visible again) instead of handed out.
    fn settled(&self, token: u64, release_key: bool) -> Vec<Received> {
        let Some(rest) = self.lock().settle(token, release_key) else {
            return Vec::new();
        };
        self.ready.notify_waiters();
        self.capacity.notify_waiters();
        rest
    }

    /// Forgets deliveries past their visibility deadline (SQS has made them visible again, so
    /// acking them could not be trusted) and frees their keys; returns the receipts of the
    /// messages that waited behind those keys, to be made visible again too, and when to look
    /// again. Cheap until the earliest deadline has passed: `next` calls it for every delivery.
    fn expire_overdue(&self) -> (Vec<String>, Option<Instant>) {
        let (expired, receipts, next) = self.lock().expire(Instant::now());
        if expired {
            tracing::debug!("sqs: a delivery passed its ack timeout unsettled; SQS redelivers it");
            self.capacity.notify_waiters();
        }
        (receipts, next)
    }

    /// Moves the deadline of a handed-out delivery.
    fn set_deadline(&self, token: u64, deadline: Instant) {
        self.lock().set_deadline(token, deadline);
    }

    /// Closes this member: nothing more is handed out; every message it holds is made visible
    /// again.
    async fn shut_down(&self) {
        let receipts = self.lock().close_and_drain();
        self.ready.notify_waiters();
        self.capacity.notify_waiters();
        if let Some(receipts) = receipts {
            self.release(receipts).await;
        }
    }

    /// Reads one received SQS message: decoded (or, if busbar cannot decode it, read as
    /// another program's message and marked undecodable, so the bus in front dead-letters it
    /// with its content), with its key and attempt.
    fn read(&self, m: aws_sdk_sqs::types::Message, received_at: Instant) -> Option<Received> {
        let receipt = m.receipt_handle?;
        let system = |name| {
            m.attributes
                .as_ref()
                .and_then(|a| a.get(&name))
                .map(String::as_str)
        };
        let attempt = system(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1);
        let foreign = codec::Foreign {
            message_id: m.message_id.as_deref(),
            group_id: system(MessageSystemAttributeName::MessageGroupId),
            sent_ms: system(MessageSystemAttributeName::SentTimestamp),
        };
        let body = m.body.as_deref().unwrap_or("");
        let attributes = m.message_attributes.as_ref();
        let (message, undecodable) = match codec::decode(body, attributes, &foreign) {
            Ok(message) => (self.natively_dead_lettered(message), None),
            Err(e) => (
                codec::decode_foreign(body, attributes.unwrap_or(&HashMap::new()), &foreign),
                Some(e.to_string()),
            ),
        };
        Some(Received {
            key: self.key_of(&message),
            message,
            receipt,
            attempt,
            received_at,
            undecodable,
        })
    }

    /// Waits for room within `max_in_flight` and reserves up to 10 messages of it; `None`
    /// once closed.
    async fn reserve(&self) -> Option<usize> {
        loop {
            let freed = self.capacity.notified();
            {
                let mut st = self.lock();
                if st.closed {
                    return None;
                }
                let free = self.options.max_in_flight.saturating_sub(st.outstanding);
                if free > 0 {
                    let n = free.min(SQS_BATCH_MAX);
                    st.outstanding += n;
                    return Some(n);
                }
            }
            freed.await;
        }
    }

    /// Sends the next ready message out as a delivery; `Ok(None)` when none is ready (and
    /// the subscriber is open), with when to look for expired deliveries next.
    async fn hand_out(&self) -> Result<Handout> {
        let (release, next_deadline) = self.expire_overdue();
        if !release.is_empty() {
            self.release(release).await;
        }
        let mut st = self.lock();
        if let Some(e) = st.errors.pop_front() {
            return Err(e);
        }
        Ok(match st.hand_out(self.visibility) {
            Some((r, token)) => Handout::Taken(r, token),
            None if st.closed || self.inner.is_closed() => Handout::Closed,
            None => Handout::Wait(next_deadline),
        })
    }

    /// Whether a message taken from `ready` may still be handed out: one that waited behind
    /// its key for half its visibility gets its clock restarted; one about to become visible
    /// again is not (its key is given back whole, so SQS redelivers it in order).
    async fn still_fresh(self: &Arc<Self>, r: &Received, token: u64) -> bool {
        let age = r.received_at.elapsed();
        if age + STALE_MARGIN >= self.visibility {
            return false;
        }
        if age <= self.visibility / 2 {
            return true;
        }
        let extended = self
            .change_visibility(&r.receipt, self.visibility)
            .await
            .is_ok();
        self.set_deadline(token, Instant::now() + self.visibility);
        extended
    }
}

impl Shared {
    /// A handed-out message as a delivery.
    fn delivery(self: &Arc<Self>, r: Received, token: u64) -> Delivery {
        let acker = Box::new(SqsAck {
            shared: self.clone(),
            token,
            receipt: r.receipt,
        });
        let event = Event::from_shared(self.topic.clone(), Arc::new(r.message), r.attempt);
        match r.undecodable {
            None => raw::delivery(event, acker),
            Some(error) => raw::undecodable(event, acker, error),
        }
    }
}

/// What [`Shared::hand_out`] found.
// Returned and matched at once, never stored: boxing would cost an allocation per delivery.
#[allow(clippy::large_enum_variant)]
enum Handout {
    Taken(Received, u64),
    /// Nothing ready: wait for a wake-up, or until this instant (an expiry to check).
    Wait(Option<Instant>),
    Closed,
}

fn whole_seconds(d: Duration) -> i32 {
    let secs = d.as_millis().div_ceil(1000);
    secs.min(VISIBILITY_MAX.as_secs() as u128) as i32
}

/// A member of a consumer group on its SQS queue.
pub(crate) struct SqsSubscriber {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl SqsSubscriber {
    pub(crate) fn start(
        inner: Arc<Inner>,
        queue: GroupQueue,
        topic: &str,
        options: SubscribeOptions,
    ) -> Self {
        let deletes = delete_coalescer(inner.clone(), queue.url.clone());
        let visibility = Duration::from_secs(whole_seconds(options.ack_timeout) as u64);
        let receivers = inner.config.receivers;
        let shared = Arc::new(Shared {
            per_key: inner.config.fifo,
            inner,
            queue,
            topic: topic.into(),
            options,
            visibility,
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            capacity: Notify::new(),
            deletes,
        });
        let mut tasks: Vec<JoinHandle<()>> = (0..receivers)
            .map(|_| tokio::spawn(receive_loop(shared.clone())))
            .collect();
        let watcher = shared.clone();
        let mut closing = shared.inner.closing.subscribe();
        tasks.push(tokio::spawn(async move {
            if closing.wait_for(|closed| *closed).await.is_ok() {
                watcher.shut_down().await;
            }
        }));
        Self { shared, tasks }
    }
}

impl Drop for SqsSubscriber {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // A subscriber dropped without close: hand its messages back in the background.
        let shared = self.shared.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { shared.shut_down().await });
        }
    }
}

async fn receive_loop(shared: Arc<Shared>) {
    let mut failures: u32 = 0;
    while let Some(wanted) = shared.reserve().await {
        let result = shared
            .inner
            .sqs
            .receive_message()
            .queue_url(&shared.queue.url)
            .max_number_of_messages(wanted as i32)
            .wait_time_seconds(shared.inner.config.wait.as_secs() as i32)
            .visibility_timeout(whole_seconds(shared.visibility))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await;
        let received_at = Instant::now();
        match result {
            Ok(out) => {
                failures = 0;
                let messages = out.messages.unwrap_or_default();
                if shared.lock().closed {
                    let receipts = messages.into_iter().filter_map(|m| m.receipt_handle);
                    shared.release(receipts.collect()).await;
                    return;
                }
                let received: Vec<Received> = messages
                    .into_iter()
                    .filter_map(|m| shared.read(m, received_at))
                    .collect();
                let mut st = shared.lock();
                // What was reserved and did not come (fewer messages, or one without a receipt).
                st.outstanding -= wanted - received.len().min(wanted);
                for r in received {
                    st.admit(r);
                }
                drop(st);
                shared.ready.notify_waiters();
            }
            Err(e) => {
                let missing = error::is_missing(&e);
                let err = error::map(e, "receiving from the group's queue");
                {
                    let mut st = shared.lock();
                    if st.closed {
                        return;
                    }
                    st.outstanding -= wanted;
                    if missing {
                        st.errors.push_back(error::copy(&err));
                    }
                }
                shared.ready.notify_waiters();
                failures = failures.saturating_add(1);
                let backoff =
                    Duration::from_millis(100 << failures.min(6)).min(Duration::from_secs(5));
                tracing::warn!(error = %err, ?backoff, "sqs: receive failed; retrying");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

#[async_trait]
impl Subscriber for SqsSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1).await?.pop())
    }

    /// The first delivery is awaited (it may need a visibility call); the rest of the batch
    /// is what is ready and young enough to need none (nothing awaited after the first, so a
    /// dropped call hands out nothing more).
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let shared = &self.shared;
        loop {
            let woken = shared.ready.notified();
            let (r, token) = match shared.hand_out().await? {
                Handout::Taken(r, token) => (r, token),
                Handout::Closed => return Ok(Vec::new()),
                Handout::Wait(Some(at)) => {
                    let _ = tokio::time::timeout_at(at.into(), woken).await;
                    continue;
                }
                Handout::Wait(None) => {
                    woken.await;
                    continue;
                }
            };
            if !shared.still_fresh(&r, token).await {
                // SQS may already have handed it (and its key) to another member: give the key
                // back whole and let SQS redeliver in order.
                tracing::debug!(id = %r.message.id, age = ?r.received_at.elapsed(), "sqs: a received message reached its visibility deadline before it was handed out; releasing its key");
                let mut receipts = vec![r.receipt];
                receipts.extend(shared.settled(token, true).into_iter().map(|w| w.receipt));
                shared.release(receipts).await;
                continue;
            }
            let mut out = vec![shared.delivery(r, token)];
            let now = Instant::now();
            let mut st = shared.lock();
            while out.len() < max {
                let Some((r, token)) = st.hand_out_young(shared.visibility, now) else {
                    break;
                };
                out.push(shared.delivery(r, token));
            }
            return Ok(out);
        }
    }

    async fn close(&mut self) -> Result<()> {
        {
            let mut st = self.shared.lock();
            if st.released {
                return Ok(());
            }
            // Receivers finish their current long poll and hand its messages back.
            st.closed = true;
        }
        self.shared.capacity.notify_waiters();
        let receivers = self.shared.inner.config.receivers;
        let deadline = self.shared.inner.config.wait + Duration::from_secs(2);
        for t in self.tasks.iter_mut().take(receivers) {
            if tokio::time::timeout(deadline, &mut *t).await.is_err() {
                t.abort();
            }
        }
        self.shared.shut_down().await;
        Ok(())
    }
}
