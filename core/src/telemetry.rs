//! Metrics and span names: what the front door ([`crate::Bus`]), deliveries and the consumer
//! runner report, through the `metrics` facade (no exporter forced on applications: install
//! any `metrics` recorder, before connecting, to collect them) and `tracing` spans.
//!
//! Names follow the OpenTelemetry messaging semantic conventions where they have one
//! (`messaging.client.sent.messages`, `messaging.client.consumed.messages`,
//! `messaging.client.operation.duration`, `messaging.process.duration`); busbar's own
//! settle outcomes are `busbar.messages.*`. Every metric carries `messaging.system` (the
//! backend), `messaging.destination.name` (the topic) and, on the consumer side,
//! `messaging.consumer.group.name`.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use metrics::{Counter, Histogram};

/// `messaging.system`: the backend's name.
pub const SYSTEM: &str = "messaging.system";
/// `messaging.destination.name`: the topic.
pub const DESTINATION: &str = "messaging.destination.name";
/// `messaging.consumer.group.name`: the consumer group.
pub const GROUP: &str = "messaging.consumer.group.name";
/// `messaging.operation.type`: `send`, `receive`, `process`, `settle`.
pub const OPERATION: &str = "messaging.operation.type";
/// `messaging.message.id`.
pub const MESSAGE_ID: &str = "messaging.message.id";
/// `messaging.batch.message_count`.
pub const BATCH_COUNT: &str = "messaging.batch.message_count";

/// Messages a publish had accepted by the broker (counter).
pub const SENT: &str = "messaging.client.sent.messages";
/// Duration of a publish call, in seconds (histogram).
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// Deliveries handed to the application (counter).
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// Duration of a runner handler call, in seconds (histogram).
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Deliveries acked (counter).
pub const ACKED: &str = "busbar.messages.acked";
/// Deliveries handed back for redelivery (counter).
pub const NACKED: &str = "busbar.messages.nacked";
/// Deliveries dead-lettered: published to the dead-letter topic and acked (counter).
pub const DEAD_LETTERED: &str = "busbar.messages.dead_lettered";
/// Handler failures the runner retries in-process (counter).
pub const RETRIED: &str = "busbar.messages.retried";

/// Messages a group has not received yet, per topic and group (gauge): set by
/// [`crate::EventBus::lag`], which the consumer runner calls every
/// [`crate::Consumer::lag_interval`] where the backend has capability `consumer_lag`.
pub const CONSUMER_LAG: &str = "busbar.consumer.lag";

pub(crate) fn record_lag(system: &'static str, topic: &str, group: &str, lag: u64) {
    metrics::gauge!(
        CONSUMER_LAG,
        SYSTEM => system,
        DESTINATION => topic.to_owned(),
        GROUP => group.to_owned()
    )
    .set(lag as f64);
}

/// The publish handles of one topic, registered once.
#[derive(Clone)]
pub(crate) struct PublishMetrics {
    pub(crate) sent: Counter,
    pub(crate) duration: Histogram,
}

/// Publish handles per topic (registering labels on every publish would allocate each time).
#[derive(Default)]
pub(crate) struct PublishRegistry {
    topics: RwLock<HashMap<Box<str>, Arc<PublishMetrics>>>,
}

impl PublishRegistry {
    pub(crate) fn get(&self, system: &'static str, topic: &str) -> Arc<PublishMetrics> {
        if let Some(m) = self
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
        {
            return m.clone();
        }
        let labels = [(SYSTEM, system.to_owned()), (DESTINATION, topic.to_owned())];
        let m = Arc::new(PublishMetrics {
            sent: metrics::counter!(SENT, &labels),
            duration: metrics::histogram!(OPERATION_DURATION, &labels),
        });
        self.topics
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(topic.into())
            .or_insert(m)
            .clone()
    }
}

/// The consumer-side handles of one subscription, registered once.
pub(crate) struct SubscriptionMetrics {
    pub(crate) consumed: Counter,
    pub(crate) acked: Counter,
    pub(crate) nacked: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) retried: Counter,
    pub(crate) process: Histogram,
}

impl SubscriptionMetrics {
    pub(crate) fn new(system: &'static str, topic: &str, group: &str) -> Self {
        let labels = [
            (SYSTEM, system.to_owned()),
            (DESTINATION, topic.to_owned()),
            (GROUP, group.to_owned()),
        ];
        Self {
            consumed: metrics::counter!(CONSUMED, &labels),
            acked: metrics::counter!(ACKED, &labels),
            nacked: metrics::counter!(NACKED, &labels),
            dead_lettered: metrics::counter!(DEAD_LETTERED, &labels),
            retried: metrics::counter!(RETRIED, &labels),
            process: metrics::histogram!(PROCESS_DURATION, &labels),
        }
    }
}

/// W3C trace context across the broker (feature `otel`): the context of the `busbar.publish`
/// span is injected into each message's headers by the application's global OpenTelemetry
/// text-map propagator (`opentelemetry::global::set_text_map_propagator`, e.g. the W3C
/// `TraceContextPropagator`: headers `traceparent` and `tracestate`), and the consumer
/// runner's `busbar.process` span continues the context it extracts from the delivery.
/// Headers a message already carries (`traceparent` set by the application, or by another
/// producer) are kept. Spans reach OpenTelemetry through a `tracing_opentelemetry` layer.
#[cfg(feature = "otel")]
pub(crate) mod otel {
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use crate::message::{Headers, Message};

    struct Inject<'a>(&'a mut Headers);

    impl Injector for Inject<'_> {
        fn set(&mut self, key: &str, value: String) {
            if self.0.get(key).is_none() {
                self.0.insert(key, value);
            }
        }
    }

    struct Extract<'a>(&'a Headers);

    impl Extractor for Extract<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| k).collect()
        }
    }

    /// Writes the context of `span` into the headers of `messages`.
    pub(crate) fn inject(span: &tracing::Span, messages: &mut [Message]) {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return;
        }
        opentelemetry::global::get_text_map_propagator(|p| {
            for m in messages.iter_mut() {
                p.inject_context(&cx, &mut Inject(&mut m.headers));
            }
        });
    }

    /// Makes `span` continue the context carried by `headers`, if any.
    pub(crate) fn continue_from(span: &tracing::Span, headers: &Headers) {
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}
