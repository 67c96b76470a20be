//! Settling with SQS calls: acks become `DeleteMessageBatch` calls (up to 10 receipts each,
//! several in flight, each ack answered with its own entry's outcome), nacks and releases
//! visibility changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use busbar_core::raw::{coalesce::Coalescer, Ack};
use busbar_core::{Error, ErrorKind, Result};

use super::{whole_seconds, Shared, SQS_BATCH_MAX};
use crate::{error, Inner, BACKEND};

impl Shared {
    pub(super) async fn change_visibility(&self, receipt: &str, timeout: Duration) -> Result<()> {
        self.inner
            .sqs
            .change_message_visibility()
            .queue_url(&self.queue.url)
            .receipt_handle(receipt)
            .visibility_timeout(whole_seconds(timeout))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error::map(e, "changing a message's visibility"))
    }

    /// Makes messages visible again at once (best effort: a message whose change fails comes
    /// back when its visibility timeout ends).
    pub(super) async fn release(&self, receipts: Vec<String>) {
        for chunk in receipts.chunks(SQS_BATCH_MAX) {
            let entries = chunk.iter().enumerate().filter_map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(0)
                    .build()
                    .ok()
            });
            let result = self
                .inner
                .sqs
                .change_message_visibility_batch()
                .queue_url(&self.queue.url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            match result {
                Ok(out) if !out.failed.is_empty() => tracing::debug!(
                    failed = out.failed.len(),
                    "sqs: some messages could not be made visible again; they return after their visibility timeout"
                ),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %error::map(e, "releasing messages"),
                    "sqs: messages could not be made visible again; they return after their visibility timeout"),
            }
        }
    }
}

/// `DeleteMessageBatch` calls in flight at once per subscriber.
const DELETES_IN_FLIGHT: usize = 4;

/// Deletes acked messages through core's [`Coalescer`]: whatever acks wait when a round starts
/// go together, up to 10 per `DeleteMessageBatch` call and [`DELETES_IN_FLIGHT`] calls at once
/// (one HTTP round trip per 10 acks would otherwise cap a busy consumer); a lone ack is not
/// delayed, and each ack gets its own entry's outcome.
pub(super) fn delete_coalescer(inner: Arc<Inner>, queue_url: String) -> Coalescer<(), String> {
    Coalescer::spawn_per_entry(SQS_BATCH_MAX, DELETES_IN_FLIGHT, move |(), receipts| {
        let (inner, queue_url) = (inner.clone(), queue_url.clone());
        async move { delete_batch(&inner, &queue_url, receipts).await }
    })
}

/// One `DeleteMessageBatch` call: each receipt's outcome, in order.
async fn delete_batch(inner: &Inner, queue_url: &str, receipts: Vec<String>) -> Vec<Result<()>> {
    let entries = receipts
        .iter()
        .enumerate()
        .filter_map(|(i, receipt)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build()
                .ok()
        })
        .collect();
    let result = inner
        .sqs
        .delete_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await;
    match result {
        Ok(out) => {
            let failed: HashMap<String, String> = out
                .failed
                .into_iter()
                .map(|f| {
                    let why = format!("{}: {}", f.code, f.message.unwrap_or_default());
                    (f.id, why)
                })
                .collect();
            (0..receipts.len())
                .map(|i| match failed.get(&i.to_string()) {
                    None => Ok(()),
                    Some(why) => Err(Error::new(
                        ErrorKind::Broker,
                        format!("SQS refused to delete the message [{why}]"),
                    )
                    .with_backend(BACKEND)),
                })
                .collect()
        }
        Err(e) => {
            let err = error::map(e, "deleting acked messages");
            receipts.iter().map(|_| Err(error::copy(&err))).collect()
        }
    }
}

pub(super) struct SqsAck {
    pub(super) shared: Arc<Shared>,
    pub(super) token: u64,
    pub(super) receipt: String,
}

#[async_trait]
impl Ack for SqsAck {
    async fn ack(&self) -> Result<()> {
        self.shared.check_handed(self.token)?;
        self.shared
            .deletes
            .submit((), self.receipt.clone())
            .await
            .map_err(|e| match e.backend() {
                Some(_) => e,
                None => e.with_backend(BACKEND),
            })?;
        self.shared.settled(self.token, false);
        Ok(())
    }

    async fn redeliver(&self, delay: Duration) -> Result<()> {
        // At most `DURATION_MAX` (12 h, SQS's longest visibility timeout): checked in core.
        self.shared.check_handed(self.token)?;
        // Messages of its key waiting here go back first (the key stays locked in SQS while
        // this one is in flight, so they cannot overtake it); this one last. Settling first
        // also keeps a fresh copy received right after the change from being taken for a
        // waiting one.
        let rest = self.shared.settled(self.token, true);
        self.shared
            .release(rest.into_iter().map(|r| r.receipt).collect())
            .await;
        self.shared.change_visibility(&self.receipt, delay).await
    }

    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.shared.check_handed(self.token)?;
        let asked = Instant::now();
        self.shared.change_visibility(&self.receipt, by).await?;
        self.shared.set_deadline(self.token, asked + by);
        Ok(())
    }
}
