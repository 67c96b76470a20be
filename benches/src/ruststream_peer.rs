//! The `ruststream` peer (0.7): its NATS JetStream, Redis Streams (fred) and Kafka (rdkafka)
//! brokers, used as a service built with it would use them.
//!
//! ruststream is an application framework: a handler is an `#[subscriber]` function mounted on a
//! broker of an app, and the app is started and shut down as a whole. Each run here builds such
//! an app for its fresh topic: the handler counts and acks, it runs on 16 lanes keyed by the
//! message's partition key (`workers(16, by_key)`: per-key order, like busbar's runner), and
//! the messages go out through the app's own publisher with the key in ruststream's partition
//! key header. A handler's source is fixed by its attribute, so the topic of the run is read
//! from [`ROUTE`] when the app is built; runs are serialized by [`RUN`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use futures::future::try_join_all;
use ruststream::prelude::{AppInfo, Broker as _, HandlerOutcome, RunningApp, RustStream};
use ruststream::{BytesMut, HeaderMap, OutgoingMessage, Publisher as _};
use ruststream_fred::RedisStream;
use ruststream_nats::{DeliverPolicy, JetStreamSubject};
use ruststream_rdkafka::{Commit, KafkaTopic, StartOffset};

use crate::{wait_seen, RawKafka, RawNats, CONCURRENCY, KEYS, PROBE_LIMIT};

/// The topic (NATS: subject and stream) the handlers of the current run read.
static ROUTE: Mutex<(String, String)> = Mutex::new((String::new(), String::new()));
/// Messages the handlers of the current run have handled.
static HANDLED: AtomicUsize = AtomicUsize::new(0);
/// One run at a time: [`ROUTE`] and [`HANDLED`] belong to it.
static RUN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The consumer group (Redis, Kafka) or durable consumer (NATS) of every run.
const GROUP: &str = "bench";

fn route() -> (String, String) {
    ROUTE.lock().map(|r| r.clone()).unwrap_or_default()
}

fn handled() {
    HANDLED.fetch_add(1, AtomicOrdering::AcqRel);
}

/// A message body: payload bytes, left undecoded.
#[derive(ruststream::prelude::Deserialized)]
struct Body<'a>(#[allow(dead_code)] &'a [u8]);

#[ruststream::prelude::subscriber(
    JetStreamSubject::new(route().0, route().1).durable(GROUP).deliver_policy(DeliverPolicy::All),
    workers(CONCURRENCY, by_key)
)]
async fn on_nats(_body: &Body<'_>) -> HandlerOutcome {
    handled();
    HandlerOutcome::ack()
}

#[ruststream::prelude::subscriber(
    RedisStream::new(route().0).group(GROUP),
    workers(CONCURRENCY, by_key)
)]
async fn on_redis(_body: &Body<'_>) -> HandlerOutcome {
    handled();
    HandlerOutcome::ack()
}

#[ruststream::prelude::subscriber(
    KafkaTopic::new(route().0).group(GROUP).start(StartOffset::Earliest).commit(Commit::Tracked),
    workers(CONCURRENCY, by_key)
)]
async fn on_kafka(_body: &Body<'_>) -> HandlerOutcome {
    handled();
    HandlerOutcome::ack()
}

/// Starts an app on `$broker` (with `$handler` mounted when `$consume`) and pairs a publisher
/// of policy `$publish`: `(RunningApp, publisher)`. A macro, since every broker's types differ.
macro_rules! start_app {
    ($broker:expr, $publish:expr, $handler:ident, $consume:expr) => {{
        let broker = $broker.bindable();
        let egress = broker.bind($publish);
        let app = RustStream::new(AppInfo::new("busbar-bench", env!("CARGO_PKG_VERSION")))
            .with_broker(broker, |b| {
                if $consume {
                    b.include($handler);
                }
            });
        let running = app.start().await.context("starting the ruststream app")?;
        let publisher = running.publisher(egress).await?;
        (running, publisher)
    }};
}

/// ruststream on one broker.
#[derive(Debug, Clone)]
pub enum RustStreamPeer {
    /// ruststream-nats (async-nats 0.50): JetStream pull consumer, stream-acknowledged publishes.
    Nats(RawNats, String),
    /// ruststream-fred (fred 10): a stream read through a consumer group, XADD publishes.
    Redis(String),
    /// ruststream-rdkafka (rdkafka 0.39): tracked commits, idempotent producer.
    Kafka(RawKafka, String),
}

impl RustStreamPeer {
    /// NATS at `url` (`nats://host:port`); `setup` creates the run's stream.
    pub fn nats(setup: RawNats, url: &str) -> Self {
        RustStreamPeer::Nats(setup, format!("nats://{}", authority(url)))
    }

    /// Redis at `url` (`redis://host:port`).
    pub fn redis(url: &str) -> Self {
        RustStreamPeer::Redis(url.split('?').next().unwrap_or(url).to_owned())
    }

    /// Kafka at `url` (`kafka://host:port`); `setup` creates the run's topic.
    pub fn kafka(setup: RawKafka, url: &str) -> Self {
        RustStreamPeer::Kafka(setup, authority(url).to_owned())
    }

