//! For backend authors: the [`Backend`] trait a broker backend implements, the toolkit every
//! backend needs the same way (in-flight tracking, ack coalescing, name fitting, URL
//! credentials), and the pieces of a [`Delivery`] only a backend builds.
//!
//! Less stable than the application API, and not re-exported by the `busbar` facade.
//! Applications never need anything here: they hold a [`crate::Bus`] (or an
//! `Arc<dyn EventBus>`), which does every check of the contract once, in front of the
//! backend, and dead-letters through one path. A backend only translates to its broker.

mod backend;
pub mod cloudevents;
pub mod coalesce;
pub mod inflight;
pub mod ownership;
pub mod tls;
mod url_options;

pub use crate::bus::{check_publish, Ack};
pub use crate::error::BoxError;
pub use crate::options::check_duration;
pub use crate::partition::partition_for;
pub use crate::registry::{redact_url, BackendEntry, ConnectFn, Registry};
pub use backend::{connect_boxed, known, Backend, Connect, Identity};
pub use url_options::{UrlOption, UrlOptions};

/// Puts messages published now into the event chain of the handler running in this task (its
/// correlation id, its event's id as causation id), as the front door does for every publish:
/// for code that keeps messages to publish later, such as the transactional outbox. Messages
/// that already have a correlation id are left alone.
pub fn join_chain(messages: &mut [crate::Message]) {
    crate::runner::inherit(messages);
}

use crate::bus::{Delivery, Event};

/// Merges the messages of several partitions (each oldest first) into one list of at most
/// `limit`, oldest first, keeping each partition's own order (so each key's): the next one
/// is always the earliest of the partitions' heads (ties: the lower partition).
pub fn merge_by_time(partitions: Vec<Vec<crate::Message>>, limit: usize) -> Vec<crate::Message> {
    let mut heads: Vec<std::collections::VecDeque<crate::Message>> =
        partitions.into_iter().map(Into::into).collect();
    let mut out = Vec::new();
    while out.len() < limit {
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.front().map(|m| (m.time, i)))
            .min();
        let Some((_, i)) = next else { break };
        if let Some(m) = heads[i].pop_front() {
            out.push(m);
        }
    }
    out
}

/// A delivery of `event`, settled through `acker` (what a backend's subscriber returns).
pub fn delivery(event: Event, acker: Box<dyn Ack>) -> Delivery {
    Delivery::new(event, acker)
}

/// A delivery the backend could not decode as busbar's: `event` holds what could be read
/// (the raw payload, the broker's headers, a position-derived id). The [`crate::Bus`] in
/// front dead-letters it at once with `error` as the reason, through the same path as every
/// dead letter, and never hands it to the application.
pub fn undecodable(event: Event, acker: Box<dyn Ack>, error: impl Into<String>) -> Delivery {
    Delivery::new(event, acker).undecodable(error.into())
}

/// Decodes the percent-escapes of a URL's user name or password, for backends reading
/// credentials from their URL: `%2B` is `+`, `%40` is `@`, and a literal `+` stays `+` (it
/// means a space only in query strings; AWS secret keys contain it).
pub fn decode_userinfo(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `name` as it is when it is at most `max` bytes, else its start, `-` and 32 hex digits of a
/// UUIDv5 of the whole name, `max` bytes in all: every valid busbar name maps to a broker
/// name within the broker's limit, distinct names stay distinct (but for a hash collision),
/// and names that fit keep the layout a backend documents. `max` below 40 is raised to 40.
pub fn fit_name(name: &str, max: usize) -> String {
    let max = max.max(40);
    if name.len() <= max {
        return name.to_owned();
    }
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple();
    let mut keep = max - 33;
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}-{hash}", &name[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_fit_and_stay_distinct() {
        assert_eq!(fit_name("short", 255), "short");
        let a = fit_name(&"a".repeat(300), 255);
        let b = fit_name(&format!("{}b", "a".repeat(299)), 255);
        assert_eq!((a.len(), b.len()), (255, 255));
        assert_ne!(a, b);
        assert_eq!(a, fit_name(&"a".repeat(300), 255), "stable");
        let wide = fit_name(&"é".repeat(200), 101);
        assert!(wide.len() <= 101);
    }

    #[test]
    fn userinfo_decoding_keeps_plus_signs() {
        assert_eq!(decode_userinfo("wJal+rXUtn/K7MDENG"), "wJal+rXUtn/K7MDENG");
        assert_eq!(decode_userinfo("a%2Bb%40c%3Ad"), "a+b@c:d");
        assert_eq!(decode_userinfo("x&y=z"), "x&y=z");
        assert_eq!(decode_userinfo("%ff"), "\u{fffd}");
    }
}
