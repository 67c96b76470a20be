//! Tests of the suite itself: deliberately broken backends must FAIL the cases that cover
//! their fault. A suite that cannot fail is worse than none.
#![allow(clippy::panic)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busbar_conformance::{all_cases, Harness, Scale, Verdict};
use busbar_core::memory::MemoryBus;
use busbar_core::raw::{self, Ack, Backend, Identity};
use busbar_core::{
    Bus, Capabilities, Delivery, EventBus, Message, NackAction, PublishOptions, Result,
    SubscribeOptions, Subscriber,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Publish silently drops every 10th message.
    LosesEveryTenth,
    /// The subscriber acks on receipt, before anyone handled the message.
    AcksOnReceipt,
    /// The subscriber swaps each pair of consecutive deliveries.
    ReordersPairs,
    /// Nack with delay redelivers at once.
    IgnoresNackDelay,
    /// Publish with delay publishes at once.
    IgnoresPublishDelay,
    /// Declares nack_can_delay off, yet accepts a delayed nack silently.
    DeclaresOffButAccepts,
    /// On close, takes a few more deliveries it never hands out and parks them (acked on the
    /// broker) in a side store, from which a later member hands them out late: behind newer
    /// messages of their keys.
    ParksOnClose,
    /// On close, takes a few more deliveries it never hands out and nacks them: the broker
    /// counts hand-outs no handler saw.
    CountsUnseenOnClose,
}

#[derive(Debug, Clone)]
struct Broken {
    inner: MemoryBus,
    fault: Fault,
    published: Arc<AtomicUsize>,
    /// Messages parked by [`Fault::ParksOnClose`], shared by every connection.
    parked: Arc<Mutex<VecDeque<Message>>>,
}

/// A backend whose "broker" is a memory bus, with a fault; it sits behind a [`Bus`] like
/// every backend, so the front door's checks and dead-letter path are the real ones.
#[async_trait]
impl Backend for Broken {
    const IDENTITY: Identity = Identity {
        name: "broken",
        schemes: &["memory"],
        feature: "memory",
    };

    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        if self.fault == Fault::DeclaresOffButAccepts {
            c.nack_can_delay = false;
        }
        c
    }
    async fn publish(&self, topic: &str, m: Vec<Message>, o: &PublishOptions) -> Result<()> {
        if m.len() == 1
            && self.fault == Fault::LosesEveryTenth
            && self.published.fetch_add(1, AtomicOrdering::SeqCst) % 10 == 9
        {
            return Ok(());
        }
        if self.fault == Fault::IgnoresPublishDelay && o.delay.is_some() {
            return self
                .inner
                .publish_batch(topic, m, &PublishOptions::default())
                .await;
        }
        self.inner.publish_batch(topic, m, o).await
    }
    async fn subscribe(&self, topic: &str, o: SubscribeOptions) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(BrokenSub {
            inner: self.inner.subscribe(topic, o).await?,
            fault: self.fault,
            held: VecDeque::new(),
            parked: self.parked.clone(),
            topic: topic.to_owned(),
        }))
    }
    async fn provision(&self, topic: &str, o: &SubscribeOptions) -> Result<()> {
        self.inner.provision(topic, o).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct BrokenSub {
    inner: Box<dyn Subscriber>,
    fault: Fault,
    held: VecDeque<Delivery>,
    parked: Arc<Mutex<VecDeque<Message>>>,
    topic: String,
}

/// Settles nothing: for parked messages (acked on the broker when they were parked).
struct NoAck;

#[async_trait]
impl Ack for NoAck {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }
    async fn redeliver(&self, _: Duration) -> Result<()> {
        Ok(())
    }
    async fn extend_deadline(&self, _: Duration) -> Result<()> {
        Ok(())
    }
}

struct BrokenAck {
    inner: Delivery,
    fault: Fault,
}

#[async_trait]
impl Ack for BrokenAck {
    async fn ack(&self) -> Result<()> {
        if self.fault == Fault::AcksOnReceipt {
            return Ok(());
        }
        self.inner.ack().await
    }
    async fn redeliver(&self, after: Duration) -> Result<()> {
        match self.fault {
            Fault::AcksOnReceipt => Ok(()),
            Fault::IgnoresNackDelay => self.inner.nack(NackAction::Redeliver).await,
            _ if after.is_zero() => self.inner.nack(NackAction::Redeliver).await,
            _ => self.inner.nack(NackAction::RedeliverAfter(after)).await,
        }
    }
    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.inner.extend_deadline(by).await
    }
    async fn release(&self) -> Result<()> {
        self.inner.release().await
    }
}

