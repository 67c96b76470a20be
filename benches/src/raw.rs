//! The baselines: the raw clients with their best settings, and the omniqueue peer crate.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use omniqueue::QueueProducer;

/// The redis crate directly, on a stream of its own.
#[derive(Debug, Clone)]
pub struct RawRedis {
    client: redis::Client,
    conn: redis::aio::MultiplexedConnection,
}

impl RawRedis {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self> {
        let base = url.split('?').next().unwrap_or(url);
        let client = redis::Client::open(base)?;
        let conn = client.get_multiplexed_async_connection().await?;
        Ok(Self { client, conn })
    }

    /// Pipelined XADD of `n` entries, `batch` per round trip; returns the time taken.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let key = format!("raw:{topic}");
        let mut conn = self.conn.clone();
        let mut i = 0;
        while i < n {
            let mut pipe = redis::pipe();
            for j in i..(i + batch).min(n) {
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(1_000_000)
                    .arg("*")
                    .arg("k")
                    .arg(format!("k{}", j % crate::KEYS))
                    .arg("d")
                    .arg(payload(j))
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            i += batch;
        }
        Ok(started.elapsed())
    }

    /// XREADGROUP (COUNT 100) + one XACK per read, against pipelined XADD in batches of 100.
    pub async fn end_to_end(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        self.run(
            topic,
            n,
            payload,
            crate::Pace::Batches(100),
            crate::ignore(),
        )
        .await
    }

    /// The consumer of [`RawRedis::end_to_end`] against `n` messages sent at `pace`, each
    /// payload shown to `observe`; the time from the first measured publish to the last ack.
    pub(crate) async fn run(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
        pace: crate::Pace,
        observe: crate::Observe,
    ) -> Result<Duration> {
        let key = format!("raw:{topic}");
        let mut conn = self.conn.clone();
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await?;
        let mut reader = self.client.get_multiplexed_async_connection().await?;
        let k = key.clone();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let consumer = tokio::spawn(async move {
            while s.load(AtomicOrdering::Acquire) < n + 1 {
                let reply: redis::Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&k)
                    .arg(">")
                    .query_async(&mut reader)
                    .await?;
                let entries = stream_entries(reply);
                if entries.is_empty() {
                    continue;
                }
                for (_, d) in &entries {
                    observe(d);
                }
                let ids: Vec<&String> = entries.iter().map(|(id, _)| id).collect();
                redis::cmd("XACK")
                    .arg(&k)
                    .arg("g")
                    .arg(&ids)
                    .query_async::<i64>(&mut reader)
                    .await?;
                s.fetch_add(ids.len(), AtomicOrdering::AcqRel);
            }
            Ok::<(), redis::RedisError>(())
        });
        self.publish(topic, 1, 1, payload).await?;
        crate::wait_seen(&seen, 1, crate::PROBE_LIMIT).await?;
        let started = Instant::now();
        crate::paced(n, pace, |count, batch| {
            self.publish(topic, count, batch, payload)
        })
        .await?;
        consumer.await??;
        Ok(started.elapsed())
    }
}

/// The entries of an XREADGROUP reply: id and the `d` field (the payload).
fn stream_entries(v: redis::Value) -> Vec<(String, Vec<u8>)> {
    use redis::Value::{Array, BulkString};
    let mut out = Vec::new();
    let Array(streams) = v else {
        return out;
    };
    for s in streams {
        let Array(mut parts) = s else { continue };
        let Some(Array(entries)) = parts.pop() else {
            continue;
        };
        for e in entries {
            let Array(f) = e else { continue };
            let mut f = f.into_iter();
            let (Some(BulkString(id)), Some(Array(fields))) = (f.next(), f.next()) else {
                continue;
            };
            let mut payload = Vec::new();
            let mut fields = fields.into_iter();
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                if let (BulkString(name), BulkString(value)) = (name, value) {
                    if name == b"d" {
                        payload = value;
                    }
                }
            }
            out.push((String::from_utf8_lossy(&id).into_owned(), payload));
        }
    }
    out
}

/// async-nats directly, on a stream of its own.
#[derive(Debug, Clone)]
pub struct RawNats {
    js: async_nats::jetstream::Context,
}

/// The JetStream stream the raw NATS baseline (and the ruststream peer) use for `topic`.
pub(crate) fn nats_stream_name(topic: &str) -> String {
    format!("RAW_{}", busbar::nats::encode_topic(topic))
}

