//! The benchmark workloads, shared by the criterion benches (`cargo bench -p busbar-benches`),
//! `busbar bench [URL]` and `bench-report`.
//!
//! Every workload runs on a fresh topic, with 100-byte payloads, the consumer attached before
//! publishing and the same acking on every side: busbar (through the consumer runner), the
//! raw client doing the same work with its best settings, and a peer crate where it supports
//! the broker. Speed targets are reported, never asserted.
#![allow(clippy::print_stdout)]

mod raw;
mod raw_amqp;
mod raw_sqs;
pub mod report;
mod ruststream_peer;
mod watermill_peer;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use busbar::{Consumer, Event, EventBus, Message, PublishOptions, StartPosition, SubscribeOptions};
use serde::{Deserialize, Serialize};

pub mod outbox;

pub use raw::{OmniQueue, RawKafka, RawNats, RawRedis};
pub use raw_amqp::RawAmqp;
pub use raw_sqs::RawSqs;
pub use ruststream_peer::RustStreamPeer;
pub use watermill_peer::WatermillPeer;

/// The backends benchmarked: name, URL variable, default URL. A new backend adds a line.
pub const BACKENDS: &[(&str, &str, &str)] = &[
    ("memory", "BUSBAR_MEMORY_URL", "memory://"),
    ("redis", "BUSBAR_REDIS_URL", "redis://127.0.0.1:6379"),
    ("nats", "BUSBAR_NATS_URL", "nats://127.0.0.1:4222"),
    ("kafka", "BUSBAR_KAFKA_URL", "kafka://127.0.0.1:9092"),
    (
        "amqp",
        "BUSBAR_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f?partitions=4&queue_expires_ms=60000",
    ),
    (
        "sqs",
        "BUSBAR_SQS_URL",
        "sqs://test:test@127.0.0.1:4566?region=us-east-1&tls=false",
    ),
];

/// The URL in `var` (the first, where it lists a matrix of servers, newest first), or
/// `default`.
pub fn url_from_env(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| default.to_owned())
}

/// Payload size of every workload.
pub const PAYLOAD_BYTES: usize = 100;
/// Keys used by the end-to-end workload.
pub const KEYS: usize = 64;
/// Handler concurrency of the end-to-end workload.
pub const CONCURRENCY: usize = 16;

/// One side of a comparison.
#[derive(Debug, Clone)]
pub enum Subject {
    /// busbar on a backend.
    Busbar(Arc<dyn EventBus>),
    /// The redis crate directly (pipelined XADD, XREADGROUP + XACK).
    RawRedis(RawRedis),
    /// async-nats directly (JetStream async publish, pull consumer + ack).
    RawNats(RawNats),
    /// rdkafka directly (idempotent producer, stream consumer with auto-committed offsets).
    RawKafka(RawKafka),
    /// lapin directly (confirmed publishes to quorum partition queues, a consumer per queue).
    RawAmqp(RawAmqp),
    /// The AWS SDK directly (SNS FIFO publish batches, SQS long polls + batched deletes).
    RawSqs(RawSqs),
    /// The omniqueue crate (memory or Redis).
    Omni(OmniQueue),
    /// The ruststream framework (NATS, Redis, Kafka).
    RustStream(RustStreamPeer),
    /// The watermill library, in Go (Redis, NATS, Kafka, RabbitMQ).
    Watermill(WatermillPeer),
}

impl Subject {
    /// `busbar`, `raw`, `omniqueue` or `ruststream`.
    pub fn label(&self) -> &'static str {
        match self {
            Subject::Busbar(_) => "busbar",
            Subject::RawRedis(_)
            | Subject::RawNats(_)
            | Subject::RawKafka(_)
            | Subject::RawAmqp(_)
            | Subject::RawSqs(_) => "raw",
            Subject::Omni(_) => "omniqueue",
            Subject::RustStream(_) => "ruststream",
            Subject::Watermill(_) => "watermill",
        }
    }
}

/// The workloads, by name: each runs `n` messages and returns the measured time, `None` where
/// the subject has no such workload (see [`Subject::runs`]).
pub async fn run_workload(subject: &Subject, workload: &str, n: usize) -> Result<Option<Duration>> {
    match workload {
        "publish" => publish(subject, n, None).await.map(Some),
        "publish_batch100" => publish(subject, n, Some(100)).await.map(Some),
        "publish_concurrent16" => publish_concurrent(subject, n, 16).await,
        "e2e" => end_to_end(subject, n).await.map(Some),
        "e2e_batches100" => end_to_end_batches(subject, n, 100).await,
        other => anyhow::bail!("unknown workload {other}"),
    }
}

