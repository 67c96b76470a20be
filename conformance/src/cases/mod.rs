//! The cases, grouped by what they prove. `cargo test -p <backend> ordering` runs one group.

pub mod basic;
pub mod browse;
pub mod capabilities;
pub mod chain;
pub mod churn;
pub mod delayed;
pub mod dlq;
pub mod groups;
pub mod input;
pub mod lag;
pub mod ordering;
pub mod redelivery;
pub mod start;
pub mod telemetry;

use std::time::Duration;

use busbar_core::{Capabilities, Ordering};

use crate::Case;

macro_rules! case {
    ($module:ident :: $f:ident, $needs:expr, $secs:expr, $doc:literal) => {
        Case {
            name: concat!(stringify!($module), "::", stringify!($f)),
            doc: $doc,
            needs: $needs,
            run: |ctx| Box::pin($module::$f(ctx)),
            timeout: Duration::from_secs($secs),
        }
    };
}

/// Needs consumer groups (every case that subscribes does).
pub fn needs_groups(c: &Capabilities) -> Option<&'static str> {
    (!c.consumer_groups).then_some("the backend declares consumer_groups off")
}

fn needs_per_key(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| {
        (c.ordering != Ordering::PerKey).then_some("the backend declares ordering None")
    })
}

fn needs_replay(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| (!c.replay).then_some("the backend declares replay off"))
}

fn needs_delay(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| {
        (!c.publish_with_delay).then_some("the backend declares publish_with_delay off")
    })
}

fn needs_nack_delay(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c)
        .or_else(|| (!c.nack_can_delay).then_some("the backend declares nack_can_delay off"))
}

fn needs_max_bytes(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| {
        c.message_max_bytes
            .is_none()
            .then_some("the backend declares no message_max_bytes limit")
    })
}

fn needs_exact_attempts(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| {
        (!c.exact_attempts).then_some(
            "the backend declares exact_attempts off (attempt also counts hand-outs no handler saw)",
        )
    })
}

fn needs_otel(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| {
        (!cfg!(feature = "otel")).then_some(
            "busbar-conformance was built without its otel feature (nothing to trace with)",
        )
    })
}

fn needs_browse(c: &Capabilities) -> Option<&'static str> {
    (!c.browse).then_some("the backend declares browse off")
}

fn needs_lag(c: &Capabilities) -> Option<&'static str> {
    needs_groups(c).or_else(|| (!c.consumer_lag).then_some("the backend declares consumer_lag off"))
}

fn needs_nothing(_: &Capabilities) -> Option<&'static str> {
    None
}