impl RawNats {
    /// Connects to `url` (`nats://host:port`).
    pub async fn connect(url: &str) -> Result<Self> {
        let addr = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('?').next())
            .ok_or_else(|| anyhow!("bad NATS URL"))?;
        let client = async_nats::connect(addr).await?;
        Ok(Self {
            js: async_nats::jetstream::new(client),
        })
    }

    pub(crate) async fn stream(
        &self,
        topic: &str,
    ) -> Result<(async_nats::jetstream::stream::Stream, String)> {
        let name = nats_stream_name(topic);
        let subject = format!("raw.{}", busbar::nats::encode_topic(topic));
        let stream = self
            .js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name,
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("creating the stream: {e}"))?;
        Ok((stream, subject))
    }

    /// JetStream publish with up to `batch` acks outstanding; returns the time taken after
    /// the stream exists.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let (_, subject) = self.stream(topic).await?;
        let started = Instant::now();
        self.publish_on(&subject, n, batch, payload).await?;
        Ok(started.elapsed())
    }

    async fn publish_on(
        &self,
        subject: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<()> {
        let mut pending = Vec::with_capacity(batch);
        for i in 0..n {
            pending.push(
                self.js
                    .publish(subject.to_owned(), payload(i).into())
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?,
            );
            if pending.len() >= batch {
                for a in pending.drain(..) {
                    a.await.map_err(|e| anyhow!("publish ack: {e}"))?;
                }
            }
        }
        for a in pending {
            a.await.map_err(|e| anyhow!("publish ack: {e}"))?;
        }
        Ok(())
    }

    /// A durable pull consumer acking every message, against batches of 100 async publishes.
    pub async fn end_to_end(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        self.run(
            topic,
            n,
            payload,
            crate::Pace::Batches(100),
            crate::ignore(),
        )
        .await
    }

    /// The consumer of [`RawNats::end_to_end`] against `n` messages sent at `pace`, each
    /// payload shown to `observe`.
    pub(crate) async fn run(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
        pace: crate::Pace,
        observe: crate::Observe,
    ) -> Result<Duration> {
        let (stream, subject) = self.stream(topic).await?;
        let consumer = stream
            .get_or_create_consumer::<async_nats::jetstream::consumer::pull::Config>(
                "raw",
                async_nats::jetstream::consumer::pull::Config {
                    durable_name: Some("raw".into()),
                    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow!("consumer: {e}"))?;
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let reader = tokio::spawn(async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(500)
                .messages()
                .await
                .map_err(|e| anyhow!("pull: {e}"))?;
            while s.load(AtomicOrdering::Acquire) < n + 1 {
                let m = messages
                    .next()
                    .await
                    .ok_or_else(|| anyhow!("pull ended"))?
                    .map_err(|e| anyhow!("pull: {e}"))?;
                observe(&m.payload);
                m.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
                s.fetch_add(1, AtomicOrdering::AcqRel);
            }
            Ok::<(), anyhow::Error>(())
        });
        self.publish_on(&subject, 1, 1, payload).await?;
        crate::wait_seen(&seen, 1, crate::PROBE_LIMIT).await?;
        let started = Instant::now();
        crate::paced(n, pace, |count, batch| {
            self.publish_on(&subject, count, batch, payload)
        })
        .await?;
        reader.await??;
        Ok(started.elapsed())
    }
}

/// rdkafka directly: a `FutureProducer` with the same durability as busbar's (idempotent,
/// acks=all) and a `StreamConsumer` that stores offsets per message and auto-commits them —
/// the usual raw setup, which commits past unfinished messages when handlers run out of order.
#[derive(Clone)]
pub struct RawKafka {
    servers: String,
    producer: rdkafka::producer::FutureProducer,
}

impl std::fmt::Debug for RawKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKafka")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl RawKafka {
    /// Connects to `url` (`kafka://host:port`).
    pub async fn connect(url: &str) -> Result<Self> {
        let servers = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('?').next())
            .ok_or_else(|| anyhow!("bad Kafka URL"))?
            .to_owned();
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("enable.metrics.push", "false")
            .create()?;
        Ok(Self { servers, producer })
    }

    pub(crate) async fn create_topic(&self, topic: &str) -> Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &self.servers)
                .create()?;
        admin
            .create_topics(
                [&NewTopic::new(topic, 8, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await?;
        Ok(())
    }

    /// Keyed sends with up to `batch` deliveries outstanding; returns the time taken after
    /// the topic exists.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        self.create_topic(topic).await?;
        let started = Instant::now();
        self.publish_on(topic, n, batch, payload).await?;
        Ok(started.elapsed())
    }

    async fn publish_on(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<()> {
        use rdkafka::producer::FutureRecord;
        let mut pending = Vec::with_capacity(batch);
        for i in 0..n {
            let (key, body) = (format!("k{}", i % crate::KEYS), payload(i));
            let record = FutureRecord::to(topic).key(&key).payload(&body);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| anyhow!("send: {e}"))?;
            pending.push(delivery);
            if pending.len() >= batch {
                for d in pending.drain(..) {
                    d.await?.map_err(|(e, _)| anyhow!("delivery: {e}"))?;
                }
            }
        }
        for d in pending {
            d.await?.map_err(|(e, _)| anyhow!("delivery: {e}"))?;
        }
        Ok(())
    }

    /// A group consumer storing each offset after handling, auto-committed, against batches
    /// of 100 sends.
    pub async fn end_to_end(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        self.run(
            topic,
            n,
            payload,
            crate::Pace::Batches(100),
            crate::ignore(),
        )
        .await
    }

    /// The consumer of [`RawKafka::end_to_end`] against `n` messages sent at `pace`, each
    /// payload shown to `observe`.
    pub(crate) async fn run(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
        pace: crate::Pace,
        observe: crate::Observe,
    ) -> Result<Duration> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::Message as _;
        self.create_topic(topic).await?;
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", "raw")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.metrics.push", "false")
            .create()?;
        consumer.subscribe(&[topic])?;
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let reader = tokio::spawn(async move {
            while s.load(AtomicOrdering::Acquire) < n + 1 {
                let m = consumer.recv().await?;
                observe(m.payload().unwrap_or_default());
                consumer.store_offset_from_message(&m)?;
                s.fetch_add(1, AtomicOrdering::AcqRel);
            }
            // Dropping a consumer can block inside librdkafka: do it off the runtime.
            tokio::task::spawn_blocking(move || drop(consumer));
            Ok::<(), anyhow::Error>(())
        });
        self.publish_on(topic, 1, 1, payload).await?;
        crate::wait_seen(&seen, 1, crate::PROBE_LIMIT).await?;
        let started = Instant::now();
        crate::paced(n, pace, |count, batch| {
            self.publish_on(topic, count, batch, payload)
        })
        .await?;
        reader.await??;
        Ok(started.elapsed())
    }
}

