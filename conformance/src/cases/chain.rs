//! The event chain across the broker: correlation and causation ids, and event versions.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use busbar_core::envelope::{CAUSATION_ID, CORRELATION_ID};
use busbar_core::{Consumer, Event, Message, PublishOptions, StartPosition};

use crate::support::{latest, wait_for, Ctx};
use crate::Outcome;

/// What the handler saw: payload, version, correlation id.
type Seen = (String, Option<u32>, String);

/// A handler of the runner publishes two events: they arrive (through the broker, twice)
/// with the root's correlation id and the handled event's id as causation id; the version
/// and ids survive, and the consumer's upcaster brings the v1 root to v2.
pub async fn chain_crosses_the_broker(ctx: Ctx) -> Result<Outcome> {
    let bus = ctx.bus.clone();
    let (orders, invoices) = (ctx.topic("orders"), ctx.topic("invoices"));
    let group = ctx.group("g");
    bus.provision(&orders, &latest(&group)).await?;
    // A group of this run's own: on Kafka a group name shared with other runs rebalances
    // with their members (a previous process's linger until their session times out).
    let check_group = ctx.group("check");
    bus.provision(&invoices, &latest(&check_group)).await?;
    let mut check = bus.subscribe(&invoices, latest(&check_group)).await?;

    let root = Message::new("total=42")
        .with_key("order-42")
        .with_type("order.placed");
    let root_id = root.id.clone();
    let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
    let (s, b, inv) = (seen.clone(), bus.clone(), invoices.clone());
    let consumer = Consumer::new(bus.clone(), &orders)
        .group(&group)
        .start(StartPosition::Latest)
        .upcast("order.placed", 1, 2, |mut m: Message| {
            let body = String::from_utf8(m.payload.to_vec()).map_err(|e| e.to_string())?;
            m.payload = body.replace("total", "amount").into();
            Ok::<_, String>(m)
        });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run_until(
        move |e: Event| {
            let (s, b, inv) = (s.clone(), b.clone(), inv.clone());
            async move {
                let body = String::from_utf8_lossy(e.payload()).into_owned();
                s.lock().map_err(|_| "poisoned lock".to_owned())?.push((
                    body,
                    e.version(),
                    e.correlation_id().to_owned(),
                ));
                let invoice = Message::new("invoice for order 42")
                    .with_key("order-42")
                    .with_type("invoice.created")
                    .with_version(3);
                b.publish(&inv, invoice, &PublishOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let own = Message::new("audit").with_correlation_id("saga-7");
                b.publish(&inv, own, &PublishOptions::default())
                    .await
                    .map_err(|e| e.to_string())
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    bus.publish(&orders, root, &PublishOptions::default())
        .await?;
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(30), check.next())
            .await
            .map_err(|_| anyhow!("the handler's events never arrived (got {})", got.len()))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        got.push(d.message().clone());
        d.ack().await?;
    }
    wait_for(Duration::from_secs(10), "the handler's record", || {
        seen.lock().map(|s| !s.is_empty()).unwrap_or(true)
    })
    .await?;
    let _ = stop_tx.send(());
    let report = run.await.context("runner task")??;
    ensure!(report.processed == 1, "runner report: {report:?}");
    let seen = seen.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    ensure!(
        seen == vec![("amount=42".to_owned(), Some(2), root_id.clone())],
        "the handler saw {seen:?}: expected the root upcast to v2"
    );
    got.sort_by_key(|m| m.payload.len());
    let (audit, invoice) = (&got[0], &got[1]);
    ensure!(
        invoice.headers.get(CORRELATION_ID) == Some(root_id.as_str())
            && invoice.headers.get(CAUSATION_ID) == Some(root_id.as_str()),
        "the invoice is not in the order's chain: headers {:?}",
        invoice.headers
    );
    ensure!(
        invoice.version() == Some(3),
        "the invoice's version: {:?}",
        invoice.version()
    );
    ensure!(
        audit.correlation_id() == "saga-7" && audit.causation_id().is_none(),
        "a chain the application set is kept: headers {:?}",
        audit.headers
    );
    Ok(Outcome::ok())
}
