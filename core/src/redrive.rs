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
    /// Only the messages with these ids. The others are held while the run goes on and handed
    /// back untouched at its end (`release`: no attempt is counted where the backend can
    /// avoid it); the run ends once every listed id was handled (or on `idle_timeout`). A
    /// listed message behind an unlisted one of the same key cannot be reached (per-key
    /// order) and stays; so do listed messages past the subscription's `max_in_flight`.
    pub only: Option<std::collections::BTreeSet<String>>,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        Self {
            group: crate::policy::DEAD_LETTER_GROUP.into(),
            target_topic: None,
            max_messages: None,
            idle_timeout: Duration::from_secs(2),
            only: None,
        }
    }
}

/// What [`redrive`] (or [`purge`]) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveReport {
    /// Messages republished (purge: dropped) and acked on the dead-letter topic.
    pub redriven: usize,
    /// Their ids, in the order they were handled.
    pub ids: Vec<String>,
    /// Messages handed back because [`RedriveOptions::only`] did not list them.
    pub skipped: usize,
}

/// Reads `dlq_topic` (from the earliest retained message where the backend can replay) and
/// republishes each message to its original topic (header `busbar-dlq-original-topic`) or to
/// `options.target_topic`, without the dead-letter headers and with `busbar-redriven-from` and `busbar-redriven-at`.
/// Each message is acked on the dead-letter topic only after its republish succeeded, so a
/// failure part-way loses nothing (it may duplicate the message being moved). Messages of one
/// key are moved in their order.
pub async fn redrive(
    bus: &dyn EventBus,
    dlq_topic: &str,
    options: &RedriveOptions,
) -> Result<RedriveReport> {
    if let Some(t) = &options.target_topic {
        validate_topic(t)?;
    }
    drain(
        bus,
        dlq_topic,
        options,
        Some(options.target_topic.as_deref()),
    )
    .await
}

/// Drops the dead letters of `dlq_topic` (acks them on its group, [`RedriveOptions::only`]
/// those listed) without republishing: what `busbar dlq purge` does after asking.
pub async fn purge(
    bus: &dyn EventBus,
    dlq_topic: &str,
    options: &RedriveOptions,
) -> Result<RedriveReport> {
    drain(bus, dlq_topic, options, None).await
}

/// Joins the dead-letter group `options.group` on `dlq_topic`, from the earliest retained
/// message where the backend can replay.
async fn open(
    bus: &dyn EventBus,
    dlq_topic: &str,
    options: &RedriveOptions,
) -> Result<Box<dyn crate::Subscriber>> {
    validate_topic(dlq_topic)?;
    let start = if bus.capabilities().replay {
        StartPosition::Earliest
    } else {
        StartPosition::Latest
    };
    bus.subscribe(
        dlq_topic,
        SubscribeOptions::new(options.group.clone()).start(start),
    )
    .await
}

/// Hands every held delivery back untouched; the first error, after trying them all.
async fn release_all(held: Vec<crate::Delivery>) -> Result<()> {
    let mut released = Ok(());
    for d in held {
        if let Err(e) = d.release().await {
            released = released.and(Err(e));
        }
    }
    released
}

/// Reads the dead letters of `dlq_topic` without taking them: up to
/// [`RedriveOptions::max_messages`] (those of [`RedriveOptions::only`]) are held until no
/// other arrives for `idle_timeout`, then all are handed back (`release`) in the same state —
/// except that on backends without `exact_attempts` (RabbitMQ, SQS) the broker counts the
/// hand-out. What `busbar dlq list` and `show` print.
pub async fn peek(
    bus: &dyn EventBus,
    dlq_topic: &str,
    options: &RedriveOptions,
) -> Result<Vec<crate::Event>> {
    let mut sub = open(bus, dlq_topic, options).await?;
    let mut held = Vec::new();
    let mut seen = Vec::new();
    let result = async {
        while options.max_messages.is_none_or(|m| seen.len() < m) {
            let Ok(next) = tokio::time::timeout(options.idle_timeout, sub.next()).await else {
                break;
            };
            let Some(delivery) = next? else { break };
            if options
                .only
                .as_ref()
                .is_none_or(|only| only.contains(delivery.id()))
            {
                seen.push(delivery.event().clone());
            }
            held.push(delivery);
            if options
                .only
                .as_ref()
                .is_some_and(|only| only.len() == seen.len())
            {
                break;
            }
        }
        Ok(())
    }
    .await;
    let released = release_all(held).await;
    let closed = sub.close().await;
    result.and(released).and(closed).map(|()| seen)
}

/// Reads the dead-letter group; `redrive_to` = `Some(target)` republishes (to `target` or
/// the original topic) before each ack, `None` only acks.
async fn drain(
    bus: &dyn EventBus,
    dlq_topic: &str,
    options: &RedriveOptions,
    redrive_to: Option<Option<&str>>,
) -> Result<RedriveReport> {
    let mut sub = open(bus, dlq_topic, options).await?;
    let mut report = RedriveReport::default();
    let mut held = Vec::new();
    let result = async {
        while options.max_messages.is_none_or(|m| report.redriven < m) {
            if options
                .only
                .as_ref()
                .is_some_and(|only| only.len() == report.ids.len())
            {
                break;
            }
            let Ok(next) = tokio::time::timeout(options.idle_timeout, sub.next()).await else {
                break;
            };
            let Some(delivery) = next? else { break };
            if options
                .only
                .as_ref()
                .is_some_and(|only| !only.contains(delivery.id()))
            {
                report.skipped += 1;
                held.push(delivery);
                continue;
            }
            if let Some(target) = redrive_to {
                let mut message = delivery.message().clone();
                let original = message
                    .headers
                    .get(dlq_headers::ORIGINAL_TOPIC)
                    .map(str::to_owned);
                let Some(target) = target.map(str::to_owned).or(original) else {
                    tracing::warn!(
                        id = delivery.id(),
                        "redrive: no original topic header and no target; leaving it"
                    );
                    held.push(delivery);
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
            }
            delivery.ack().await?;
            report.redriven += 1;
            report.ids.push(delivery.id().to_owned());
        }
        Ok(())
    }
    .await;
    let released = release_all(held).await;
    let closed = sub.close().await;
    result.and(released).and(closed).map(|()| report)
}
