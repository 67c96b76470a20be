//! Tests of the suite itself: deliberately broken backends must FAIL the cases that cover
//! their fault. A suite that cannot fail is worse than none.
#![allow(clippy::panic)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busbar_conformance::{all_cases, Harness, Scale, Verdict};
use busbar_core::memory::MemoryBus;
use busbar_core::{
    Ack, Capabilities, Delivery, EventBus, Message, NackAction, PublishOptions, Result,
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
}

#[derive(Debug, Clone)]
struct Broken {
    inner: MemoryBus,
    fault: Fault,
    published: Arc<AtomicUsize>,
}

#[async_trait]
impl EventBus for Broken {
    fn backend(&self) -> &'static str {
        "broken"
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = self.inner.capabilities();
        if self.fault == Fault::DeclaresOffButAccepts {
            c.nack_can_delay = false;
        }
        c
    }
    async fn publish(&self, topic: &str, m: Message, o: &PublishOptions) -> Result<()> {
        if self.fault == Fault::LosesEveryTenth
            && self.published.fetch_add(1, AtomicOrdering::SeqCst) % 10 == 9
        {
            busbar_core::validate_topic(topic)?;
            return Ok(());
        }
        if self.fault == Fault::IgnoresPublishDelay && o.delay.is_some() {
            return self
                .inner
                .publish(topic, m, &PublishOptions::default())
                .await;
        }
        self.inner.publish(topic, m, o).await
    }
    async fn publish_batch(&self, topic: &str, m: Vec<Message>, o: &PublishOptions) -> Result<()> {
        self.inner.publish_batch(topic, m, o).await
    }
    async fn subscribe(&self, topic: &str, o: SubscribeOptions) -> Result<Box<dyn Subscriber>> {
        Ok(Box::new(BrokenSub {
            inner: self.inner.subscribe(topic, o).await?,
            fault: self.fault,
            held: VecDeque::new(),
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
    async fn nack(&self, action: NackAction) -> Result<()> {
        match (self.fault, action) {
            (Fault::AcksOnReceipt, _) => Ok(()),
            (Fault::IgnoresNackDelay, NackAction::RedeliverAfter(_)) => {
                self.inner.nack(NackAction::Redeliver).await
            }
            (_, action) => self.inner.nack(action).await,
        }
    }
    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.inner.extend_deadline(by).await
    }
}

#[async_trait]
impl Subscriber for BrokenSub {
    async fn next(&mut self) -> Result<Option<Delivery>> {
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
        Ok(Some(Delivery::new(
            event,
            Box::new(BrokenAck {
                inner: d,
                fault: self.fault,
            }),
        )))
    }
    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }
}

fn harness(fault: Fault) -> Harness {
    let name = format!("memory://broken-{}", uuid::Uuid::new_v4().simple());
    let published = Arc::new(AtomicUsize::new(0));
    Harness {
        backend: "broken",
        url: name.clone(),
        start_hint: "nothing to start",
        connect: Arc::new(move || {
            let (name, published) = (name.clone(), published.clone());
            Box::pin(async move {
                Ok(Arc::new(Broken {
                    inner: MemoryBus::from_url(&name)?,
                    fault,
                    published,
                }) as Arc<dyn EventBus>)
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