/// Every case, in a stable order.
pub fn all() -> Vec<Case> {
    vec![
        case!(
            basic::publish_subscribe,
            needs_groups,
            60,
            "payload, key, headers, id, type, source, time and content type survive the round trip"
        ),
        case!(
            basic::batch_publish,
            needs_groups,
            60,
            "a published batch arrives whole, in order per key where ordering is PerKey"
        ),
        case!(
            basic::next_batch,
            needs_groups,
            120,
            "next_batch: batches within max_in_flight, a call at the bound waits and is dropped without loss, every message arrives, each key in order"
        ),
        case!(
            basic::topic_isolation,
            needs_groups,
            60,
            "two topics never see each other's messages"
        ),
        case!(
            basic::concurrent_publishers,
            needs_groups,
            120,
            "20 tasks publishing at once lose nothing"
        ),
        case!(
            redelivery::nack_redelivers,
            needs_groups,
            60,
            "a nacked delivery comes back with attempt 2"
        ),
        case!(
            redelivery::nack_with_delay_waits,
            needs_nack_delay,
            60,
            "a delivery nacked with a delay does not come back before the delay"
        ),
        case!(
            redelivery::ack_timeout_redelivers,
            needs_groups,
            90,
            "a delivery dropped without ack comes back after the ack timeout"
        ),
        case!(
            redelivery::handed_back_many_times_is_kept,
            needs_groups,
            240,
            "a message handed back unacked by 22 members in turn (more than a RabbitMQ 4 default delivery limit) is still delivered"
        ),
        case!(
            redelivery::no_redelivery_after_ack,
            needs_groups,
            60,
            "acked messages do not come back within 2 x ack timeout"
        ),
        case!(
            groups::resume_after_close,
            needs_groups,
            120,
            "after close, reopening the group delivers the rest; nothing is lost"
        ),
        case!(
            groups::consumer_groups_fan_out,
            needs_groups,
            60,
            "two groups each get every message"
        ),
        case!(
            groups::competing_consumers_share,
            needs_groups,
            120,
            "three consumers of one group each get some messages and together all"
        ),
        case!(
            ordering::per_key_order_single_consumer,
            needs_per_key,
            120,
            "16 keys x 100 messages arrive in per-key order at one consumer"
        ),
        case!(
            ordering::per_key_order_competing_consumers,
            needs_per_key,
            180,
            "per-key order holds through the runner with 3 consumers, a crash, a join and retries"
        ),
        case!(
            ordering::batches_keep_per_key_order,
            needs_per_key,
            180,
            "the batch handler API (run_batches): 16 keys x 50 messages, batches of up to 32, some events failing once: one event per key per batch, each key in order across batches and retries, nothing lost"
        ),
        case!(
            ordering::consumer_crash,
            needs_groups,
            120,
            "a consumer dropped without acking loses nothing"
        ),
        case!(
            churn::churn_raw_subscribers,
            needs_groups,
            300,
            "5,000 messages, 12 members in turn (every 4th dropped) over 100 keys: nothing lost, per-key order, nothing acked comes back after a clean close, attempts never over-counted (exact_attempts)"
        ),
        case!(
            churn::churn_runner_retries_once,
            needs_exact_attempts,
            300,
            "the runner, 12 members in turn shutting down cleanly, a handler failing each message once: every message succeeds on its retry, none dead-lettered"
        ),
        case!(
            dlq::runner_retry_then_dlq,
            needs_groups,
            120,
            "a poison message is retried, dead-lettered with metadata, and redriven"
        ),
        case!(
            dlq::dead_letters_kept_without_provisioning,
            needs_groups,
            120,
            "with nothing created beforehand, dead letters of nack(DeadLetter) (default topic and DeadLetterPolicy topic) and of the runner (policy topic) are kept, readable and redriven"
        ),
        case!(
            dlq::selective_redrive_and_purge,
            needs_groups,
            120,
            "of six dead letters, redriving one id moves only it, purging one id drops only it, and redriving the rest moves the others, one key's in its order (busbar dlq redrive / purge)"
        ),
        case!(
            chain::chain_crosses_the_broker,
            needs_groups,
            90,
            "what a handler publishes carries the handled event's correlation and causation ids across the broker; versions survive and an upcaster brings v1 to v2"
        ),
        case!(
            browse::browse_reads_without_consuming,
            needs_browse,
            90,
            "browsing reads a topic without a group: all messages oldest first (each key in order), a limit, from a time; an unknown topic is empty; the group still gets every message, first attempt"
        ),
        case!(
            lag::consumer_lag,
            needs_lag,
            120,
            "a group's lag is what it has not received: 0 before, N after N publishes, 0 once all are acked; 0 for an unknown group or topic"
        ),
        case!(
            telemetry::metrics_count_a_known_workload,
            needs_groups,
            90,
            "a known workload (5 published, one nacked once) shows in the metrics: sent, consumed, acked, nacked, publish durations, and the lag gauge where the backend reads lag"
        ),
        case!(
            telemetry::trace_crosses_the_broker,
            needs_otel,
            90,
            "with OpenTelemetry (feature otel), the handler span continues the publisher's trace across the broker, and what the handler publishes carries it on (traceparent read back)"
        ),
        case!(
            start::start_position_latest,
            needs_groups,
            60,
            "a new group at latest sees only messages published after it exists"
        ),
        case!(
            start::start_position_earliest,
            needs_replay,
            60,
            "a new group at earliest replays retained messages"
        ),
        case!(
            delayed::delayed_publish,
            needs_delay,
            60,
            "a delayed message arrives no sooner than its delay"
        ),
        case!(
            input::large_payload,
            needs_max_bytes,
            60,
            "a message of message_max_bytes arrives intact; one byte more is PayloadTooLarge"
        ),
        case!(
            input::bad_input,
            needs_groups,
            60,
            "bad topics, settling twice and publishing after close are typed errors"
        ),
        case!(
            input::longest_names,
            needs_groups,
            90,
            "the longest topic and group names work end to end, dead letters included"
        ),
        case!(
            input::extreme_values,
            needs_groups,
            60,
            "the longest durations and metadata are typed errors, never panics; a batch holding one publishes nothing"
        ),
        case!(
            capabilities::unsupported_is_typed,
            needs_nothing,
            60,
            "every capability declared off answers Unsupported"
        ),
    ]
}