/// Every workload, in report order.
pub const WORKLOADS: [&str; 5] = [
    "publish",
    "publish_batch100",
    "publish_concurrent16",
    "e2e",
    "e2e_batches100",
];

impl Subject {
    /// Whether this side has `workload`: concurrent publishers are measured for busbar and
    /// watermill (the raw clients' and ruststream's single publishes are `publish`), the batch
    /// handler API is busbar's own.
    pub fn runs(&self, workload: &str) -> bool {
        match workload {
            "publish_concurrent16" => matches!(self, Subject::Busbar(_) | Subject::Watermill(_)),
            "e2e_batches100" => matches!(self, Subject::Busbar(_)),
            _ => true,
        }
    }
}

/// The subjects to compare for a broker URL: busbar, plus the raw client and peers that
/// support that broker.
pub async fn subjects_for(url: &str) -> Result<Vec<Subject>> {
    let bus = busbar::connect(&shared_memory_url(url))
        .await
        .with_context(|| format!("connecting busbar to {}", busbar_core::raw::redact_url(url)))?;
    let mut out = vec![Subject::Busbar(bus)];
    match url.split("://").next().unwrap_or_default() {
        "memory" => out.push(Subject::Omni(OmniQueue::memory())),
        "redis" | "rediss" => {
            out.push(Subject::RawRedis(RawRedis::connect(url).await?));
            out.push(Subject::Omni(OmniQueue::redis(url)));
            out.push(Subject::RustStream(RustStreamPeer::redis(url)));
        }
        "nats" => {
            let raw = RawNats::connect(url).await?;
            out.push(Subject::RawNats(raw.clone()));
            out.push(Subject::RustStream(RustStreamPeer::nats(raw, url)));
        }
        "tls" => out.push(Subject::RawNats(RawNats::connect(url).await?)),
        "kafka" => {
            let raw = RawKafka::connect(url).await?;
            out.push(Subject::RawKafka(raw.clone()));
            out.push(Subject::RustStream(RustStreamPeer::kafka(raw, url)));
        }
        "amqp" | "amqps" => out.push(Subject::RawAmqp(RawAmqp::connect(url).await?)),
        "sqs" => out.push(Subject::RawSqs(RawSqs::connect(url).await?)),
        _ => {}
    }
    match WatermillPeer::for_url(url) {
        Ok(peer) => out.push(Subject::Watermill(peer)),
        Err(e) if url.starts_with("memory") || url.starts_with("sqs") || url.starts_with("tls") => {
            let _ = e;
        }
        Err(e) => eprintln!(
            "no watermill side for {}: {e:#}",
            busbar_core::raw::redact_url(url)
        ),
    }
    Ok(out)
}

fn shared_memory_url(url: &str) -> String {
    match url.strip_prefix("memory://") {
        Some("") => format!("memory://bench-{}", uuid::Uuid::new_v4().simple()),
        _ => url.to_owned(),
    }
}

