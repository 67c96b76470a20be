//! The process's `tracing` subscriber: the test log of `BUSBAR_TEST_LOG` and, with the `otel`
//! feature, an OpenTelemetry layer exporting to memory the spans of the traces the
//! `telemetry::trace_crosses_the_broker` case starts — and nothing else, so the other cases'
//! messages carry no `traceparent` and no span piles up in memory.

use std::sync::OnceLock;

/// Name of the root span a traced case starts; the only root span the exporter keeps.
#[cfg(feature = "otel")]
pub(crate) const TRACED_ROOT: &str = "busbar.conformance.traced";

/// What the traced case reads its spans from.
#[cfg(feature = "otel")]
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) provider: opentelemetry_sdk::trace::SdkTracerProvider,
    pub(crate) exporter: opentelemetry_sdk::trace::InMemorySpanExporter,
}

#[cfg(not(feature = "otel"))]
#[derive(Debug)]
pub(crate) struct Capture;

/// Installs the process's subscriber once (the first call wins; later calls return what it
/// installed). `None` when another global subscriber was there first.
pub(crate) fn install() -> Option<&'static Capture> {
    static INSTALLED: OnceLock<Option<Capture>> = OnceLock::new();
    INSTALLED.get_or_init(try_install).as_ref()
}

#[cfg(not(feature = "otel"))]
fn try_install() -> Option<Capture> {
    use tracing_subscriber::layer::SubscriberExt;
    let registry = tracing_subscriber::registry().with(log_layer());
    tracing::subscriber::set_global_default(registry)
        .ok()
        .map(|()| Capture)
}

#[cfg(feature = "otel")]
fn try_install() -> Option<Capture> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(OnlyTracedRoots)))
        .with_simple_exporter(exporter.clone())
        .build();
    // Spans under a traced root, and the runner's handler spans (they continue whatever
    // context their delivery carries; the sampler drops those of untraced messages, and
    // what such a handler publishes is unsampled).
    fn wanted<S: tracing::Subscriber + for<'a> LookupSpan<'a>>(
        meta: &tracing::Metadata<'_>,
        cx: &Context<'_, S>,
    ) -> bool {
        if !meta.is_span() {
            return false;
        }
        if meta.name() == TRACED_ROOT || meta.name() == "busbar.process" {
            return true;
        }
        cx.lookup_current().is_some_and(|s| {
            s.scope()
                .any(|a| a.name() == TRACED_ROOT || a.name() == "busbar.process")
        })
    }
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("busbar-conformance"))
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(wanted));
    let registry = tracing_subscriber::registry().with(log_layer()).with(otel);
    tracing::subscriber::set_global_default(registry).ok()?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Some(Capture { provider, exporter })
}

/// With `BUSBAR_TEST_LOG` set (a `tracing` filter such as `busbar_amqp=debug,lapin=trace`),
/// logs go to stderr.
fn log_layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let filter = std::env::var("BUSBAR_TEST_LOG").ok()?;
    Some(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_filter(tracing_subscriber::EnvFilter::new(filter)),
    )
}

/// Samples a root span only when it is a traced case's root; children follow their parent.
#[cfg(feature = "otel")]
#[derive(Debug, Clone)]
struct OnlyTracedRoots;

#[cfg(feature = "otel")]
impl opentelemetry_sdk::trace::ShouldSample for OnlyTracedRoots {
    fn should_sample(
        &self,
        _parent: Option<&opentelemetry::Context>,
        _trace_id: opentelemetry::trace::TraceId,
        name: &str,
        _kind: &opentelemetry::trace::SpanKind,
        _attributes: &[opentelemetry::KeyValue],
        _links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        use opentelemetry::trace::TraceState;
        use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult};
        SamplingResult {
            decision: if name == TRACED_ROOT {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: TraceState::default(),
        }
    }
}