/// The omniqueue peer crate.
#[derive(Debug, Clone)]
pub enum OmniQueue {
    /// Its in-memory backend.
    Memory,
    /// Its Redis Streams backend.
    Redis(String),
}

type Pair = (omniqueue::DynProducer, omniqueue::DynConsumer);

impl OmniQueue {
    /// The in-memory backend.
    pub fn memory() -> Self {
        OmniQueue::Memory
    }

    /// The Redis backend on `url`.
    pub fn redis(url: &str) -> Self {
        OmniQueue::Redis(url.split('?').next().unwrap_or(url).to_owned())
    }

    async fn pair(&self, topic: &str) -> Result<Pair> {
        match self {
            OmniQueue::Memory => omniqueue::backends::InMemoryBackend::builder()
                .make_dynamic()
                .build_pair()
                .await
                .context("omniqueue memory"),
            OmniQueue::Redis(dsn) => {
                // omniqueue reads with XREADGROUP but leaves creating the group to the user.
                let mut conn = redis::Client::open(dsn.as_str())?
                    .get_multiplexed_async_connection()
                    .await?;
                let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(format!("omni:{topic}"))
                    .arg("bench")
                    .arg("$")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = created {
                    anyhow::ensure!(
                        e.code() == Some("BUSYGROUP"),
                        "creating omniqueue's group: {e}"
                    );
                }
                let cfg = omniqueue::backends::RedisConfig {
                    dsn: dsn.clone(),
                    max_connections: 8,
                    reinsert_on_nack: false,
                    queue_key: format!("omni:{topic}"),
                    delayed_queue_key: format!("omni:{topic}:delayed"),
                    delayed_lock_key: format!("omni:{topic}:lock"),
                    consumer_group: "bench".into(),
                    consumer_name: "c1".into(),
                    payload_key: "payload".into(),
                    ack_deadline_ms: 30_000,
                    dlq_config: None,
                    sentinel_config: None,
                };
                omniqueue::backends::RedisBackend::builder(cfg)
                    .make_dynamic()
                    .build_pair()
                    .await
                    .context("omniqueue redis")
            }
        }
    }

    /// `send_raw` one at a time, or `send_raw_batch` in batches; returns the time taken
    /// after the producer exists.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: Option<usize>,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let (producer, _consumer) = self.pair(topic).await?;
        let started = Instant::now();
        send(&producer, n, batch, payload).await?;
        Ok(started.elapsed())
    }

    /// A consumer receiving and acking every message, against batches of 100.
    pub async fn end_to_end(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let (producer, mut consumer) = self.pair(topic).await?;
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let reader = tokio::spawn(async move {
            while s.load(AtomicOrdering::Acquire) < n + 1 {
                let d = consumer
                    .receive()
                    .await
                    .map_err(|e| anyhow!("receive: {e}"))?;
                d.ack().await.map_err(|(e, _)| anyhow!("ack: {e}"))?;
                s.fetch_add(1, AtomicOrdering::AcqRel);
            }
            Ok::<(), anyhow::Error>(())
        });
        send(&producer, 1, None, payload).await?;
        crate::wait_seen(&seen, 1, crate::PROBE_LIMIT).await?;
        let started = Instant::now();
        send(&producer, n, Some(100), payload).await?;
        reader.await??;
        Ok(started.elapsed())
    }
}

async fn send(
    producer: &omniqueue::DynProducer,
    n: usize,
    batch: Option<usize>,
    payload: fn(usize) -> Vec<u8>,
) -> Result<()> {
    match batch {
        None => {
            for i in 0..n {
                producer
                    .send_raw(&payload(i))
                    .await
                    .map_err(|e| anyhow!("send: {e}"))?;
            }
        }
        Some(b) => {
            for chunk in (0..n).collect::<Vec<_>>().chunks(b) {
                let msgs: Vec<Vec<u8>> = chunk.iter().map(|i| payload(*i)).collect();
                producer
                    .send_raw_batch(msgs.iter())
                    .await
                    .map_err(|e| anyhow!("send batch: {e}"))?;
            }
        }
    }
    Ok(())
}