#[async_trait]
impl Subscriber for BrokenSub {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        if self.fault == Fault::ParksOnClose {
            // Parked messages come out late: only when nothing fresh arrives.
            match tokio::time::timeout(Duration::from_millis(200), self.inner.next()).await {
                Ok(next) => return next,
                Err(_) => {
                    let parked = self.parked.lock().ok().and_then(|mut p| p.pop_front());
                    if let Some(m) = parked {
                        let event = busbar_core::Event::new(self.topic.clone(), m, 1);
                        return Ok(Some(raw::delivery(event, Box::new(NoAck))));
                    }
                    return self.inner.next().await;
                }
            }
        }
        let d = if self.fault == Fault::ReordersPairs {
            if let Some(d) = self.held.pop_front() {
                d
            } else {
                let Some(first) = self.inner.next().await? else {
                    return Ok(None);
                };
                // Swap with the next one if it comes quickly.
                match tokio::time::timeout(Duration::from_millis(50), self.inner.next()).await {
                    Ok(Ok(Some(second))) => {
                        self.held.push_back(first);
                        second
                    }
                    _ => first,
                }
            }
        } else {
            let Some(d) = self.inner.next().await? else {
                return Ok(None);
            };
            d
        };
        if self.fault == Fault::AcksOnReceipt {
            d.ack().await?;
        }
        let event = d.event().clone();
        Ok(Some(raw::delivery(
            event,
            Box::new(BrokenAck {
                inner: d,
                fault: self.fault,
            }),
        )))
    }
    async fn close(&mut self) -> Result<()> {
        if matches!(self.fault, Fault::ParksOnClose | Fault::CountsUnseenOnClose) {
            // "Read ahead": up to 3 deliveries no handler will see.
            for _ in 0..3 {
                let Ok(Ok(Some(d))) =
                    tokio::time::timeout(Duration::from_millis(50), self.inner.next()).await
                else {
                    break;
                };
                if self.fault == Fault::ParksOnClose {
                    if let Ok(mut p) = self.parked.lock() {
                        p.push_back(d.message().clone());
                    }
                    d.ack().await?;
                } else {
                    d.nack(NackAction::Redeliver).await?;
                }
            }
        }
        self.inner.close().await
    }
}

fn harness(fault: Fault) -> Harness {
    let name = format!("memory://broken-{}", uuid::Uuid::new_v4().simple());
    let published = Arc::new(AtomicUsize::new(0));
    let parked: Arc<Mutex<VecDeque<Message>>> = Arc::default();
    Harness {
        backend: "broken",
        url: name.clone(),
        start_hint: "nothing to start",
        connect: Arc::new(move || {
            let (name, published, parked) = (name.clone(), published.clone(), parked.clone());
            Box::pin(async move {
                Ok(Arc::new(Bus::from_backend(Broken {
                    inner: MemoryBus::from_url(&name)?,
                    fault,
                    published,
                    parked: parked.clone(),
                })) as Arc<dyn EventBus>)
            })
        }),
    }
}

async fn verdict(fault: Fault, case: &str) -> Verdict {
    let case = all_cases()
        .into_iter()
        .find(|c| c.name == case)
        .unwrap_or_else(|| panic!("no case {case}"));
    harness(fault)
        .run_case(&case, Scale::new(0.5))
        .await
        .verdict
}

async fn assert_fails(fault: Fault, case: &str, expected_reason: &str) {
    match verdict(fault, case).await {
        Verdict::Failed(why) => assert!(
            why.contains(expected_reason),
            "{case} failed for {fault:?}, but with {why:?} (expected it to mention {expected_reason:?})"
        ),
        other => panic!("{case} did not fail for {fault:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_messages_fails_publish_subscribe() {
    assert_fails(
        Fault::LosesEveryTenth,
        "basic::publish_subscribe",
        "lost messages",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_messages_fails_concurrent_publishers() {
    assert_fails(
        Fault::LosesEveryTenth,
        "basic::concurrent_publishers",
        "lost messages",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acking_before_the_handler_fails_crash_and_timeout_cases() {
    assert_fails(
        Fault::AcksOnReceipt,
        "ordering::consumer_crash",
        "lost messages",
    )
    .await;
    assert_fails(
        Fault::AcksOnReceipt,
        "redelivery::ack_timeout_redelivers",
        "never came back",
    )
    .await;
    assert_fails(
        Fault::AcksOnReceipt,
        "redelivery::nack_redelivers",
        "came back",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_a_key_fails_the_order_cases() {
    assert_fails(
        Fault::ReordersPairs,
        "ordering::per_key_order_single_consumer",
        "key",
    )
    .await;
    assert_fails(
        Fault::ReordersPairs,
        "basic::batch_publish",
        "arrived after",
    )
    .await;
    assert_fails(
        Fault::ReordersPairs,
        "ordering::per_key_order_competing_consumers",
        "per-key order violated",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_delays_fails_the_delay_cases() {
    assert_fails(
        Fault::IgnoresNackDelay,
        "redelivery::nack_with_delay_waits",
        "before the",
    )
    .await;
    assert_fails(
        Fault::IgnoresPublishDelay,
        "delayed::delayed_publish",
        "before its",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_declared_off_that_works_fails_unsupported_is_typed() {
    assert_fails(
        Fault::DeclaresOffButAccepts,
        "capabilities::unsupported_is_typed",
        "succeeded silently",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unbroken_wrapper_passes_the_same_cases() {
    // Guards the wrapper itself: with a harmless fault, the cases used above pass.
    for case in [
        "basic::publish_subscribe",
        "ordering::per_key_order_single_consumer",
    ] {
        match verdict(Fault::IgnoresPublishDelay, case).await {
            Verdict::Passed(_) => {}
            other => panic!("{case} should pass: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_handed_out_late_after_a_close_fail_the_churn_case() {
    assert_fails(
        Fault::ParksOnClose,
        "churn::churn_raw_subscribers",
        "had never been delivered",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_unseen_hand_backs_fails_the_churn_cases() {
    assert_fails(
        Fault::CountsUnseenOnClose,
        "churn::churn_raw_subscribers",
        "attempts over-counted",
    )
    .await;
    assert_fails(
        Fault::CountsUnseenOnClose,
        "churn::churn_runner_retries_once",
        "dead-lettered though their retry would have succeeded",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_backend_passes_the_churn_cases() {
    for case in [
        "churn::churn_raw_subscribers",
        "churn::churn_runner_retries_once",
    ] {
        match verdict(Fault::IgnoresPublishDelay, case).await {
            Verdict::Passed(_) => {}
            other => panic!("{case} should pass on the memory backend: {other:?}"),
        }
    }
}
