//! lapin directly, doing what busbar's RabbitMQ backend does for one group: a durable direct
//! exchange, 4 quorum queues bound by partition (key hash), persistent mandatory publishes
//! with publisher confirms (up to `batch` outstanding), and one consumer per queue acking
//! every message (prefetch 256).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

const PARTITIONS: u32 = 4;

/// A lapin connection.
#[derive(Debug, Clone)]
pub struct RawAmqp {
    uri: String,
}

impl RawAmqp {
    /// Checks that `url` (busbar's `amqp://` URL; busbar options dropped) answers.
    pub async fn connect(url: &str) -> Result<Self> {
        let uri = url.split('?').next().unwrap_or(url).to_owned();
        let conn = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ")?;
        let _ = conn.close(200, ShortString::from("probe")).await;
        Ok(Self { uri })
    }

    /// The exchange and its partition queues, on a fresh connection.
    async fn declare(&self, topic: &str) -> Result<(Connection, String, Vec<String>)> {
        let conn = Connection::connect(&self.uri, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let exchange = format!("raw.{topic}");
        ch.exchange_declare(
            ShortString::from(exchange.as_str()),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        // Gone a minute after the run: quorum queues are not free on a small broker.
        args.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongLongInt(60_000),
        );
        let mut queues = Vec::new();
        for p in 0..PARTITIONS {
            let q = format!("raw.{topic}.{p}");
            ch.queue_declare(
                ShortString::from(q.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args.clone(),
            )
            .await?;
            ch.queue_bind(
                ShortString::from(q.as_str()),
                ShortString::from(exchange.as_str()),
                ShortString::from(p.to_string().as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            queues.push(q);
        }
        Ok((conn, exchange, queues))
    }

    async fn publish_on(
        conn: &Connection,
        exchange: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<()> {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut pending = Vec::with_capacity(batch);
        for i in 0..n {
            let key = format!("k{}", i % crate::KEYS);
            let p = busbar_core::raw::partition_for(&key, PARTITIONS);
            let confirm = ch
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(p.to_string().as_str()),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &payload(i),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            pending.push(confirm);
            if pending.len() >= batch {
                for c in pending.drain(..) {
                    c.await?;
                }
            }
        }
        for c in pending {
            c.await?;
        }
        Ok(())
    }

    /// `n` confirmed publishes, up to `batch` unconfirmed at a time; returns the time taken
    /// after the exchange and queues exist.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let (conn, exchange, _) = self.declare(topic).await?;
        let started = Instant::now();
        let result = Self::publish_on(&conn, &exchange, n, batch, payload).await;
        let elapsed = started.elapsed();
        let _ = conn.close(200, ShortString::from("done")).await;
        result.map(|()| elapsed)
    }

    /// One consumer per partition queue acking each message, against confirmed publishes
    /// 100 at a time.
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

    /// The consumers of [`RawAmqp::end_to_end`] against `n` messages sent at `pace`, each
    /// payload shown to `observe`.
    pub(crate) async fn run(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
        pace: crate::Pace,
        observe: crate::Observe,
    ) -> Result<Duration> {
        let (conn, exchange, queues) = self.declare(topic).await?;
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut readers = Vec::new();
        for q in &queues {
            let ch = conn.create_channel().await?;
            ch.basic_qos(256, BasicQosOptions::default()).await?;
            let mut consumer = ch
                .basic_consume(
                    ShortString::from(q.as_str()),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let (seen, done, observe) = (seen.clone(), done.clone(), observe.clone());
            readers.push(tokio::spawn(async move {
                while let Some(d) = consumer.next().await {
                    let d = d?;
                    observe(&d.data);
                    d.ack(BasicAckOptions::default()).await?;
                    if seen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= n {
                        done.notify_one();
                    }
                }
                Ok::<(), lapin::Error>(())
            }));
        }
        Self::publish_on(&conn, &exchange, 1, 1, payload).await?;
        crate::wait_seen(&seen, 1, crate::PROBE_LIMIT).await?;
        let started = Instant::now();
        crate::paced(n, pace, |count, batch| {
            Self::publish_on(&conn, &exchange, count, batch, payload)
        })
        .await?;
        tokio::time::timeout(Duration::from_secs(300), async {
            while seen.load(std::sync::atomic::Ordering::Acquire) < n + 1 {
                let _ = tokio::time::timeout(Duration::from_millis(50), done.notified()).await;
            }
        })
        .await
        .map_err(|_| anyhow!("not every message was consumed within 300 s"))?;
        let elapsed = started.elapsed();
        let _ = conn.close(200, ShortString::from("done")).await;
        for r in readers {
            r.abort();
        }
        Ok(elapsed)
    }
}
