//! One member of a consumer group: long polls on the group's queue, hands messages out one key
//! at a time, settles them with SQS calls.
//!
//! Per-key order on a FIFO queue: SQS hands out the messages of one `MessageGroupId` (the key)
//! in order and none of that group to anyone while one of them is in flight. One receive can
//! return several messages of a key; this member hands them out one at a time, the next only
//! once the previous is acked. When a delivery is nacked (or found too close to its visibility
//! deadline) the messages of its key still waiting here are made visible again too, so SQS
//! returns the whole key, in order, to whichever member receives next.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName,
};
use busbar_core::raw::{self, Ack};
use busbar_core::{
    Delivery, Error, ErrorKind, Event, Message, Result, SubscribeOptions, Subscriber,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::{codec, error, GroupQueue, Inner, BACKEND, VISIBILITY_MAX};

/// A received message that is due too close to its visibility deadline is not handed out.
const STALE_MARGIN: Duration = Duration::from_millis(300);
/// The most messages one SQS receive, delete or visibility call takes.
const SQS_BATCH_MAX: usize = 10;

struct Received {
    message: Message,
    receipt: String,
    attempt: u32,
    received_at: Instant,
    /// Why busbar could not decode it (see [`busbar_core::raw::undecodable`]).
    undecodable: Option<String>,
}

struct Handed {
    key: Option<String>,
    receipt: String,
    /// When SQS makes it visible again (unless extended).
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// Received and free to hand out (at most one per key).
    ready: VecDeque<Received>,
    /// Received behind a busy key, in order.
    waiting: HashMap<String, VecDeque<Received>>,
    /// Keys with a message in `ready` or handed out.
    busy: HashSet<String>,
    /// Handed out and not settled.
    handed: HashMap<u64, Handed>,
    /// No handed-out delivery is due before this (it may be earlier than the earliest real
    /// deadline, never later): `next` scans `handed` only once it has passed.
    next_expiry: Option<Instant>,
    next_token: u64,
    /// Received (or being received) and not settled: bounds `max_in_flight`.
    outstanding: usize,
    errors: VecDeque<Error>,
    /// Nothing more is received or handed out.
    closed: bool,
    /// The held messages were handed back (once).
    released: bool,
}

impl State {
    fn admit(&mut self, r: Received, key: Option<String>) {
        match key {
            Some(k) if self.busy.contains(&k) => self.waiting.entry(k).or_default().push_back(r),
            Some(k) => {
                self.busy.insert(k);
                self.ready.push_back(r);
            }
            None => self.ready.push_back(r),
        }
    }

    /// The key's next waiting message becomes ready, or the key is free.
    fn free_key(&mut self, key: &str) {
        if let Some(queue) = self.waiting.get_mut(key) {
            if let Some(r) = queue.pop_front() {
                if queue.is_empty() {
                    self.waiting.remove(key);
                }
                self.ready.push_back(r);
                return;
            }
        }
        self.busy.remove(key);
    }

    /// Takes every message still waiting behind `key` and frees it.
    fn take_key(&mut self, key: &str) -> Vec<Received> {
        self.busy.remove(key);
        let rest: Vec<Received> = self.waiting.remove(key).into_iter().flatten().collect();
        self.outstanding -= rest.len();
        rest
    }
}

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
    deletes: mpsc::UnboundedSender<(String, oneshot::Sender<Result<()>>)>,
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
        if !st.handed.contains_key(&token) {
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
        let mut st = self.lock();
        let Some(Handed { key, .. }) = st.handed.remove(&token) else {
            return Vec::new();
        };
        st.outstanding -= 1;
        let rest = match key {
            Some(k) if release_key => st.take_key(&k),
            Some(k) => {
                st.free_key(&k);
                Vec::new()
            }
            None => Vec::new(),
        };
        drop(st);
        self.ready.notify_waiters();
        self.capacity.notify_waiters();
        rest
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<()> {
        self.inner
            .sqs
            .change_message_visibility()
            .queue_url(&self.queue.url)
            .receipt_handle(receipt)
            .visibility_timeout(whole_seconds(timeout))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error::map(e, "changing a message's visibility"))
    }

    /// Makes messages visible again at once (best effort: a message whose change fails comes
    /// back when its visibility timeout ends).
    async fn release(&self, receipts: Vec<String>) {
        for chunk in receipts.chunks(SQS_BATCH_MAX) {
            let entries = chunk.iter().enumerate().filter_map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(0)
                    .build()
                    .ok()
            });
            let result = self
                .inner
                .sqs
                .change_message_visibility_batch()
                .queue_url(&self.queue.url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            match result {
                Ok(out) if !out.failed.is_empty() => tracing::debug!(
                    failed = out.failed.len(),
                    "sqs: some messages could not be made visible again; they return after their visibility timeout"
                ),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %error::map(e, "releasing messages"),
                    "sqs: messages could not be made visible again; they return after their visibility timeout"),
            }
        }
    }

    /// Forgets deliveries past their visibility deadline (SQS has made them visible again, so
    /// acking them could not be trusted) and frees their keys; returns the receipts of the
    /// messages that waited behind those keys, to be made visible again too, and when to look
    /// again. Scans only once `next_expiry` has passed: `next` calls it for every delivery.
    fn expire_overdue(&self) -> (Vec<String>, Option<Instant>) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.next_expiry.is_none_or(|at| now < at) {
            return (Vec::new(), st.next_expiry);
        }
        let overdue: Vec<u64> = st
            .handed
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        let mut receipts = Vec::new();
        let freed = !overdue.is_empty();
        for token in overdue {
            if let Some(h) = st.handed.remove(&token) {
                st.outstanding -= 1;
                tracing::debug!(
                    "sqs: a delivery passed its ack timeout unsettled; SQS redelivers it"
                );
                if let Some(k) = h.key {
                    receipts.extend(st.take_key(&k).into_iter().map(|r| r.receipt));
                }
            }
        }
        let next = st.handed.values().map(|h| h.deadline).min();
        st.next_expiry = next;
        drop(st);
        if freed {
            self.capacity.notify_waiters();
        }
        (receipts, next)
    }

    /// Moves the deadline of a handed-out delivery.
    fn set_deadline(&self, token: u64, deadline: Instant) {
        let mut st = self.lock();
        if let Some(h) = st.handed.get_mut(&token) {
            h.deadline = deadline;
            // A deadline may also move earlier (extended by less than what was left).
            st.next_expiry = Some(st.next_expiry.map_or(deadline, |at| at.min(deadline)));
        }
    }

    /// Closes this member: nothing more is handed out; every message it holds is made visible
    /// again.
    async fn shut_down(&self) {
        let receipts = {
            let mut st = self.lock();
            st.closed = true;
            if st.released {
                return;
            }
            st.released = true;
            let mut receipts: Vec<String> = st.handed.drain().map(|(_, h)| h.receipt).collect();
            receipts.extend(st.ready.drain(..).map(|r| r.receipt));
            receipts.extend(st.waiting.drain().flat_map(|(_, q)| q).map(|r| r.receipt));
            st.busy.clear();
            st.outstanding = 0;
            receipts
        };
        self.ready.notify_waiters();
        self.capacity.notify_waiters();
        self.release(receipts).await;
    }
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
        let (deletes, delete_rx) = mpsc::unbounded_channel();
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
        tasks.push(tokio::spawn(delete_loop(
            shared.inner.clone(),
            shared.queue.url.clone(),
            delete_rx,
        )));
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
    loop {
        // Reserve room for up to 10 messages within max_in_flight.
        let wanted = loop {
            let freed = shared.capacity.notified();
            {
                let mut st = shared.lock();
                if st.closed {
                    return;
                }
                let free = shared.options.max_in_flight.saturating_sub(st.outstanding);
                if free > 0 {
                    let n = free.min(SQS_BATCH_MAX);
                    st.outstanding += n;
                    break n;
                }
            }
            freed.await;
        };
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
                let mut st = shared.lock();
                st.outstanding -= wanted - messages.len().min(wanted);
                for m in messages {
                    let Some(receipt) = m.receipt_handle else {
                        st.outstanding -= 1;
                        continue;
                    };
                    let attempt = m
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|n| n.parse::<u32>().ok())
                        .unwrap_or(1);
                    let system = |name| {
                        m.attributes
                            .as_ref()
                            .and_then(|a| a.get(&name))
                            .map(String::as_str)
                    };
                    let foreign = codec::Foreign {
                        message_id: m.message_id.as_deref(),
                        group_id: system(MessageSystemAttributeName::MessageGroupId),
                        sent_ms: system(MessageSystemAttributeName::SentTimestamp),
                    };
                    let body = m.body.as_deref().unwrap_or("");
                    let attributes = m.message_attributes.as_ref();
                    // A busbar message with a broken attribute: handed over with what can be
                    // read (as another program's message would be), marked undecodable, and
                    // the bus in front dead-letters it.
                    let (message, undecodable) = match codec::decode(body, attributes, &foreign) {
                        Ok(message) => (shared.natively_dead_lettered(message), None),
                        Err(e) => (
                            codec::decode_foreign(
                                body,
                                attributes.unwrap_or(&HashMap::new()),
                                &foreign,
                            ),
                            Some(e.to_string()),
                        ),
                    };
                    let key = shared.key_of(&message);
                    st.admit(
                        Received {
                            message,
                            receipt,
                            attempt,
                            received_at,
                            undecodable,
                        },
                        key,
                    );
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

/// `DeleteMessageBatch` calls in flight at once per subscriber.
const DELETES_IN_FLIGHT: usize = 4;

/// Deletes acked messages, up to 10 per `DeleteMessageBatch` call: whatever acks are queued
/// when a call starts go together, so a lone ack is not delayed, and up to
/// [`DELETES_IN_FLIGHT`] calls run at once (one HTTP round trip per 10 acks would otherwise cap
/// a busy consumer).
async fn delete_loop(
    inner: Arc<Inner>,
    queue_url: String,
    mut requests: mpsc::UnboundedReceiver<(String, oneshot::Sender<Result<()>>)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(DELETES_IN_FLIGHT));
    while let Some(first) = requests.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < SQS_BATCH_MAX {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (inner, queue_url) = (inner.clone(), queue_url.clone());
        tokio::spawn(async move {
            delete_batch(&inner, &queue_url, batch).await;
            drop(slot);
        });
    }
}

