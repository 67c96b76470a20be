//! Options of `publish` and `subscribe`.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::topic::validate_group;

/// Options of one publish call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// Deliver no sooner than this delay after publishing (capability `publish_with_delay`).
    pub delay: Option<Duration>,
}

impl PublishOptions {
    /// Default options: publish now.
    pub fn new() -> Self {
        Self::default()
    }

    /// Delays delivery by `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// Where a group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum StartPosition {
    /// Only messages published after the group was created.
    #[default]
    Latest,
    /// Every retained message (capability `replay`).
    Earliest,
}

/// Options of a subscription.
///
/// ```
/// use busbar_core::{SubscribeOptions, StartPosition};
/// use std::time::Duration;
/// let opts = SubscribeOptions::new("billing")
///     .start(StartPosition::Earliest)
///     .ack_timeout(Duration::from_secs(10))
///     .max_in_flight(64);
/// assert_eq!(opts.group, "billing");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Consumer group: subscribers of one group compete for messages; each group gets every
    /// message (fan-out).
    pub group: String,
    /// Where a new group starts; ignored when the group already exists.
    pub start: StartPosition,
    /// Unacked deliveries are redelivered after this long.
    pub ack_timeout: Duration,
    /// The most unacked deliveries this subscriber holds at once.
    pub max_in_flight: usize,
}

impl SubscribeOptions {
    /// Default ack timeout: 30 seconds.
    pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default in-flight limit: 256 deliveries.
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

    /// Options for consumer group `group`, with the defaults.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            start: StartPosition::Latest,
            ack_timeout: Self::DEFAULT_ACK_TIMEOUT,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Sets where a new group starts.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Sets the ack timeout.
    pub fn ack_timeout(mut self, ack_timeout: Duration) -> Self {
        self.ack_timeout = ack_timeout;
        self
    }

    /// Sets the in-flight limit.
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Checks the group name, a non-zero in-flight limit and a non-zero ack timeout.
    pub fn validate(&self) -> Result<()> {
        validate_group(&self.group)?;
        if self.max_in_flight == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "max_in_flight must be at least 1",
            ));
        }
        if self.ack_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "ack_timeout must be greater than zero",
            ));
        }
        Ok(())
    }
}
