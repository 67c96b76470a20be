//! What a backend can do, declared once and checked by the conformance suite.

use std::time::Duration;

/// The ordering a backend guarantees to consumers of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Ordering {
    /// No ordering guarantee.
    #[default]
    None,
    /// Messages with the same key are delivered in publish order, even with several competing
    /// consumers in a group: a key is handled by one consumer at a time.
    PerKey,
}

/// The capabilities of a backend. `Copy + Default`; the default has everything off.
///
/// Every capability left off makes the matching operation return
/// [`crate::ErrorKind::Unsupported`]; the conformance suite checks that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The ordering guarantee.
    pub ordering: Ordering,
    /// Consumer groups: competing consumers inside a group, fan-out across groups.
    pub consumer_groups: bool,
    /// Acked state and unconsumed messages survive a restart of the broker.
    pub persistent: bool,
    /// A new group can start from the earliest retained message.
    pub replay: bool,
    /// `nack` with [`crate::NackAction::RedeliverAfter`] waits for the delay.
    pub nack_can_delay: bool,
    /// The broker dead-letters by itself after a delivery limit.
    pub native_dead_letter: bool,
    /// `extend_deadline` pushes the ack timeout of a delivery back.
    pub ack_deadline_can_extend: bool,
    /// `PublishOptions::delay` is honoured.
    pub publish_with_delay: bool,
    /// The longest delay `publish_with_delay` accepts.
    pub publish_delay_max: Option<Duration>,
    /// The largest message accepted, as counted by [`crate::Message::encoded_len`].
    pub message_max_bytes: Option<usize>,
    /// The most messages one `publish_batch` call accepts.
    pub batch_max_size: Option<usize>,
    /// `attempt` counts only hand-outs to application code, across the members of a group:
    /// deliveries a member fetched but never handed out (read ahead when it closes, queued in
    /// the consumer runner at shutdown, [`crate::Delivery::release`]d) do not count, so a
    /// retry policy never gives up on a message handlers saw fewer times than it allows.
    /// (A member that crashes says goodbye to nobody: what it had read ahead may still count
    /// once; backends say in their README.)
    pub exact_attempts: bool,
    /// [`crate::EventBus::lag`] reports how many messages a group has not received yet.
    pub consumer_lag: bool,
    /// [`crate::EventBus::browse`] reads a topic without a consumer group, changing nothing.
    pub browse: bool,
}

impl Capabilities {
    /// Capabilities with everything off (same as `Default`).
    pub const fn none() -> Self {
        Self {
            ordering: Ordering::None,
            consumer_groups: false,
            persistent: false,
            replay: false,
            nack_can_delay: false,
            native_dead_letter: false,
            ack_deadline_can_extend: false,
            publish_with_delay: false,
            publish_delay_max: None,
            message_max_bytes: None,
            batch_max_size: None,
            exact_attempts: false,
            consumer_lag: false,
            browse: false,
        }
    }
}
