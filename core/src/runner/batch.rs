//! The batch mode of the consumer runner ([`super::Consumer::run_batches`]): the handler gets
//! up to `max` events at once, at most one per key, and answers one outcome per event.
//!
//! `concurrency` workers take batches from one ready queue. A key's next event becomes ready
//! only when its previous one is settled (acked or dead-lettered), so each key's events are
//! handled one after another, in delivery order, across batches and retries; an event that
//! failed waits out its backoff as the head of its key, then joins a later batch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::time::Instant;
use tracing::Instrument;

use super::{Failure, Held, RunShared, Seen};
use crate::bus::Event;
use crate::policy::RetryDecision;

/// A batch handler, boxed: one outcome per event, in the events' order.
pub(super) type BoxedBatchHandler = std::sync::Arc<
    dyn Fn(Vec<Event>) -> BoxFuture<'static, Vec<std::result::Result<(), Failure>>> + Send + Sync,
>;

/// One delivery on its way through the batch mode.
struct Slot {
    held: Held,
    /// Its key's lane, if it has a key.
    lane: Option<u64>,
    /// The attempt of its next handling.
    attempt: u32,
    /// Whether a handler saw it already (then it is never released uncounted).
    handled: bool,
    /// Upcast and checked against the idempotency store: ready for the handler.
    prepared: Option<Prepared>,
}

struct Prepared {
    /// The event after the upcasters (`None`: the delivery's own).
    upcast: Option<Event>,
    /// Where the idempotency store records its success.
    record_key: Option<String>,
}

/// What became of a slot after a batch.
enum After {
    /// Settled (acked or dead-lettered), skipped, or left unacked: its key moves on.
    Done(Option<u64>),
    /// Handled and failed: handled again after the backoff, its key waiting.
    Retry(Slot, Duration),
}

#[derive(Default)]
struct State {
    /// Per busy lane, the slots behind its head (the head is ready, in a batch, or waiting
    /// for its retry).
    lanes: HashMap<u64, VecDeque<Slot>, foldhash::fast::RandomState>,
    /// Heads of lanes and slots without a key, in arrival order (retries first).
    ready: VecDeque<Slot>,
    /// Failed slots waiting out their backoff, by due time.
    retrying: BTreeMap<(Instant, u64), Slot>,
    retry_seq: u64,
}

/// The batch handler and the state its workers share.
pub(super) struct Batches {
    handler: BoxedBatchHandler,
    max: usize,
    state: Mutex<State>,
    /// Signalled when slots become ready.
    ready: tokio::sync::Notify,
}

