//! Redrive: move dead-lettered messages back to the topic they came from.

use std::time::Duration;

use crate::bus::EventBus;
use crate::error::Result;
use crate::options::{PublishOptions, StartPosition, SubscribeOptions};
use crate::policy::dlq_headers;
use crate::topic::validate_topic;

/// Header added to a redriven message: the dead-letter topic it came from.
pub const REDRIVEN_FROM_HEADER: &str = "busbar-redriven-from";

/// Header added to a redriven message: when it was redriven (RFC 3339). It also makes each
/// redrive of the same message distinct for brokers that drop re-published duplicates by id
/// and headers within a window (NATS JetStream's duplicate window, SQS FIFO de-duplication).
pub const REDRIVEN_AT_HEADER: &str = "busbar-redriven-at";

/// Options of [`redrive`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveOptions {
    /// Consumer group used to read the dead-letter topic (default `busbar-redrive`).
    pub group: String,
    /// Republish here instead of each message's original topic.
    pub target_topic: Option<String>,
    /// Stop after this many messages.
    pub max_messages: Option<usize>,
    /// Stop when no message arrived for this long (default 2 s).
    pub idle_timeout: Duration,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        Self {
            group: crate::policy::DEAD_LETTER_GROUP.into(),
            target_topic: None,
            max_messages: None,
            idle_timeout: Duration::from_secs(2),
        }
    }
}

/// What [`redrive`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Messages republished and acked on the dead-letter topic.
    pub redriven: usize,
}

/// Reads `dlq_topic` (from the earliest retained message where the backend can replay) and
/// republishes each message to its original topic (header `busbar-dlq-original-topic`) or to
/// `options.target_topic`, without the dead-letter headers and with `busbar-redriven-from` and `busbar-redriven-at`.
/// Each message is acked on the dead-letter topic only after its republish succeeded, so a
/// failure part-way loses nothing (it may duplicate the message being moved).
pub async fn redrive(
    bus: &dyn EventBus,
    dlq_topic: &str,
    options: &RedriveOptions,
) -> Result<RedriveReport> {
    validate_topic(dlq_topic)?;
    if let Some(t) = &options.target_topic {
        validate_topic(t)?;
    }
    let start = if bus.capabilities().replay {
        StartPosition::Earliest
    } else {
        StartPosition::Latest
    };
    let mut sub = bus
        .subscribe(
            dlq_topic,
            SubscribeOptions::new(options.group.clone()).start(start),
        )
        .await?;
    let mut report = RedriveReport::default();
    let result = async {
        while options.max_messages.is_none_or(|m| report.redriven < m) {
            let Ok(next) = tokio::time::timeout(options.idle_timeout, sub.next()).await else {
                break;
            };
            let Some(delivery) = next? else { break };
            let mut message = delivery.message().clone();
            let original = message
                .headers
                .get(dlq_headers::ORIGINAL_TOPIC)
                .map(str::to_owned);
            let Some(target) = options.target_topic.clone().or(original) else {
                tracing::warn!(
                    id = delivery.id(),
                    "redrive: no original topic header and no target; leaving it"
                );
                delivery
                    .nack(crate::NackAction::Redeliver)
                    .await
                    .or_else(|e| {
                        if e.kind() == crate::ErrorKind::Unsupported {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })?;
                continue;
            };
            for h in dlq_headers::ALL {
                message.headers.remove(h);
            }
            message.headers.insert(REDRIVEN_FROM_HEADER, dlq_topic);
            message.headers.insert(
                REDRIVEN_AT_HEADER,
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            );
            bus.publish(&target, message, &PublishOptions::default())
                .await?;
            delivery.ack().await?;
            report.redriven += 1;
        }
        Ok(())
    }
    .await;
    let closed = sub.close().await;
    result.and(closed).map(|()| report)
}
