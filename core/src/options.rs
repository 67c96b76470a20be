//! Options of `publish` and `subscribe`.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::policy::DeadLetterPolicy;
use crate::topic::validate_group;

/// The longest ack timeout, publish delay, redelivery delay or deadline extension busbar
/// takes (12 hours, SQS's longest visibility timeout): longer ones are `InvalidInput`, so no
/// backend computes an instant that overflows or a broker value out of range.
pub const DURATION_MAX: Duration = Duration::from_secs(12 * 3600);

/// The shortest ack timeout busbar takes.
pub const ACK_TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// Checks a user-given duration against [`DURATION_MAX`]; `what` names it in the error.
pub fn check_duration(what: &str, d: Duration) -> Result<()> {
    if d > DURATION_MAX {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what} of {d:?} is longer than busbar's maximum of 12 h"),
        ));
    }
    Ok(())
}

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
    /// Where `nack(DeadLetter)`, the consumer runner and undecodable messages send dead
    /// letters (default `<topic>.dlq`).
    pub dead_letter: DeadLetterPolicy,
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
            dead_letter: DeadLetterPolicy::default(),
        }
    }

    /// Sets where dead letters go.
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = policy;
        self
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
        if self.ack_timeout < ACK_TIMEOUT_MIN {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "ack_timeout must be at least 1 ms; got {:?}",
                    self.ack_timeout
                ),
            ));
        }
        check_duration("an ack_timeout", self.ack_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_timeouts_are_bounded() {
        let kind = |d| {
            SubscribeOptions::new("g")
                .ack_timeout(d)
                .validate()
                .map_err(|e| e.kind())
        };
        assert_eq!(kind(Duration::ZERO), Err(ErrorKind::InvalidInput));
        assert_eq!(
            kind(Duration::from_micros(999)),
            Err(ErrorKind::InvalidInput)
        );
        assert_eq!(kind(ACK_TIMEOUT_MIN), Ok(()));
        assert_eq!(kind(DURATION_MAX), Ok(()));
        assert_eq!(
            kind(DURATION_MAX + Duration::from_nanos(1)),
            Err(ErrorKind::InvalidInput)
        );
        assert_eq!(kind(Duration::MAX), Err(ErrorKind::InvalidInput));
    }
}

/// The most messages one [`crate::EventBus::browse`] call returns.
pub const BROWSE_LIMIT_MAX: usize = 10_000;

/// Where [`crate::EventBus::browse`] starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrowseFrom {
    /// The oldest message the broker still holds.
    Earliest,
    /// The first message the broker stored at or after this time (the broker's clock: Redis
    /// stream ids, Kafka record timestamps, JetStream stored times, the memory log's times).
    Time(chrono::DateTime<chrono::Utc>),
}

/// What [`crate::EventBus::browse`] reads: from where, and at most how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrowseOptions {
    /// Where to start.
    pub from: BrowseFrom,
    /// At most this many messages (1 to [`BROWSE_LIMIT_MAX`]).
    pub limit: usize,
}

impl BrowseOptions {
    /// From the oldest message held, at most `limit`.
    pub fn earliest(limit: usize) -> Self {
        Self {
            from: BrowseFrom::Earliest,
            limit,
        }
    }

    /// From `time` on, at most `limit`.
    pub fn since(time: chrono::DateTime<chrono::Utc>, limit: usize) -> Self {
        Self {
            from: BrowseFrom::Time(time),
            limit,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if !(1..=BROWSE_LIMIT_MAX).contains(&self.limit) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a browse limit must be 1 to {BROWSE_LIMIT_MAX}, not {}",
                    self.limit
                ),
            ));
        }
        Ok(())
    }
}