impl Batches {
    pub(super) fn new(handler: BoxedBatchHandler, max: usize) -> Self {
        Self {
            handler,
            max,
            state: Mutex::new(State::default()),
            ready: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a pulled batch in: heads of idle keys (and keyless deliveries) become ready,
    /// the others queue behind their key.
    pub(super) fn admit(&self, shared: &RunShared, batch: Vec<Held>) {
        {
            let mut st = self.lock();
            for held in batch {
                let lane = held
                    .delivery
                    .key()
                    .map(|k| super::lane_of(&shared.hasher, k));
                let attempt = held.delivery.attempt().max(1);
                let slot = Slot {
                    held,
                    lane,
                    attempt,
                    handled: false,
                    prepared: None,
                };
                match lane {
                    Some(lane) if st.lanes.contains_key(&lane) => {
                        if let Some(queue) = st.lanes.get_mut(&lane) {
                            queue.push_back(slot);
                        }
                    }
                    Some(lane) => {
                        st.lanes.insert(lane, VecDeque::new());
                        st.ready.push_back(slot);
                    }
                    None => st.ready.push_back(slot),
                }
            }
        }
        self.ready.notify_waiters();
    }

    /// What is left at shutdown: the deliveries no handler saw (to release uncounted); the
    /// others are dropped, left unacked for redelivery.
    pub(super) fn unhandled(&self) -> Vec<Held> {
        let mut st = self.lock();
        let st = &mut *st;
        let slots = st
            .ready
            .drain(..)
            .chain(st.lanes.drain().flat_map(|(_, q)| q))
            .chain(std::mem::take(&mut st.retrying).into_values());
        slots.filter(|s| !s.handled).map(|s| s.held).collect()
    }

    /// One worker: takes up to `max` ready slots at a time and handles them, until the run
    /// stops.
    pub(super) async fn work(&self, shared: &RunShared) {
        loop {
            let ready = self.ready.notified();
            let stop = shared.stop.notified();
            tokio::pin!(ready, stop);
            ready.as_mut().enable();
            stop.as_mut().enable();
            if shared.stopping() {
                return;
            }
            let (batch, wake) = self.take();
            if batch.is_empty() {
                let wait = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => futures::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop => return,
                    _ = ready => {}
                    _ = wait => {}
                }
                continue;
            }
            let after = self.handle(shared, batch).await;
            self.settled(after);
        }
    }

    /// Up to `max` ready slots (due retries first), or when the next retry is due.
    fn take(&self) -> (Vec<Slot>, Option<Instant>) {
        let mut st = self.lock();
        let now = Instant::now();
        while let Some(entry) = st.retrying.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let slot = entry.remove();
            st.ready.push_front(slot);
        }
        let n = self.max.min(st.ready.len());
        let batch: Vec<Slot> = st.ready.drain(..n).collect();
        let wake = st.retrying.keys().next().map(|k| k.0);
        (batch, wake)
    }

    /// Moves keys on after a batch: the next slot of a settled key becomes ready; a failed
    /// one waits for its retry.
    fn settled(&self, after: Vec<After>) {
        let mut woke = false;
        {
            let mut st = self.lock();
            for a in after {
                match a {
                    After::Done(None) => {}
                    After::Done(Some(lane)) => {
                        match st.lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
                            Some(next) => {
                                st.ready.push_back(next);
                                woke = true;
                            }
                            None => {
                                st.lanes.remove(&lane);
                            }
                        }
                    }
                    After::Retry(slot, backoff) => {
                        st.retry_seq += 1;
                        let key = (Instant::now() + backoff, st.retry_seq);
                        st.retrying.insert(key, slot);
                        woke = true;
                    }
                }
            }
        }
        if woke {
            // Idle workers look again (a new retry may be due sooner than they planned).
            self.ready.notify_waiters();
        }
    }

    /// Prepares, handles and settles one batch.
    async fn handle(&self, shared: &RunShared, batch: Vec<Slot>) -> Vec<After> {
        let mut after = Vec::with_capacity(batch.len());
        let mut go = Vec::with_capacity(batch.len());
        for slot in batch {
            match prepare(shared, slot).await {
                Ok(slot) => go.push(slot),
                Err(lane) => after.push(After::Done(lane)),
            }
        }
        if go.is_empty() {
            return after;
        }
        let events: Vec<Event> = go
            .iter_mut()
            .map(|slot| {
                slot.handled = true;
                let prepared = slot.prepared.as_ref();
                let event = prepared
                    .and_then(|p| p.upcast.as_ref())
                    .unwrap_or(slot.held.delivery.event());
                event.with_attempt(slot.attempt)
            })
            .collect();
        let span = tracing::info_span!(
            "busbar.process_batch",
            messaging.operation.type = "process",
            messaging.destination.name = go[0].held.delivery.topic(),
            messaging.batch.message_count = go.len(),
        );
        let started = std::time::Instant::now();
        let n = go.len();
        let handler = self.handler.clone();
        let outcomes = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(events))) {
            Ok(fut) => AssertUnwindSafe(fut)
                .catch_unwind()
                .instrument(span.clone())
                .await
                .unwrap_or_else(|panic| vec_of_panic(n, super::panic_text(panic))),
            Err(panic) => vec_of_panic(n, super::panic_text(panic)),
        };
        if let Some(m) = go[0].held.delivery.metrics() {
            m.process.record(started.elapsed().as_secs_f64());
        }
        if outcomes.len() > n {
            tracing::warn!(
                events = n,
                outcomes = outcomes.len(),
                "busbar consumer: the batch handler returned more outcomes than events; the extra ones are ignored"
            );
        }
        let mut outcomes = outcomes.into_iter();
        let mut acks = Vec::new();
        let mut failed = Vec::new();
        for slot in go {
            match outcomes.next() {
                Some(Ok(())) => acks.push(slot),
                Some(Err(failure)) => failed.push((slot, failure)),
                None => failed.push((
                    slot,
                    Failure::panic(format!(
                        "the batch handler returned fewer outcomes than the {n} events it got"
                    )),
                )),
            }
        }
        // Acked together, so backends that coalesce acks (Redis, SQS) send one call.
        let acked = futures::future::join_all(acks.into_iter().map(|slot| {
            let shared = &shared;
            async move {
                shared
                    .succeeded(&slot.held.delivery, slot.prepared_record_key())
                    .await;
                After::Done(slot.lane)
            }
        }))
        .instrument(span.clone())
        .await;
        after.extend(acked);
        for (slot, failure) in failed {
            after.push(
                failed_attempt(shared, slot, failure)
                    .instrument(span.clone())
                    .await,
            );
        }
        after
    }
}