/// One `DeleteMessageBatch` call; answers each ack with its entry's outcome.
async fn delete_batch(
    inner: &Inner,
    queue_url: &str,
    batch: Vec<(String, oneshot::Sender<Result<()>>)>,
) {
    let entries = batch
        .iter()
        .enumerate()
        .filter_map(|(i, (receipt, _))| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build()
                .ok()
        })
        .collect();
    let result = inner
        .sqs
        .delete_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await;
    match result {
        Ok(out) => {
            let failed: HashMap<String, String> = out
                .failed
                .into_iter()
                .map(|f| {
                    let why = format!("{}: {}", f.code, f.message.unwrap_or_default());
                    (f.id, why)
                })
                .collect();
            for (i, (_, reply)) in batch.into_iter().enumerate() {
                let r = match failed.get(&i.to_string()) {
                    None => Ok(()),
                    Some(why) => Err(Error::new(
                        ErrorKind::Broker,
                        format!("SQS refused to delete the message [{why}]"),
                    )
                    .with_backend(BACKEND)),
                };
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            let err = error::map(e, "deleting acked messages");
            for (_, reply) in batch {
                let _ = reply.send(Err(error::copy(&err)));
            }
        }
    }
}

#[async_trait]
impl Subscriber for SqsSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        let shared = &self.shared;
        loop {
            let woken = shared.ready.notified();
            let (release, next_deadline) = shared.expire_overdue();
            if !release.is_empty() {
                shared.release(release).await;
            }
            let taken = {
                let mut st = shared.lock();
                if let Some(e) = st.errors.pop_front() {
                    return Err(e);
                }
                match st.ready.pop_front() {
                    Some(r) => {
                        let key = shared.key_of(&r.message);
                        let token = st.next_token;
                        st.next_token += 1;
                        let deadline = r.received_at + shared.visibility;
                        st.next_expiry =
                            Some(st.next_expiry.map_or(deadline, |at| at.min(deadline)));
                        st.handed.insert(
                            token,
                            Handed {
                                key,
                                receipt: r.receipt.clone(),
                                deadline,
                            },
                        );
                        Some((r, token))
                    }
                    None if st.closed || shared.inner.is_closed() => return Ok(None),
                    None => None,
                }
            };
            let Some((r, token)) = taken else {
                match next_deadline {
                    Some(at) => {
                        let _ = tokio::time::timeout_at(at.into(), woken).await;
                    }
                    None => woken.await,
                }
                continue;
            };
            let age = r.received_at.elapsed();
            let fresh = if age + STALE_MARGIN >= shared.visibility {
                false
            } else if age > shared.visibility / 2 {
                // Waited behind its key for half its visibility: restart the clock.
                let extended = shared
                    .change_visibility(&r.receipt, shared.visibility)
                    .await
                    .is_ok();
                shared.set_deadline(token, Instant::now() + shared.visibility);
                extended
            } else {
                true
            };
            if !fresh {
                // SQS may already have handed it (and its key) to another member: give the key
                // back whole and let SQS redeliver in order.
                tracing::debug!(id = %r.message.id, ?age, "sqs: a received message reached its visibility deadline before it was handed out; releasing its key");
                let mut receipts = vec![r.receipt];
                receipts.extend(shared.settled(token, true).into_iter().map(|w| w.receipt));
                shared.release(receipts).await;
                continue;
            }
            let message = Arc::new(r.message);
            let acker = Box::new(SqsAck {
                shared: shared.clone(),
                token,
                receipt: r.receipt,
            });
            let event = Event::from_shared(shared.topic.clone(), message, r.attempt);
            return Ok(Some(match r.undecodable {
                None => raw::delivery(event, acker),
                Some(error) => raw::undecodable(event, acker, error),
            }));
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

struct SqsAck {
    shared: Arc<Shared>,
    token: u64,
    receipt: String,
}

#[async_trait]
impl Ack for SqsAck {
    async fn ack(&self) -> Result<()> {
        self.shared.check_handed(self.token)?;
        let (reply, answer) = oneshot::channel();
        self.shared
            .deletes
            .send((self.receipt.clone(), reply))
            .map_err(|_| Error::closed("sqs subscriber").with_backend(BACKEND))?;
        answer
            .await
            .map_err(|_| Error::closed("sqs subscriber").with_backend(BACKEND))??;
        self.shared.settled(self.token, false);
        Ok(())
    }

    async fn redeliver(&self, delay: Duration) -> Result<()> {
        // At most `DURATION_MAX` (12 h, SQS's longest visibility timeout): checked in core.
        self.shared.check_handed(self.token)?;
        // Messages of its key waiting here go back first (the key stays locked in SQS while
        // this one is in flight, so they cannot overtake it); this one last. Settling first
        // also keeps a fresh copy received right after the change from being taken for a
        // waiting one.
        let rest = self.shared.settled(self.token, true);
        self.shared
            .release(rest.into_iter().map(|r| r.receipt).collect())
            .await;
        self.shared.change_visibility(&self.receipt, delay).await
    }

    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.shared.check_handed(self.token)?;
        let asked = Instant::now();
        self.shared.change_visibility(&self.receipt, by).await?;
        self.shared.set_deadline(self.token, asked + by);
        Ok(())
    }
}
