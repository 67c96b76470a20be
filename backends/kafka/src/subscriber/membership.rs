//! Group membership: librdkafka's rebalance callbacks. A revoked partition is drained (its
//! deliveries settled, bounded) and committed before it goes; an assigned one starts from
//! the committed offset and the previous owner's progress note.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use busbar_core::{Error, ErrorKind};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use super::ack::{self, commit};
use super::Shared;
use crate::{error, BACKEND};

/// The longest a revoked partition waits for its in-flight deliveries before it is handed
/// over anyway (they are then delivered again by the new owner).
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// How long a new owner waits for the committed progress notes of its partitions.
const NOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka callbacks of the member: rebalances and client errors.
pub(super) struct MemberContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for MemberContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let kind = error::kind_of(&error);
        if kind == ErrorKind::Auth {
            *self
                .shared
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some(Error::new(kind, format!("Kafka consumer: {reason}")).with_backend(BACKEND));
            self.shared.wake.notify_one();
        }
        tracing::warn!(group = %self.shared.options.group, %error, reason, "kafka: consumer error");
    }
}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::debug!(group = %self.shared.options.group, ?parts, "kafka: partitions revoked");
                self.drain(&parts);
                commit(consumer, &self.shared, Some(&parts));
                let mut st = self.shared.state();
                for p in &parts {
                    st.drop_partition(*p);
                }
                drop(st);
                self.shared.wake.notify_one();
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.shared.options.group, error = %e, "kafka: rebalance failed")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::debug!(group = %self.shared.options.group, ?parts, "kafka: partitions assigned");
            let notes = committed_notes(consumer, tpl);
            let mut st = self.shared.state();
            for p in parts {
                st.assign_with(p, notes.get(&p).cloned());
            }
            drop(st);
            // librdkafka keeps an application's pause on a partition through revocation and
            // re-assignment: a partition paused before a rebalance and given back after it
            // would never be fetched again. Every assigned partition takes the member's state.
            let paused = self.shared.paused.load(AtomicOrdering::Acquire);
            let r = if paused {
                consumer.pause(tpl)
            } else {
                consumer.resume(tpl)
            };
            if let Err(e) = r {
                tracing::warn!(group = %self.shared.options.group, error = %e, paused,
                    "kafka: cannot set the fetch state of the assigned partitions");
            }
        }
    }
}

/// What the previous owners of the assigned partitions noted with their commits (an
/// unreadable answer means none: records are then handed out again as at-least-once allows).
fn committed_notes(
    consumer: &BaseConsumer<MemberContext>,
    assigned: &TopicPartitionList,
) -> std::collections::HashMap<i32, busbar_core::raw::inflight::Progress> {
    let committed = error::retry_while_leader_moves(NOTE_TIMEOUT, || {
        consumer.committed_offsets(assigned.clone(), NOTE_TIMEOUT)
    });
    match committed {
        Ok(list) => list
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), ack::decode(o, e.metadata())?)),
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "kafka: cannot read the committed progress notes; records past the committed offsets come again");
            std::collections::HashMap::new()
        }
    }
}

impl MemberContext {
    /// Stops handing out records of `parts` and waits (bounded) until their deliveries are
    /// settled, so the next owner starts after them and a key is never processed by two
    /// members at once. Skipped when the member leaves for good: its unacked deliveries are
    /// then simply handed back.
    fn drain(&self, parts: &[i32]) {
        let mut st = self.shared.state();
        for p in parts {
            st.start_draining(*p);
        }
        let limit = self.shared.options.ack_timeout.min(DRAIN_MAX);
        let until = Instant::now() + limit;
        loop {
            if self.shared.closing.load(AtomicOrdering::Acquire) {
                return;
            }
            let now = Instant::now();
            let live: usize = parts.iter().map(|p| st.live_in_flight(*p, now)).sum();
            if live == 0 {
                return;
            }
            if now >= until {
                tracing::warn!(group = %self.shared.options.group, live, ?limit,
                    "kafka: handing partitions over with deliveries still unsettled; they will be delivered again");
                return;
            }
            st = self
                .shared
                .settled
                .wait_timeout(st, (until - now).min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