impl Slot {
    fn prepared_record_key(&self) -> Option<&str> {
        self.prepared.as_ref().and_then(|p| p.record_key.as_deref())
    }
}

fn vec_of_panic(n: usize, text: String) -> Vec<std::result::Result<(), Failure>> {
    (0..n).map(|_| Err(Failure::panic(text.clone()))).collect()
}

/// Upcasts a slot's event and checks it against the idempotency store, once. `Err(lane)`:
/// settled here (dead-lettered, or processed before), its key moves on.
async fn prepare(shared: &RunShared, mut slot: Slot) -> std::result::Result<Slot, Option<u64>> {
    if slot.prepared.is_some() {
        return Ok(slot);
    }
    let delivery = &slot.held.delivery;
    let upcast = match shared.upcasters.apply(delivery.event()) {
        Ok(upcast) => upcast,
        Err(error) => {
            tracing::debug!(id = delivery.id(), error = %error, "busbar consumer: upcasting failed, dead-lettering");
            shared.dead_letter(delivery, slot.attempt, &error).await;
            return Err(slot.lane);
        }
    };
    let record_key = match shared.already_processed(delivery).await {
        Some(Seen::Settled) => return Err(slot.lane),
        Some(Seen::Fresh(key)) => Some(key),
        None => None,
    };
    slot.prepared = Some(Prepared { upcast, record_key });
    Ok(slot)
}

/// A failed handling: retried after the policy's backoff, or dead-lettered.
async fn failed_attempt(shared: &RunShared, mut slot: Slot, failure: Failure) -> After {
    let delivery = &slot.held.delivery;
    if failure.permanent {
        tracing::debug!(id = delivery.id(), attempt = slot.attempt, error = %failure.text, "busbar consumer: permanent failure, dead-lettering");
        shared
            .dead_letter(delivery, slot.attempt, &failure.text)
            .await;
        return After::Done(slot.lane);
    }
    match shared.retry.decide(slot.attempt) {
        RetryDecision::RetryAfter(backoff) => {
            tracing::debug!(id = delivery.id(), attempt = slot.attempt, error = %failure.text, ?backoff, "busbar consumer: handler failed, retrying");
            shared.count_retry(delivery, backoff).await;
            slot.attempt += 1;
            After::Retry(slot, backoff)
        }
        RetryDecision::GiveUp => {
            shared
                .dead_letter(delivery, slot.attempt, &failure.text)
                .await;
            After::Done(slot.lane)
        }
    }
}
