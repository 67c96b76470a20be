//! The metrics a known workload reports, through the backend under test.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};
use busbar_core::telemetry::{ACKED, CONSUMED, CONSUMER_LAG, NACKED, OPERATION_DURATION, SENT};
use busbar_core::{Message, NackAction, PublishOptions};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use crate::support::{latest, Ctx};
use crate::Outcome;

/// The process's debugging recorder, installed by the first telemetry case (before its bus
/// registers any metric of its fresh topic); `None` when another recorder came first.
fn snapshotter() -> Option<&'static Snapshotter> {
    static SNAP: OnceLock<Option<Snapshotter>> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().ok().map(|()| snapshotter)
    })
    .as_ref()
}

/// One telemetry case at a time per process: a snapshot drains every counter.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 3 messages in a batch and 2 alone, one of them nacked once: sent 5, consumed 6, acked 5,
/// nacked 1, 2 publish durations; where the backend reads lag, the gauge says 0 at the end.
pub async fn metrics_count_a_known_workload(ctx: Ctx) -> Result<Outcome> {
    let snap = snapshotter().ok_or_else(|| anyhow!("another metrics recorder is installed"))?;
    let _one = ONE_AT_A_TIME.lock().await;
    let bus = ctx.bus.clone();
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let batch = (0..3)
        .map(|i| Message::new(format!("m{i}")).with_key("k"))
        .collect();
    bus.publish_batch(&topic, batch, &PublishOptions::default())
        .await?;
    for i in 3..5 {
        bus.publish(
            &topic,
            Message::new(format!("m{i}")).with_key("k"),
            &PublishOptions::default(),
        )
        .await?;
    }
    let (mut acked, mut nacked) = (0, false);
    while acked < 5 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| anyhow!("only {acked} of 5 messages were acked"))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        if &d.payload()[..] == b"m1" && !nacked {
            d.nack(NackAction::Redeliver).await?;
            nacked = true;
        } else {
            d.ack().await?;
            acked += 1;
        }
    }
    let lag = if bus.capabilities().consumer_lag {
        let started = std::time::Instant::now();
        loop {
            let lag = bus.lag(&topic, &group).await?;
            if lag == 0 || started.elapsed() > Duration::from_secs(30) {
                break Some(lag);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        None
    };
    sub.close().await?;
    let all = snap.snapshot().into_vec();
    let find = |name: &str, with_group: bool| {
        all.iter()
            .find(|(k, _, _, _)| {
                let key = k.key();
                let has = |l: &str, v: &str| key.labels().any(|x| x.key() == l && x.value() == v);
                key.name() == name
                    && has("messaging.destination.name", &topic)
                    && has("messaging.system", bus.backend())
                    && (!with_group || has("messaging.consumer.group.name", &group))
            })
            .map(|(_, _, _, v)| v)
    };
    let counter = |name: &str, with_group: bool| match find(name, with_group) {
        Some(DebugValue::Counter(n)) => Ok(*n),
        other => Err(anyhow!("{name}: {other:?}")),
    };
    let sent = counter(SENT, false)?;
    let consumed = counter(CONSUMED, true)?;
    let acks = counter(ACKED, true)?;
    let nacks = counter(NACKED, true)?;
    ensure!(sent == 5, "{SENT} = {sent}, expected 5");
    ensure!(
        consumed >= 6,
        "{CONSUMED} = {consumed}, expected 6 (5 + 1 redelivery; more only with duplicates)"
    );
    ensure!(
        acks == 5 && nacks == 1,
        "{ACKED} = {acks}, {NACKED} = {nacks}"
    );
    match find(OPERATION_DURATION, false) {
        Some(DebugValue::Histogram(v)) if v.len() == 3 => {}
        other => bail!("{OPERATION_DURATION}: {other:?}, expected 3 samples (3 publish calls)"),
    }
    if let Some(lag) = lag {
        match find(CONSUMER_LAG, true) {
            Some(DebugValue::Gauge(v)) if v.into_inner() == lag as f64 => {}
            other => bail!("{CONSUMER_LAG}: {other:?}, lag() said {lag}"),
        }
        ensure!(lag == 0, "the lag stayed {lag} after everything was acked");
    }
    Ok(Outcome::ok().note(format!(
        "sent {sent}, consumed {consumed}, acked {acks}, nacked {nacks}{}",
        lag.map_or(String::new(), |l| format!(", lag gauge {l}"))
    )))
}

/// A trace crosses the broker twice (feature `otel`): a message published in a span reaches
/// the runner's handler, whose `busbar.process` span continues the publisher's trace as a
/// child of `busbar.publish`; what the handler publishes carries the same trace on to the
/// next topic (its W3C `traceparent` read back there), its publish span a child of the
/// handler's; the runner's ack is a `busbar.settle` span under the handler's.
#[cfg(feature = "otel")]
pub async fn trace_crosses_the_broker(ctx: Ctx) -> Result<Outcome> {
    use busbar_core::{Consumer, Event, StartPosition};
    use opentelemetry::trace::TraceId;
    use opentelemetry_sdk::trace::SpanData;
    use tracing::Instrument;

    let capture = crate::capture::install()
        .ok_or_else(|| anyhow!("another tracing subscriber is installed"))?;
    let bus = ctx.bus.clone();
    let (first, next) = (ctx.topic("first"), ctx.topic("next"));
    let group = ctx.group("g");
    let check_group = ctx.group("check");
    bus.provision(&first, &latest(&group)).await?;
    bus.provision(&next, &latest(&check_group)).await?;
    let mut check = bus.subscribe(&next, latest(&check_group)).await?;

    let (b, n) = (bus.clone(), next.clone());
    let consumer = Consumer::new(bus.clone(), &first)
        .group(&group)
        .start(StartPosition::Latest);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run_until(
        move |e: Event| {
            let (b, n) = (b.clone(), n.clone());
            async move {
                let reply = Message::new(format!("after {}", e.id())).with_key("k");
                b.publish(&n, reply, &PublishOptions::default()).await
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let root = tracing::info_span!("busbar.conformance.traced", case.topic = %first);
    bus.publish(
        &first,
        Message::new("traced").with_key("k"),
        &PublishOptions::default(),
    )
    .instrument(root)
    .await?;
    let d = tokio::time::timeout(Duration::from_secs(60), check.next())
        .await
        .map_err(|_| anyhow!("the handler's message never arrived on the next topic"))??
        .ok_or_else(|| anyhow!("the subscription ended early"))?;
    let carried = d.headers().get("traceparent").map(str::to_owned);
    d.ack().await?;
    let _ = stop_tx.send(());
    let report = run.await??;
    ensure!(report.processed == 1, "the runner processed {report:?}");
    check.close().await?;

    capture.provider.force_flush()?;
    let spans = capture.exporter.get_finished_spans()?;
    let attr = |s: &SpanData, key: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let find = |name: &str, topic: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == name
                    && (attr(s, "case.topic").as_deref() == Some(topic)
                        || attr(s, "messaging.destination.name").as_deref() == Some(topic))
            })
            .ok_or_else(|| {
                anyhow!(
                    "no {name} span of {topic} was exported (spans: {:?})",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
    };
    let root = find(crate::capture::TRACED_ROOT, &first)?;
    let trace = root.span_context.trace_id();
    let publish = find("busbar.publish", &first)?;
    let process = find("busbar.process", &first)?;
    let publish_next = find("busbar.publish", &next)?;
    let settle = find("busbar.settle", &first)?;
    for (what, span) in [
        ("publish", publish),
        ("handler", process),
        ("handler's publish", publish_next),
        ("ack", settle),
    ] {
        ensure!(
            span.span_context.trace_id() == trace,
            "the {what} span is in trace {}, not the publisher's {trace}",
            span.span_context.trace_id()
        );
    }
    ensure!(
        publish.parent_span_id == root.span_context.span_id(),
        "publish is not a child of the caller's span"
    );
    ensure!(
        process.parent_span_id == publish.span_context.span_id(),
        "the handler span is not a child of the publish span"
    );
    ensure!(
        publish_next.parent_span_id == process.span_context.span_id(),
        "the handler's publish is not a child of the handler span"
    );
    ensure!(
        settle.parent_span_id == process.span_context.span_id()
            && attr(settle, "messaging.operation.name").as_deref() == Some("ack"),
        "the ack is not a settle span under the handler span"
    );
    let carried_trace = carried
        .as_deref()
        .and_then(|t| t.split('-').nth(1))
        .and_then(|t| TraceId::from_hex(t).ok());
    ensure!(
        carried_trace == Some(trace),
        "the handler's message carries traceparent {carried:?}, not trace {trace}"
    );
    Ok(Outcome::ok().note(format!(
        "trace {trace}: publish → handler (→ ack) → publish → read"
    )))
}

/// Without the `otel` feature there is nothing to trace with: the case is declared off.
#[cfg(not(feature = "otel"))]
pub async fn trace_crosses_the_broker(_ctx: Ctx) -> Result<Outcome> {
    bail!("busbar-conformance was built without its otel feature")
}
