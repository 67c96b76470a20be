#![doc = include_str!("../README.md")]

pub mod bus;
pub mod capabilities;
pub mod coalesce;
pub mod error;
pub mod inflight;
pub mod memory;
pub mod message;
pub mod options;
pub mod partition;
pub mod policy;
pub mod raw;
pub mod redrive;
pub mod registry;
pub mod runner;
pub mod topic;

pub use bus::{
    check_publish, into_stream, Ack, Delivery, Event, EventBus, EventBusExt, NackAction, Subscriber,
};
pub use capabilities::{Capabilities, Ordering};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use message::{Headers, Message, METADATA_MAX_BYTES};
pub use options::{PublishOptions, StartPosition, SubscribeOptions, DURATION_MAX};
pub use partition::partition_for;
pub use policy::{
    default_dead_letter_topic, dlq_headers, is_dead_letter_topic, DeadLetterPolicy, RetryDecision,
    RetryPolicy, RetryPolicyBuilder, DEAD_LETTER_GROUP,
};
pub use redrive::{redrive, RedriveOptions, RedriveReport};
pub use registry::{redact_url, BackendEntry, ConnectFn, Registry};
pub use runner::{Consumer, ConsumerReport, Permanent};
pub use topic::{validate_group, validate_topic, GROUP_MAX_LEN, TOPIC_MAX_LEN};
