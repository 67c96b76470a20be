//! Retry and dead-letter policies: they decide; the consumer runner acts.
//!
//! Order of application in the runner, for one delivery: the handler runs; on failure the
//! [`RetryPolicy`] decides whether to try again in-process (after a backoff, while later
//! messages of the same key wait) or to give up; on giving up the [`DeadLetterPolicy`] decides
//! where the message goes; only after the dead-letter publish succeeded is the delivery acked.

use std::time::Duration;

use chrono::Utc;

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// What the retry policy decided after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this backoff.
    RetryAfter(Duration),
    /// No attempts left: dead-letter the message.
    GiveUp,
}

/// Exponential backoff with full jitter and a bounded number of attempts.
///
/// The backoff before attempt `n + 1` (after `n` failed attempts) is a uniformly random duration
/// in `[0, min(max_delay, initial_delay × multiplier^(n-1))]` ("full jitter").
///
/// ```
/// use busbar_core::{retry::RetryDecision, RetryPolicy};
/// use std::time::Duration;
/// let policy = RetryPolicy::builder()
///     .max_attempts(3)
///     .initial_delay(Duration::from_millis(10))
///     .max_delay(Duration::from_millis(100))
///     .build()
///     .unwrap();
/// assert!(matches!(policy.decide(1), RetryDecision::RetryAfter(_)));
/// assert_eq!(policy.decide(3), RetryDecision::GiveUp);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    max_delay: Duration,
    multiplier: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms initial delay, doubling, capped at 10 s.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder(Self::default())
    }

    /// No retries: the first failure gives up.
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Total attempts, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Backoff before the first retry (upper bound, before jitter).
    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// Upper bound of any backoff.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The upper bound of the backoff after `failed_attempts` failures (before jitter).
    pub fn backoff_ceiling(&self, failed_attempts: u32) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(64) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// A full-jitter backoff after `failed_attempts` failures: uniform in `[0, ceiling]`.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let ceiling = self.backoff_ceiling(failed_attempts);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Decides what follows the failure of attempt `attempt` (1-based).
    pub fn decide(&self, attempt: u32) -> RetryDecision {
        if attempt >= self.max_attempts {
            RetryDecision::GiveUp
        } else {
            RetryDecision::RetryAfter(self.backoff(attempt))
        }
    }
}

/// Builds a validated [`RetryPolicy`].
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder(RetryPolicy);

impl RetryPolicyBuilder {
    /// Total attempts including the first; at least 1.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.0.max_attempts = n;
        self
    }
    /// Backoff ceiling before the first retry.
    pub fn initial_delay(mut self, d: Duration) -> Self {
        self.0.initial_delay = d;
        self
    }
    /// Upper bound of every backoff; not below `initial_delay`.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.0.max_delay = d;
        self
    }
    /// Growth factor per attempt; finite and at least 1.0.
    pub fn multiplier(mut self, m: f64) -> Self {
        self.0.multiplier = m;
        self
    }
    /// Validates and builds. Errors with [`ErrorKind::Config`] on zero attempts, a multiplier
    /// below 1 or not finite, or `max_delay < initial_delay`.
    pub fn build(self) -> Result<RetryPolicy> {
        let p = self.0;
        let bad = |m: String| Err(Error::new(ErrorKind::Config, m));
        if p.max_attempts == 0 {
            return bad("retry policy: max_attempts must be at least 1".into());
        }
        if !p.multiplier.is_finite() || p.multiplier < 1.0 {
            return bad(format!(
                "retry policy: multiplier must be a finite number >= 1.0, got {}",
                p.multiplier
            ));
        }
        if p.max_delay < p.initial_delay {
            return bad(format!(
                "retry policy: max_delay ({:?}) is below initial_delay ({:?})",
                p.max_delay, p.initial_delay
            ));
        }
        Ok(p)
    }
}

/// Header names the dead-letter policy adds to a dead-lettered message.
pub mod dlq_headers {
    /// The error text of the last failed attempt.
    pub const ERROR: &str = "busbar-dlq-error";
    /// How many attempts were made.
    pub const ATTEMPTS: &str = "busbar-dlq-attempts";
    /// The topic the message came from.
    pub const ORIGINAL_TOPIC: &str = "busbar-dlq-original-topic";
    /// The consumer group that gave up.
    pub const GROUP: &str = "busbar-dlq-group";
    /// When it was dead-lettered (RFC 3339).
    pub const TIME: &str = "busbar-dlq-time";
    /// Every dead-letter header, in the order they are added.
    pub const ALL: [&str; 5] = [ERROR, ATTEMPTS, ORIGINAL_TOPIC, GROUP, TIME];
}

/// Where messages go when the retry policy gives up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    topic: Option<String>,
}

impl DeadLetterPolicy {
    /// Dead-letter into `<topic>.dlq` (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Dead-letter into this topic instead of `<topic>.dlq`.
    pub fn to_topic(topic: impl Into<String>) -> Self {
        Self {
            topic: Some(topic.into()),
        }
    }

