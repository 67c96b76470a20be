//! The metrics a known workload reports through the `metrics` facade (a debugging recorder
//! installed for this test process), on the memory backend.
#![allow(clippy::panic)]

use std::time::Duration;

use busbar_core::memory::MemoryBus;
use busbar_core::telemetry::{
    ACKED, CONSUMED, CONSUMER_LAG, DEAD_LETTERED, NACKED, OPERATION_DURATION, PROCESS_DURATION,
    RETRIED, SENT,
};
use busbar_core::{
    Consumer, EventBus, Message, NackAction, PublishOptions, RetryPolicy, StartPosition,
    SubscribeOptions,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::CompositeKey;

/// One snapshot of every metric (taking one resets them).
type Snap = Vec<(
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// The value of metric `name` whose labels include `topic` (and `group`, when given).
fn value<'a>(
    snap: &'a Snap,
    name: &str,
    topic: &str,
    group: Option<&str>,
) -> Option<&'a DebugValue> {
    snap.iter()
        .find(|(k, _, _, _)| {
            let key = k.key();
            let has =
                |label: &str, v: &str| key.labels().any(|l| l.key() == label && l.value() == v);
            key.name() == name
                && has("messaging.destination.name", topic)
                && has("messaging.system", "memory")
                && group.is_none_or(|g| has("messaging.consumer.group.name", g))
        })
        .map(|(_, _, _, v)| v)
}

fn counter(snap: &Snap, name: &str, topic: &str, group: Option<&str>) -> u64 {
    match value(snap, name, topic, group) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} on {topic}: {other:?}"),
    }
}

fn gauge(snap: &Snap, name: &str, topic: &str, group: &str) -> f64 {
    match value(snap, name, topic, Some(group)) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("{name} on {topic}/{group}: {other:?}"),
    }
}

fn samples(snap: &Snap, name: &str, topic: &str, group: Option<&str>) -> usize {
    match value(snap, name, topic, group) {
        Some(DebugValue::Histogram(v)) => v.len(),
        other => panic!("{name} on {topic}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_workload_reports_its_counts() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this process");
    let bus = MemoryBus::new();
    let opts = SubscribeOptions::new("g").start(StartPosition::Earliest);
    bus.provision("t", &opts).await.expect("provision");
    bus.provision("t", &SubscribeOptions::new("idle"))
        .await
        .expect("provision");
    let batch = (0..3).map(|i| Message::new(format!("m{i}"))).collect();
    bus.publish_batch("t", batch, &PublishOptions::default())
        .await
        .expect("batch");
    for i in 3..5 {
        bus.publish(
            "t",
            Message::new(format!("m{i}")),
            &PublishOptions::default(),
        )
        .await
        .expect("publish");
    }
    let mut sub = bus.subscribe("t", opts).await.expect("subscribe");
    let mut seen = 0;
    while seen < 6 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("in time")
            .expect("next")
            .expect("open");
        seen += 1;
        match (&d.payload()[..], d.attempt()) {
            (b"m2", 1) => d.nack(NackAction::Redeliver).await.expect("nack"),
            (b"m3", _) => d
                .nack(NackAction::DeadLetter {
                    reason: "bad".into(),
                })
                .await
                .expect("dead-letter"),
            _ => d.ack().await.expect("ack"),
        }
    }
    sub.close().await.expect("close");

    // The runner: one handler failure retried in-process.
    let bus_dyn: std::sync::Arc<dyn EventBus> = std::sync::Arc::new(bus.clone());
    let consumer = Consumer::new(bus_dyn, "r")
        .group("h")
        .start(StartPosition::Earliest)
        .lag_interval(Some(Duration::from_millis(100)))
        .retry(
            RetryPolicy::builder()
                .max_attempts(3)
                .initial_delay(Duration::from_millis(1))
                .build()
                .expect("policy"),
        );
    bus.provision("r", &consumer.subscribe_options())
        .await
        .expect("provision");
    for i in 0..3 {
        bus.publish(
            "r",
            Message::new(format!("r{i}")),
            &PublishOptions::default(),
        )
        .await
        .expect("publish");
    }
    let report = consumer
        .run_until(
            |e: busbar_core::Event| async move {
                if e.payload().as_ref() == b"r1" && e.attempt() == 1 {
                    Err("first try fails")
                } else {
                    Ok(())
                }
            },
            tokio::time::sleep(Duration::from_millis(500)),
        )
        .await
        .expect("run");
    assert_eq!(report.processed, 3, "{report:?}");
    assert_eq!(bus.lag("t", "idle").await.expect("lag"), 5);

    let snap = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snap, SENT, "t", None), 5);
    assert_eq!(counter(&snap, SENT, "t.dlq", None), 1, "the dead letter");
    assert_eq!(
        samples(&snap, OPERATION_DURATION, "t", None),
        3,
        "3 publish calls"
    );
    assert_eq!(
        counter(&snap, CONSUMED, "t", Some("g")),
        6,
        "5 + 1 redelivery"
    );
    assert_eq!(counter(&snap, ACKED, "t", Some("g")), 4);
    assert_eq!(counter(&snap, NACKED, "t", Some("g")), 1);
    assert_eq!(counter(&snap, DEAD_LETTERED, "t", Some("g")), 1);
    assert_eq!(counter(&snap, CONSUMED, "r", Some("h")), 3);
    assert_eq!(counter(&snap, RETRIED, "r", Some("h")), 1);
    assert_eq!(counter(&snap, ACKED, "r", Some("h")), 3);
    assert_eq!(
        samples(&snap, PROCESS_DURATION, "r", Some("h")),
        4,
        "3 + 1 retry"
    );
    assert_eq!(
        gauge(&snap, CONSUMER_LAG, "t", "idle"),
        5.0,
        "read by lag()"
    );
    assert_eq!(
        gauge(&snap, CONSUMER_LAG, "r", "h"),
        0.0,
        "sampled by the runner"
    );
}
