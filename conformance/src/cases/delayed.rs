//! Delayed publish.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use busbar_core::{Message, PublishOptions};

use crate::support::{body, latest, Ctx};
use crate::Outcome;

/// A message published with a delay arrives no sooner than the delay, after an undelayed
/// message published later.
pub async fn delayed_publish(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let delay = Duration::from_secs(2);
    let published = Instant::now();
    bus.publish(
        &topic,
        Message::new("delayed").with_key("k1"),
        &PublishOptions::default().delay(delay),
    )
    .await?;
    bus.publish(
        &topic,
        Message::new("now").with_key("k2"),
        &PublishOptions::default(),
    )
    .await?;
    let mut order = Vec::new();
    let mut delayed_after = None;
    while delayed_after.is_none() {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| anyhow!("not every message arrived; got {order:?}"))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        let b = body(&d);
        if b == "delayed" {
            delayed_after = Some(published.elapsed());
        }
        order.push(b);
        d.ack().await?;
    }
    let after = delayed_after.unwrap_or_default();
    ensure!(
        after >= delay,
        "the delayed message arrived after {after:?}, before its {delay:?} delay"
    );
    ensure!(
        order.first().map(String::as_str) == Some("now"),
        "arrival order {order:?}"
    );
    sub.close().await?;
    Ok(Outcome::ok().note(format!("arrived after {after:.2?} for a {delay:?} delay")))
}