    /// The dead-letter topic for messages of `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| default_dead_letter_topic(topic))
    }

    /// The dead-lettered copy of `message`: same id, payload, key, type, source, time and
    /// headers (correlation id made explicit), plus the [`dlq_headers`].
    pub fn dead_letter_message(
        &self,
        message: &Message,
        original_topic: &str,
        group: &str,
        attempts: u32,
        error: &str,
    ) -> Message {
        let mut m = message.clone();
        // Explicit, so the copy stays in the original's chain wherever it is published from.
        if m.headers.get(crate::message::CORRELATION_ID).is_none() {
            m.headers
                .insert(crate::message::CORRELATION_ID, m.id.clone());
        }
        m.headers.insert(dlq_headers::ERROR, truncate(error, 4096));
        m.headers
            .insert(dlq_headers::ATTEMPTS, attempts.to_string());
        m.headers
            .insert(dlq_headers::ORIGINAL_TOPIC, original_topic);
        m.headers.insert(dlq_headers::GROUP, group);
        m.headers.insert(dlq_headers::TIME, Utc::now().to_rfc3339());
        m
    }
}

/// The consumer group that keeps a dead-letter topic's messages until they are read or
/// redriven: backends that keep messages only for existing groups (RabbitMQ, SQS) create it
/// before the first dead letter, and `redrive` reads with it by default.
pub const DEAD_LETTER_GROUP: &str = "busbar-redrive";

/// Whether `topic` is a dead-letter topic (`<topic>.dlq`).
pub fn is_dead_letter_topic(topic: &str) -> bool {
    topic.ends_with(".dlq")
}

/// `<topic>.dlq`.
pub fn default_dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_grows_and_caps() {
        let p = RetryPolicy::builder()
            .max_attempts(10)
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_secs(1))
            .multiplier(2.0)
            .build()
            .expect("valid");
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(4), Duration::from_millis(800));
        assert_eq!(p.backoff_ceiling(5), Duration::from_secs(1));
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_stays_in_range_and_spreads() {
        let p = RetryPolicy::default();
        let ceiling = p.backoff_ceiling(3);
        let samples: Vec<Duration> = (0..2000).map(|_| p.backoff(3)).collect();
        assert!(samples.iter().all(|d| *d <= ceiling));
        let below_half = samples.iter().filter(|d| **d < ceiling / 2).count();
        // Uniform in [0, ceiling]: about half fall below the middle.
        assert!((700..1300).contains(&below_half), "{below_half}");
        assert!(samples.iter().any(|d| *d < ceiling / 10));
        assert!(samples.iter().any(|d| *d > ceiling * 9 / 10));
    }

    #[test]
    fn decide_gives_up_at_max_attempts() {
        let p = RetryPolicy::builder()
            .max_attempts(3)
            .build()
            .expect("valid");
        assert!(matches!(p.decide(1), RetryDecision::RetryAfter(_)));
        assert!(matches!(p.decide(2), RetryDecision::RetryAfter(_)));
        assert_eq!(p.decide(3), RetryDecision::GiveUp);
        assert_eq!(p.decide(7), RetryDecision::GiveUp);
        assert_eq!(RetryPolicy::no_retry().decide(1), RetryDecision::GiveUp);
    }

    #[test]
    fn invalid_parameters_fail_at_build() {
        let cases = [
            RetryPolicy::builder().max_attempts(0),
            RetryPolicy::builder().multiplier(0.5),
            RetryPolicy::builder().multiplier(f64::NAN),
            RetryPolicy::builder().multiplier(-2.0),
            RetryPolicy::builder()
                .initial_delay(Duration::from_secs(2))
                .max_delay(Duration::from_secs(1)),
        ];
        for b in cases {
            let e = b.clone().build().expect_err("must fail");
            assert_eq!(e.kind(), ErrorKind::Config, "{b:?}");
        }
    }

    #[test]
    fn dead_letter_keeps_message_and_adds_metadata() {
        let m = Message::new("body").with_key("k").with_header("h", "v");
        let d = DeadLetterPolicy::new().dead_letter_message(&m, "orders", "billing", 5, "boom");
        assert_eq!(d.payload, m.payload);
        assert_eq!(d.key, m.key);
        assert_eq!(d.id, m.id);
        assert_eq!(d.headers.get("h"), Some("v"));
        assert_eq!(d.headers.get(dlq_headers::ERROR), Some("boom"));
        assert_eq!(d.headers.get(dlq_headers::ATTEMPTS), Some("5"));
        assert_eq!(d.headers.get(dlq_headers::ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(d.headers.get(dlq_headers::GROUP), Some("billing"));
        assert!(d.headers.get(dlq_headers::TIME).is_some());
        assert_eq!(DeadLetterPolicy::new().topic_for("orders"), "orders.dlq");
        assert_eq!(DeadLetterPolicy::to_topic("x").topic_for("orders"), "x");
    }
}