    /// Publishes `n` messages one at a time (`batch` = None) or `batch` at once, each awaited
    /// until the broker has it; returns the time after the app started.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: Option<usize>,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let _run = RUN.lock().await;
        let (running, sender) = self.start(topic, false).await?;
        let started = Instant::now();
        sender.send(0..n, batch.unwrap_or(1), payload).await?;
        let elapsed = started.elapsed();
        stop(running).await?;
        Ok(elapsed)
    }

    /// Publishes `n` messages over 64 keys in rounds of 100 concurrent publishes while the
    /// app's handler consumes and acks them; returns the time from the first publish to the
    /// last handled message (after an untimed probe).
    pub async fn end_to_end(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let _run = RUN.lock().await;
        let (running, sender) = self.start(topic, true).await?;
        sender.send(0..1, 1, payload).await?;
        wait_seen(&HANDLED, 1, PROBE_LIMIT).await?;
        let started = Instant::now();
        sender.send(0..n, 100, payload).await?;
        let deadline = Instant::now() + PROBE_LIMIT;
        while HANDLED.load(AtomicOrdering::Acquire) < n + 1 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "ruststream handled {} of {} messages",
                HANDLED.load(AtomicOrdering::Acquire).saturating_sub(1),
                n
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = started.elapsed();
        stop(running).await?;
        Ok(elapsed)
    }

    /// Creates the run's topic (untimed setup), builds the app (with the handler when
    /// `consume`) and starts it.
    async fn start(&self, topic: &str, consume: bool) -> Result<(RunningApp, Sender)> {
        HANDLED.store(0, AtomicOrdering::Release);
        match self {
            RustStreamPeer::Nats(setup, url) => {
                let (_, subject) = setup.stream(topic).await?;
                set_route(&subject, &crate::raw::nats_stream_name(topic))?;
                let broker = ruststream_nats::NatsBroker::new(url);
                let publish = ruststream_nats::JetStreamPublish::default();
                let (running, p) = start_app!(broker, publish, on_nats, consume);
                Ok((running, Sender::new(subject, Publisher::Nats(Box::new(p)))))
            }
            RustStreamPeer::Redis(url) => {
                set_route(topic, "")?;
                let broker = ruststream_fred::RedisBroker::standalone(url);
                let publish = ruststream_fred::RedisPublish;
                let (running, p) = start_app!(broker, publish, on_redis, consume);
                Ok((running, Sender::new(topic.into(), Publisher::Redis(p))))
            }
            RustStreamPeer::Kafka(setup, servers) => {
                setup.create_topic(topic).await?;
                set_route(topic, "")?;
                // The durability busbar's and the raw producer have.
                let broker = ruststream_rdkafka::KafkaBroker::new([servers.as_str()])
                    .producer_config("enable.idempotence", "true")
                    .producer_config("acks", "all")
                    .producer_config("linger.ms", "0")
                    .config("enable.metrics.push", "false");
                let publish = ruststream_rdkafka::KafkaPublish::default();
                let (running, p) = start_app!(broker, publish, on_kafka, consume);
                Ok((running, Sender::new(topic.into(), Publisher::Kafka(p))))
            }
        }
    }
}

/// `host:port` (with any credentials) of a broker URL: no scheme, no query.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('?').next().unwrap_or(rest)
}

fn set_route(topic: &str, stream: &str) -> Result<()> {
    let mut r = ROUTE.lock().map_err(|_| anyhow!("route lock poisoned"))?;
    *r = (topic.to_owned(), stream.to_owned());
    Ok(())
}

/// A started app's publisher and where it publishes.
struct Sender {
    topic: String,
    publisher: Publisher,
}

enum Publisher {
    Nats(Box<ruststream_nats::JetStreamPublisher>),
    Redis(ruststream_fred::RedisPublisher),
    Kafka(ruststream_rdkafka::KafkaPublisher),
}

fn keyed(header: &str, i: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header, format!("k{}", i % KEYS));
    headers
}

impl Sender {
    fn new(topic: String, publisher: Publisher) -> Self {
        Self { topic, publisher }
    }

    /// Publishes messages `range`, `batch` concurrent publishes at a time.
    async fn send(
        &self,
        range: std::ops::Range<usize>,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<()> {
        let topic = self.topic.as_str();
        match &self.publisher {
            Publisher::Nats(p) => {
                in_rounds(range, batch, |i| async move {
                    let message =
                        OutgoingMessage::with_payload(topic, BytesMut::from(&payload(i)[..]))
                            .with_headers(keyed(ruststream_nats::PARTITION_KEY_HEADER, i));
                    p.publish(message, None).await.map_err(|e| anyhow!("{e}"))
                })
                .await
            }
            Publisher::Redis(p) => {
                in_rounds(range, batch, |i| async move {
                    let message =
                        OutgoingMessage::with_payload(topic, BytesMut::from(&payload(i)[..]))
                            .with_headers(keyed(ruststream_fred::PARTITION_KEY_HEADER, i));
                    p.publish(message, None).await.map_err(|e| anyhow!("{e}"))
                })
                .await
            }
            Publisher::Kafka(p) => {
                in_rounds(range, batch, |i| async move {
                    let body = payload(i);
                    let message = OutgoingMessage::with_payload(topic, &body[..])
                        .with_headers(keyed(ruststream_rdkafka::PARTITION_KEY_HEADER, i));
                    p.publish(message, None).await.map_err(|e| anyhow!("{e}"))
                })
                .await
            }
        }
    }
}

async fn stop(running: RunningApp) -> Result<()> {
    running
        .shutdown()
        .await
        .context("shutting the ruststream app down")
}

/// Runs `one(i)` for every `i` of `range`, `batch` at a time concurrently.
async fn in_rounds<F, Fut>(range: std::ops::Range<usize>, batch: usize, one: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut start = range.start;
    while start < range.end {
        let end = (start + batch.max(1)).min(range.end);
        try_join_all((start..end).map(&one)).await?;
        start = end;
    }
    Ok(())
}
