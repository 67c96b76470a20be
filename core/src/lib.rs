#![doc = include_str!("../README.md")]

mod bus;
mod capabilities;
mod error;
mod front;
pub mod idempotency;
pub mod memory;
mod message;
mod options;
mod partition;
mod policy;
pub mod raw;
mod redrive;
mod registry;
mod runner;
pub mod telemetry;
mod topic;

pub use bus::{Delivery, Event, EventBus, EventBusExt, NackAction, Subscriber};
pub use capabilities::{Capabilities, Ordering};
pub use error::{Error, ErrorKind, Result};
pub use front::Bus;
pub use message::{Headers, Message};
pub use options::{BrowseFrom, BrowseOptions, PublishOptions, StartPosition, SubscribeOptions};
pub use policy::{DeadLetterPolicy, RetryPolicy};
pub use runner::{Consumer, ConsumerReport, Permanent};

/// Dead letters: the headers a dead-lettered message carries, the group that keeps them,
/// and moving them back ([`dead_letter::redrive`]).
pub mod dead_letter {
    pub use crate::policy::{
        default_dead_letter_topic as default_topic, dlq_headers as headers, is_dead_letter_topic,
        DEAD_LETTER_GROUP as GROUP,
    };
    pub use crate::redrive::{
        peek, purge, redrive, RedriveOptions, RedriveReport, REDRIVEN_AT_HEADER,
        REDRIVEN_FROM_HEADER,
    };
}

/// The envelope's header names beyond CloudEvents' core attributes: correlation and causation
/// ids (see [`Message::caused_by`]) and the event's schema version (see [`Consumer::upcast`]).
pub mod envelope {
    pub use crate::message::{CAUSATION_ID, CORRELATION_ID, DEFAULT_SOURCE, DEFAULT_TYPE, VERSION};
}

/// The limits every backend takes the same way, and the name checks behind them.
pub mod limits {
    pub use crate::message::METADATA_MAX_BYTES;
    pub use crate::options::{ACK_TIMEOUT_MIN, BROWSE_LIMIT_MAX, DURATION_MAX};
    pub use crate::topic::{validate_group, validate_topic, GROUP_MAX_LEN, TOPIC_MAX_LEN};
}

/// The parts of a [`RetryPolicy`]: its builder and its decisions.
pub mod retry {
    pub use crate::policy::{RetryDecision, RetryPolicyBuilder};
}
