//! The AWS SDK directly, doing what busbar's SQS backend does in FIFO mode: an SNS FIFO topic
//! fanning out (raw delivery) to an SQS FIFO queue, `MessageGroupId` = key, publishes in
//! `PublishBatch` calls of 10, and two long-polling receivers deleting what they got in one
//! `DeleteMessageBatch` per receive.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};

/// The raw SNS + SQS clients.
#[derive(Debug, Clone)]
pub struct RawSqs {
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
}

impl RawSqs {
    /// Builds the clients for a busbar `sqs://` URL (endpoint, region, static credentials).
    pub async fn connect(url: &str) -> Result<Self> {
        // The same SDK settings as busbar's (endpoint, region, credentials, time-outs).
        let sdk = busbar::sqs::sdk_config(&busbar::sqs::SqsConfig::from_url(url)?).await?;
        Ok(Self {
            sns: aws_sdk_sns::Client::new(&sdk),
            sqs: aws_sdk_sqs::Client::new(&sdk),
        })
    }

    /// A FIFO topic with one FIFO queue subscribed; returns (topic ARN, queue URL).
    async fn topic_and_queue(&self, topic: &str) -> Result<(String, String)> {
        let arn = self
            .sns
            .create_topic()
            .name(format!("raw-{topic}.fifo"))
            .attributes("FifoTopic", "true")
            .send()
            .await
            .context("CreateTopic")?
            .topic_arn
            .ok_or_else(|| anyhow!("no topic ARN"))?;
        let url = self
            .sqs
            .create_queue()
            .queue_name(format!("raw-{topic}.fifo"))
            .attributes(QueueAttributeName::FifoQueue, "true")
            .send()
            .await
            .context("CreateQueue")?
            .queue_url
            .ok_or_else(|| anyhow!("no queue URL"))?;
        let queue_arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .context("GetQueueAttributes")?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .ok_or_else(|| anyhow!("no queue ARN"))?;
        self.sns
            .subscribe()
            .topic_arn(&arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .context("Subscribe")?;
        Ok((arn, url))
    }

    /// `n` keyed messages: one `Publish` each (`batch` = 1) or `PublishBatch` calls of 10;
    /// returns the time taken after the topic and queue exist.
    pub async fn publish(
        &self,
        topic: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        let (arn, _) = self.topic_and_queue(topic).await?;
        let started = Instant::now();
        self.publish_on(&arn, n, batch, payload).await?;
        Ok(started.elapsed())
    }

    async fn publish_on(
        &self,
        arn: &str,
        n: usize,
        batch: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<()> {
        let body = |i: usize| String::from_utf8_lossy(&payload(i)).into_owned();
        if batch <= 1 {
            for i in 0..n {
                self.sns
                    .publish()
                    .topic_arn(arn)
                    .message(body(i))
                    .message_group_id(format!("k{}", i % crate::KEYS))
                    .message_deduplication_id(uuid::Uuid::new_v4().to_string())
                    .send()
                    .await
                    .context("Publish")?;
            }
            return Ok(());
        }
        for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(j, i)| {
                    PublishBatchRequestEntry::builder()
                        .id(j.to_string())
                        .message(body(*i))
                        .message_group_id(format!("k{}", i % crate::KEYS))
                        .message_deduplication_id(uuid::Uuid::new_v4().to_string())
                        .build()
                        .map_err(|e| anyhow!("entry: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let out = self
                .sns
                .publish_batch()
                .topic_arn(arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await
                .context("PublishBatch")?;
            if !out.failed.unwrap_or_default().is_empty() {
                return Err(anyhow!("PublishBatch entries failed"));
            }
        }
        Ok(())
    }

    /// Two long-polling receivers delete what they receive, while `n` messages are published
    /// in batches; returns the time from the first publish to the last delete.
    pub async fn end_to_end(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
    ) -> Result<Duration> {
        self.run(topic, n, payload, crate::Pace::Batches(10), crate::ignore())
            .await
    }

    /// The receivers of [`RawSqs::end_to_end`] against `n` messages sent at `pace`, each
    /// payload shown to `observe`.
    pub(crate) async fn run(
        &self,
        topic: &str,
        n: usize,
        payload: fn(usize) -> Vec<u8>,
        pace: crate::Pace,
        observe: crate::Observe,
    ) -> Result<Duration> {
        let (arn, url) = self.topic_and_queue(topic).await?;
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (sqs, url, seen, observe) =
                    (self.sqs.clone(), url.clone(), seen.clone(), observe.clone());
                tokio::spawn(async move {
                    use std::sync::atomic::Ordering;
                    while seen.load(Ordering::Acquire) < n + 1 {
                        let got = sqs
                            .receive_message()
                            .queue_url(&url)
                            .max_number_of_messages(10)
                            .wait_time_seconds(1)
                            .send()
                            .await
                            .context("ReceiveMessage")?
                            .messages
                            .unwrap_or_default();
                        if got.is_empty() {
                            continue;
                        }
                        for m in &got {
                            observe(m.body.as_deref().unwrap_or_default().as_bytes());
                        }
                        let entries = got
                            .iter()
                            .enumerate()
                            .filter_map(|(i, m)| {
                                DeleteMessageBatchRequestEntry::builder()
                                    .id(i.to_string())
                                    .set_receipt_handle(m.receipt_handle.clone())
                                    .build()
                                    .ok()
                            })
                            .collect();
                        sqs.delete_message_batch()
                            .queue_url(&url)
                            .set_entries(Some(entries))
                            .send()
                            .await
                            .context("DeleteMessageBatch")?;
                        seen.fetch_add(got.len(), Ordering::AcqRel);
                    }
                    Ok::<(), anyhow::Error>(())
                })
            })
            .collect();
        self.publish_on(&arn, 1, 1, payload).await?;
        crate::wait_seen(&seen, 1, crate::PROBE_LIMIT).await?;
        let started = Instant::now();
        crate::paced(n, pace, |count, batch| {
            self.publish_on(&arn, count, batch, payload)
        })
        .await?;
        // The clock stops at the last delete, not when the other receiver's long poll ends.
        let all = crate::wait_seen(&seen, n + 1, Duration::from_secs(300)).await;
        let elapsed = started.elapsed();
        for r in readers {
            r.abort();
            if let Ok(Err(e)) = r.await {
                return Err(e);
            }
        }
        all.map(|()| elapsed)
    }
}
