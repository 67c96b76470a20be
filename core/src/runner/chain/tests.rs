//! The event chain and upcasting through the consumer runner, on the in-memory bus.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::{Event, EventBus};
use crate::error::ErrorKind;
use crate::memory::MemoryBus;
use crate::message::{Message, CAUSATION_ID, CORRELATION_ID, VERSION};
use crate::options::{PublishOptions, SubscribeOptions};
use crate::policy::RetryPolicy;
use crate::runner::{Consumer, Permanent};

async fn bus_with(topics: &[(&str, &str)]) -> Arc<dyn EventBus> {
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    for (topic, group) in topics {
        bus.provision(topic, &SubscribeOptions::new(*group))
            .await
            .expect("provision");
    }
    bus
}

/// The next `n` messages of `topic` for `group`, acked.
async fn read(bus: &Arc<dyn EventBus>, topic: &str, group: &str, n: usize) -> Vec<Message> {
    let mut sub = bus
        .subscribe(topic, SubscribeOptions::new(group))
        .await
        .expect("subscribe");
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a message in time")
            .expect("next")
            .expect("open");
        out.push(d.message().clone());
        d.ack().await.expect("ack");
    }
    out
}

async fn publish(bus: &Arc<dyn EventBus>, topic: &str, m: Message) {
    bus.publish(topic, m, &PublishOptions::default())
        .await
        .expect("publish");
}