/// A fresh topic name for one run.
pub fn fresh_topic(workload: &str) -> String {
    format!(
        "bench-{workload}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The payload of message `i` ([`PAYLOAD_BYTES`] long).
pub fn payload_of(i: usize) -> Vec<u8> {
    payload(i)
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("{i:020}").into_bytes();
    p.resize(PAYLOAD_BYTES, b'x');
    p
}

fn message(i: usize) -> Message {
    Message::new(payload(i)).with_key(format!("k{}", i % KEYS))
}

/// Publishes `n` messages one at a time (`batch` = None) or in batches; returns the time.
pub async fn publish(subject: &Subject, n: usize, batch: Option<usize>) -> Result<Duration> {
    let topic = fresh_topic("publish");
    let bus = match subject {
        Subject::Busbar(bus) => run_bus(bus).await?,
        Subject::RawRedis(r) => return r.publish(&topic, n, batch.unwrap_or(1), payload).await,
        Subject::RawNats(r) => return r.publish(&topic, n, batch.unwrap_or(1), payload).await,
        Subject::RawKafka(r) => return r.publish(&topic, n, batch.unwrap_or(1), payload).await,
        Subject::RawAmqp(r) => return r.publish(&topic, n, batch.unwrap_or(1), payload).await,
        Subject::RawSqs(r) => return r.publish(&topic, n, batch.unwrap_or(1), payload).await,
        Subject::Omni(o) => return o.publish(&topic, n, batch, payload).await,
        Subject::RustStream(r) => return r.publish(&topic, n, batch, payload).await,
        Subject::Watermill(w) => {
            let workload = match batch {
                None => "publish".to_owned(),
                Some(b) => format!("publish_batch{b}"),
            };
            return w.run(&workload, n).await;
        }
    };
    // A group to receive (RabbitMQ refuses messages no group would keep); each side's setup
    // (topics, queues, groups) stays out of the timed region.
    bus.provision(&topic, &SubscribeOptions::new("bench"))
        .await?;
    let started = Instant::now();
    match batch {
        None => {
            for i in 0..n {
                bus.publish(&topic, message(i), &PublishOptions::default())
                    .await?;
            }
        }
        Some(b) => {
            for chunk in (0..n).collect::<Vec<_>>().chunks(b) {
                let msgs = chunk.iter().map(|i| message(*i)).collect();
                bus.publish_batch(&topic, msgs, &PublishOptions::default())
                    .await?;
            }
        }
    }
    Ok(started.elapsed())
}

/// The bus a busbar run uses: on the memory backend a fresh one per run (as the omniqueue
/// side gets a fresh in-memory queue per run: a bus that kept every earlier run's messages —
/// millions, retained — measured page faults and allocator growth, not the bus), the shared
/// connection otherwise.
async fn run_bus(bus: &Arc<dyn EventBus>) -> Result<Arc<dyn EventBus>> {
    if bus.backend() == "memory" {
        return Ok(busbar::connect("memory://").await?);
    }
    Ok(bus.clone())
}

/// Publishes `n` messages from `tasks` concurrent publishers, each awaiting its own publishes
/// one at a time (what a service handling concurrent requests does): publishes that do not
/// wait for each other may share broker round trips. busbar and watermill only (`Ok(None)`
/// for other sides: their single-publish APIs are measured by `publish`).
pub async fn publish_concurrent(
    subject: &Subject,
    n: usize,
    tasks: usize,
) -> Result<Option<Duration>> {
    let topic = fresh_topic("publish-concurrent");
    let bus = match subject {
        Subject::Busbar(bus) => bus.clone(),
        Subject::Watermill(w) => {
            return w
                .run(&format!("publish_concurrent{tasks}"), n)
                .await
                .map(Some)
        }
        _ => return Ok(None),
    };
    bus.provision(&topic, &SubscribeOptions::new("bench"))
        .await?;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (bus, topic) = (bus.clone(), topic.clone());
        set.spawn(async move {
            for i in (t..n).step_by(tasks) {
                bus.publish(&topic, message(i), &PublishOptions::default())
                    .await?;
            }
            Ok::<(), busbar::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("publisher task")??;
    }
    Ok(Some(started.elapsed()))
}

/// As [`end_to_end`], busbar only, through the batch handler API
/// ([`Consumer::run_batches_until`], batches of up to `max_batch`, concurrency 16, at most one
/// event per key per batch); `Ok(None)` for other sides.
pub async fn end_to_end_batches(
    subject: &Subject,
    n: usize,
    max_batch: usize,
) -> Result<Option<Duration>> {
    let Subject::Busbar(bus) = subject else {
        return Ok(None);
    };
    let bus = &run_bus(bus).await?;
    let topic = fresh_topic("e2e-batches");
    let consumer = busbar_consumer(bus, &topic);
    bus.provision(&topic, &consumer.subscribe_options()).await?;
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let (d, f) = (done.clone(), finished.clone());
    let run = tokio::spawn(consumer.run_batches_until(
        max_batch,
        move |events: Vec<Event>| {
            let (d, f) = (d.clone(), f.clone());
            async move {
                if d.fetch_add(events.len(), AtomicOrdering::AcqRel) + events.len() > n {
                    // Both waiters (the runner's shutdown and the clock) must wake.
                    f.notify_waiters();
                }
                events
                    .iter()
                    .map(|_| Ok::<(), std::convert::Infallible>(()))
                    .collect::<Vec<_>>()
            }
        },
        wait_all(done.clone(), finished.clone(), n + 1),
    ));
    let elapsed = publish_and_wait(bus, &topic, n, &done, &finished).await?;
    run.await??;
    Ok(Some(elapsed))
}

/// The consumer of the end-to-end workloads.
fn busbar_consumer(bus: &Arc<dyn EventBus>, topic: &str) -> Consumer {
    Consumer::new(bus.clone(), topic)
        .group("bench")
        .start(StartPosition::Latest)
        .concurrency(CONCURRENCY)
        .max_in_flight(1024)
}

/// The timed part of a busbar end-to-end run: a probe through first (untimed), then `n`
/// messages published in batches of 100, until the handlers saw them all.
async fn publish_and_wait(
    bus: &Arc<dyn EventBus>,
    topic: &str,
    n: usize,
    done: &Arc<AtomicUsize>,
    finished: &Arc<tokio::sync::Notify>,
) -> Result<Duration> {
    bus.publish(topic, message(0), &PublishOptions::default())
        .await?;
    wait_seen(done, 1, PROBE_LIMIT).await?;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let msgs = chunk.iter().map(|i| message(*i)).collect();
        bus.publish_batch(topic, msgs, &PublishOptions::default())
            .await?;
    }
    wait_all(done.clone(), finished.clone(), n + 1).await;
    Ok(started.elapsed())
}

/// Publishes `n` messages over 64 keys and consumes + acks all of them (busbar through the
/// consumer runner, concurrency 16, per-key order kept); returns the time from the first
/// publish to the last ack. Every side first gets one probe message through, untimed (see
/// `wait_seen`).
pub async fn end_to_end(subject: &Subject, n: usize) -> Result<Duration> {
    let topic = fresh_topic("e2e");
    match subject {
        Subject::Busbar(bus) => {
            let bus = &run_bus(bus).await?;
            let consumer = busbar_consumer(bus, &topic);
            bus.provision(&topic, &consumer.subscribe_options()).await?;
            let done = Arc::new(AtomicUsize::new(0));
            let finished = Arc::new(tokio::sync::Notify::new());
            let (d, f) = (done.clone(), finished.clone());
            let run = tokio::spawn(consumer.run_until(
                move |_e: Event| {
                    let (d, f) = (d.clone(), f.clone());
                    async move {
                        // n measured messages after the probe
                        if d.fetch_add(1, AtomicOrdering::AcqRel) >= n {
                            // Both waiters (the runner's shutdown and the clock) must wake:
                            // notify_one woke one of them, and the clock then stopped only at
                            // its next 50 ms poll.
                            f.notify_waiters();
                        }
                        Ok::<(), std::convert::Infallible>(())
                    }
                },
                wait_all(done.clone(), finished.clone(), n + 1),
            ));
            let elapsed = publish_and_wait(bus, &topic, n, &done, &finished).await?;
            run.await??;
            Ok(elapsed)
        }
        Subject::RawRedis(r) => r.end_to_end(&topic, n, payload).await,
        Subject::RawNats(r) => r.end_to_end(&topic, n, payload).await,
        Subject::RawKafka(r) => r.end_to_end(&topic, n, payload).await,
        Subject::RawAmqp(r) => r.end_to_end(&topic, n, payload).await,
        Subject::RawSqs(r) => r.end_to_end(&topic, n, payload).await,
        Subject::Omni(o) => o.end_to_end(&topic, n, payload).await,
        Subject::RustStream(r) => r.end_to_end(&topic, n, payload).await,
        Subject::Watermill(w) => w.run("e2e", n).await,
    }
}

/// Waits until `seen` reaches `at_least`, failing after `limit`. The end-to-end workloads
/// use it for their probe: one message published and consumed before the clock starts, so
/// every side's consumer is attached and fetching (a Kafka group joined, a RabbitMQ member
/// holding its queues, a long poll running) when the measured messages go out.
pub(crate) async fn wait_seen(seen: &AtomicUsize, at_least: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while seen.load(AtomicOrdering::Acquire) < at_least {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer did not get its first message within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// How long a probe may take to come through (a Kafka group join, say).
pub(crate) const PROBE_LIMIT: Duration = Duration::from_secs(120);

async fn wait_all(done: Arc<AtomicUsize>, finished: Arc<tokio::sync::Notify>, n: usize) {
    loop {
        let notified = finished.notified();
        if done.load(AtomicOrdering::Acquire) >= n {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Messages measured.
    pub count: u64,
}

/// Publishes `count` messages at `rate` per second (one at a time) and measures publish ->
/// handler time through busbar's consumer runner, in an HDR histogram (after an unmeasured probe).
pub async fn latency(bus: &Arc<dyn EventBus>, rate: u32, count: usize) -> Result<Latency> {
    let topic = fresh_topic("latency");
    let consumer = Consumer::new(bus.clone(), &topic)
        .group("bench")
        .start(StartPosition::Latest)
        .concurrency(CONCURRENCY);
    bus.provision(&topic, &SubscribeOptions::new("bench"))
        .await?;
    let hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .context("histogram bounds")?,
    ));
    let epoch = Instant::now();
    let seen = Arc::new(AtomicU64::new(0));
    let probed = Arc::new(AtomicUsize::new(0));
    let (h, s, pr) = (hist.clone(), seen.clone(), probed.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run_until(
        move |e: Event| {
            let (h, s, pr) = (h.clone(), s.clone(), pr.clone());
            async move {
                if e.payload().starts_with(b"probe") {
                    pr.fetch_add(1, AtomicOrdering::AcqRel);
                    return Ok(());
                }
                let sent: u64 = std::str::from_utf8(&e.payload()[..20])
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let now = epoch.elapsed().as_micros() as u64;
                if let Ok(mut h) = h.lock() {
                    let _ = h.record(now.saturating_sub(sent).max(1));
                }
                s.fetch_add(1, AtomicOrdering::AcqRel);
                Ok::<(), std::convert::Infallible>(())
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Not measured: a probe through first, so the consumer is attached (see `wait_seen`).
    bus.publish(&topic, Message::new("probe"), &PublishOptions::default())
        .await?;
    wait_seen(&probed, 1, PROBE_LIMIT).await?;
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut next = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(next).await;
        next += gap;
        let mut p = format!("{:020}", epoch.elapsed().as_micros()).into_bytes();
        p.resize(PAYLOAD_BYTES, b'x');
        let m = Message::new(p).with_key(format!("k{}", i % KEYS));
        bus.publish(&topic, m, &PublishOptions::default()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (seen.load(AtomicOrdering::Acquire) as usize) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    run.await??;
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    Ok(Latency {
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        count: h.len(),
    })
}

/// How a raw side's measured publishes go out: all in batches, or one at a time at a rate.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pace {
    /// `n` messages, this many per round trip.
    Batches(usize),
    /// One message at a time, this many per second.
    Rate(u32),
}

/// Called with the payload of every message a raw side's consumer receives.
pub(crate) type Observe = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// An [`Observe`] that looks at nothing (the throughput workloads).
pub(crate) fn ignore() -> Observe {
    Arc::new(|_| {})
}

/// Sends the measured part of a raw run: `publish(count, batch)` once for all `n` messages
/// in batches, or `n` times one message at the pace's rate.
pub(crate) async fn paced<F, Fut, T>(n: usize, pace: Pace, mut publish: F) -> Result<()>
where
    F: FnMut(usize, usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    match pace {
        Pace::Batches(batch) => publish(n, batch).await.map(|_| ()),
        Pace::Rate(rate) => {
            let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut next = tokio::time::Instant::now();
            for _ in 0..n {
                tokio::time::sleep_until(next).await;
                next += gap;
                publish(1, 1).await?;
            }
            Ok(())
        }
    }
}

/// Microseconds since the Unix epoch (the send time a latency payload carries; sender and
/// receiver share this machine's clock).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A latency payload: the send time ([`now_us`], 20 digits), padded to [`PAYLOAD_BYTES`].
fn stamped(_: usize) -> Vec<u8> {
    let mut p = format!("{:020}", now_us()).into_bytes();
    p.resize(PAYLOAD_BYTES, b'x');
    p
}

/// The raw client's publish-to-consumer latency at `rate` msgs/s, one message at a time
/// (after an unmeasured probe), like [`latency`] measures busbar's through the runner;
/// `Ok(None)` for sides that are not a raw client.
pub async fn raw_latency(subject: &Subject, rate: u32, count: usize) -> Result<Option<Latency>> {
    let topic = fresh_topic("latency");
    let hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .context("histogram bounds")?,
    ));
    let probe_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = hist.clone();
    let observe: Observe = Arc::new(move |payload: &[u8]| {
        // The first message a run receives is its probe, sent before the measured part.
        if !probe_seen.swap(true, AtomicOrdering::AcqRel) {
            return;
        }
        let sent: u64 = std::str::from_utf8(&payload[..20.min(payload.len())])
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        if let Ok(mut h) = h.lock() {
            let _ = h.record(now_us().saturating_sub(sent).max(1));
        }
    });
    let pace = Pace::Rate(rate);
    match subject {
        Subject::RawRedis(r) => r.run(&topic, count, stamped, pace, observe).await?,
        Subject::RawNats(r) => r.run(&topic, count, stamped, pace, observe).await?,
        Subject::RawKafka(r) => r.run(&topic, count, stamped, pace, observe).await?,
        Subject::RawAmqp(r) => r.run(&topic, count, stamped, pace, observe).await?,
        Subject::RawSqs(r) => r.run(&topic, count, stamped, pace, observe).await?,
        _ => return Ok(None),
    };
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    Ok(Some(Latency {
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        count: h.len(),
    }))
}

/// Messages per second.
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}
