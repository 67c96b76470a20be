//! With the `otel` feature, a trace crosses the broker: the consumer runner's handler span
//! continues the trace of the span the message was published in (memory backend; every
//! backend carries the `traceparent` header as it carries any header).
#![allow(clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use busbar_core::memory::MemoryBus;
use busbar_core::{Consumer, EventBus, Message, PublishOptions, StartPosition};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_span_continues_the_publishers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("busbar-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let bus = MemoryBus::new();
    let consumer = Consumer::new(Arc::new(bus.clone()) as Arc<dyn EventBus>, "orders")
        .group("billing")
        .start(StartPosition::Earliest);
    bus.provision("orders", &consumer.subscribe_options())
        .await
        .expect("provision");
    let message = Message::new("traced");
    let id = message.id.clone();
    bus.publish("orders", message, &PublishOptions::default())
        .instrument(tracing::info_span!("checkout"))
        .await
        .expect("publish");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let report = consumer
        .run_until(
            move |e: busbar_core::Event| {
                let s = s.clone();
                async move {
                    *s.lock().map_err(|_| "poisoned")? =
                        e.headers().get("traceparent").map(str::to_owned);
                    Ok::<(), &str>(())
                }
            },
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .expect("run");
    assert_eq!(report.processed, 1, "{report:?}");
    let traceparent = seen.lock().expect("lock").clone();
    assert!(
        traceparent.as_deref().is_some_and(|t| t.starts_with("00-")),
        "the message carries a W3C traceparent: {traceparent:?}"
    );
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let named = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no {name} span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let checkout = named("checkout");
    let publish = named("busbar.publish");
    let process = named("busbar.process");
    let trace = checkout.span_context.trace_id();
    assert_eq!(
        publish.span_context.trace_id(),
        trace,
        "publish is in the caller's trace"
    );
    assert_eq!(
        process.span_context.trace_id(),
        trace,
        "the handler span of message {id} continues the publisher's trace"
    );
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
}