/// Runs `consumer` until `handled` handler calls returned (or 5 s), then stops it.
async fn run_for<H, Fut>(consumer: Consumer, handled: usize, handler: H) -> crate::ConsumerReport
where
    H: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static,
{
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let handler = Arc::new(handler);
    consumer
        .run_until(
            move |e: Event| {
                let (c, handler) = (c.clone(), handler.clone());
                async move {
                    let r = handler(e).await;
                    c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    r
                }
            },
            async move {
                let end = tokio::time::Instant::now() + Duration::from_secs(5);
                while calls.load(std::sync::atomic::Ordering::SeqCst) < handled
                    && tokio::time::Instant::now() < end
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        )
        .await
        .expect("run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_handler_publishes_joins_the_handled_events_chain() {
    let bus = bus_with(&[("a", "g"), ("b", "g"), ("b", "check"), ("c", "check")]).await;
    let root = Message::new("order placed");
    let root_id = root.id.clone();
    publish(&bus, "a", root).await;
    // Outside any handler: the start of a chain, no header on the wire.
    let lone = bus_with(&[("x", "check")]).await;
    publish(&lone, "x", Message::new("alone")).await;
    let alone = read(&lone, "x", "check", 1).await.remove(0);
    assert_eq!(alone.headers.get(CORRELATION_ID), None);
    assert_eq!(alone.correlation_id(), alone.id);
    assert_eq!(alone.causation_id(), None);

    // a → b (in the handler's task), and an explicit chain from a spawned task.
    let b = bus.clone();
    let report = run_for(
        Consumer::new(bus.clone(), "a").group("g"),
        1,
        move |e: Event| {
            let b = b.clone();
            async move {
                b.publish("b", Message::new("invoiced"), &PublishOptions::default())
                    .await?;
                let spawned = e.message().clone();
                let b2 = b.clone();
                tokio::spawn(async move {
                    b2.publish(
                        "c",
                        Message::new("from a spawned task").caused_by(&spawned),
                        &PublishOptions::default(),
                    )
                    .await
                })
                .await??;
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(report.processed, 1, "{report:?}");
    let invoiced = read(&bus, "b", "check", 1).await.remove(0);
    assert_eq!(invoiced.correlation_id(), root_id);
    assert_eq!(invoiced.causation_id(), Some(root_id.as_str()));
    let spawned = read(&bus, "c", "check", 1).await.remove(0);
    assert_eq!(spawned.correlation_id(), root_id);
    assert_eq!(spawned.causation_id(), Some(root_id.as_str()));

    // b → c: the correlation id stays the root's, the causation is the handled event.
    let c = bus.clone();
    let report = run_for(
        Consumer::new(bus.clone(), "b").group("g"),
        1,
        move |e: Event| {
            let c = c.clone();
            async move {
                assert_eq!(
                    e.correlation_id(),
                    e.headers().get(CORRELATION_ID).unwrap_or("")
                );
                c.publish("c", Message::new("shipped"), &PublishOptions::default())
                    .await?;
                // A chain the application set itself is kept.
                c.publish(
                    "c",
                    Message::new("own chain").with_correlation_id("saga-7"),
                    &PublishOptions::default(),
                )
                .await?;
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(report.processed, 1, "{report:?}");
    let got = read(&bus, "c", "check", 2).await;
    assert_eq!(got[0].correlation_id(), root_id);
    assert_eq!(got[0].causation_id(), Some(invoiced.id.as_str()));
    assert_eq!(got[1].correlation_id(), "saga-7");
    assert_eq!(got[1].causation_id(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_the_chain() {
    let bus = bus_with(&[("t", "g"), ("t.dlq", "check")]).await;
    let first = Message::new("first of its chain").with_key("k");
    let first_id = first.id.clone();
    let cause = Message::new("the cause");
    let second = Message::new("second of a chain")
        .with_key("k")
        .caused_by(&cause);
    publish(&bus, "t", first).await;
    publish(&bus, "t", second).await;
    let report = run_for(
        Consumer::new(bus.clone(), "t").group("g"),
        2,
        |_e: Event| async { Err(Permanent::new("rejected").into()) },
    )
    .await;
    assert_eq!(report.dead_lettered, 2, "{report:?}");
    let dead = read(&bus, "t.dlq", "check", 2).await;
    assert_eq!(dead[0].headers.get(CORRELATION_ID), Some(first_id.as_str()));
    assert_eq!(dead[0].causation_id(), None);
    assert_eq!(dead[1].correlation_id(), cause.id);
    assert_eq!(dead[1].causation_id(), Some(cause.id.as_str()));
}

fn rename(from: &'static str, to: &'static str) -> impl Fn(Message) -> Result<Message, String> {
    move |mut m: Message| {
        let body = String::from_utf8(m.payload.to_vec()).map_err(|e| e.to_string())?;
        if !body.contains(from) {
            return Err(format!("no {from} in {body}"));
        }
        m.payload = body.replace(from, to).into();
        Ok(m)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_only_the_newest_version() {
    let bus = bus_with(&[("orders", "g")]).await;
    let typed = |body: &str| {
        Message::new(body.to_owned())
            .with_key("k")
            .with_type("order.created")
    };
    publish(&bus, "orders", typed("total=1")).await; // no header: version 1
    publish(&bus, "orders", typed("amount=2").with_version(2)).await;
    publish(&bus, "orders", typed("sum=3").with_version(3)).await;
    publish(
        &bus,
        "orders",
        Message::new("total=4")
            .with_key("k")
            .with_type("order.paid"),
    )
    .await;
    publish(
        &bus,
        "orders",
        typed("total=5").with_header(VERSION, "1.0-beta"),
    )
    .await;
    type Seen = Arc<Mutex<Vec<(String, Option<u32>)>>>;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let consumer = Consumer::new(bus.clone(), "orders")
        .group("g")
        .upcast("order.created", 1, 2, rename("total", "amount"))
        .upcast("order.created", 2, 3, rename("amount", "sum"));
    let report = run_for(consumer, 5, move |e: Event| {
        let s = s.clone();
        async move {
            let body = String::from_utf8_lossy(e.payload()).into_owned();
            s.lock().map_err(|_| "poisoned")?.push((body, e.version()));
            Ok(())
        }
    })
    .await;
    assert_eq!(report.processed, 5, "{report:?}");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            ("sum=1".to_owned(), Some(3)),
            ("sum=2".to_owned(), Some(3)),
            ("sum=3".to_owned(), Some(3)),
            // Another type, and a version busbar cannot read: left as they are.
            ("total=4".to_owned(), Some(1)),
            ("total=5".to_owned(), None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upcaster_dead_letters_the_original_at_once() {
    let bus = bus_with(&[("orders", "g"), ("orders.dlq", "check")]).await;
    publish(
        &bus,
        "orders",
        Message::new("no such field").with_type("order.created"),
    )
    .await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let consumer = Consumer::new(bus.clone(), "orders")
        .group("g")
        .retry(
            RetryPolicy::builder()
                .max_attempts(5)
                .build()
                .expect("policy"),
        )
        .upcast("order.created", 1, 2, rename("total", "amount"));
    let report = consumer
        .run_until(
            move |_e: Event| {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<(), String>(()) }
            },
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .expect("run");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(report.retried, 0, "{report:?}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let dead = read(&bus, "orders.dlq", "check", 1).await.remove(0);
    assert_eq!(&dead.payload[..], b"no such field");
    assert_eq!(dead.version(), Some(1));
    let error = dead
        .headers
        .get(crate::policy::dlq_headers::ERROR)
        .unwrap_or("");
    assert!(
        error.contains("upcasting order.created v1 to v2") && error.contains("no total"),
        "{error}"
    );
    let _ = CAUSATION_ID;
}

#[tokio::test]
async fn upcasters_are_checked_before_consuming() {
    let bus = bus_with(&[]).await;
    let ok = |m: Message| Ok::<_, String>(m);
    for consumer in [
        Consumer::new(bus.clone(), "t").upcast("e", 0, 1, ok),
        Consumer::new(bus.clone(), "t").upcast("e", 2, 2, ok),
        Consumer::new(bus.clone(), "t").upcast("e", 3, 1, ok),
        Consumer::new(bus.clone(), "t")
            .upcast("e", 1, 2, ok)
            .upcast("e", 1, 3, ok),
    ] {
        let err = consumer
            .run_until(|_e: Event| async { Ok::<(), String>(()) }, async {})
            .await
            .expect_err("invalid upcasters");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
}
