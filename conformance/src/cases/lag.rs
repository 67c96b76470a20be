//! Consumer lag: how many messages a group has not received yet.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use busbar_core::EventBus;

use crate::support::{keyed, latest, publish_all, Ctx};
use crate::Outcome;

/// Polls the lag until it is `want` (brokers update some counts a moment later).
async fn lag_becomes(
    bus: &dyn EventBus,
    topic: &str,
    group: &str,
    want: u64,
    within: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < within {
        let lag = bus.lag(topic, group).await?;
        if lag == want {
            return Ok(started.elapsed());
        }
        last = Some(lag);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the lag of {group} on {topic} stayed {last:?}, expected {want} within {within:?}")
}

/// 0 before anything is published, N after N publishes, 0 once the group acked them all;
/// a group or topic that does not exist has no lag.
pub async fn consumer_lag(ctx: Ctx) -> Result<Outcome> {
    const N: usize = 20;
    let bus = ctx.bus.clone();
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    bus.provision(&topic, &latest(&group)).await?;
    let within = Duration::from_secs(30);
    lag_becomes(bus.as_ref(), &topic, &group, 0, within).await?;
    let ids = publish_all(
        bus.as_ref(),
        &topic,
        (0..N)
            .map(|i| keyed(&format!("k{}", i % 4), i / 4))
            .collect(),
    )
    .await?;
    let seen_after = lag_becomes(bus.as_ref(), &topic, &group, N as u64, within).await?;
    let unknown = bus.lag(&topic, &ctx.group("nobody")).await?;
    let nowhere = bus.lag(&ctx.topic("nowhere"), &group).await?;
    if unknown != 0 || nowhere != 0 {
        bail!("an unknown group has lag {unknown}, an unknown topic {nowhere}: expected 0");
    }
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let mut left: std::collections::HashSet<String> = ids.into_iter().collect();
    // Reading the lag while a member consumes (as the runner's gauge and operators do) must
    // not disturb it.
    let during = bus.lag(&topic, &group).await?;
    while !left.is_empty() {
        let d = tokio::time::timeout(within, sub.next())
            .await
            .map_err(|_| anyhow!("{} messages never arrived", left.len()))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        left.remove(d.id());
        d.ack().await?;
        if left.len() % 5 == 0 {
            bus.lag(&topic, &group).await?;
        }
    }
    let drained = lag_becomes(bus.as_ref(), &topic, &group, 0, within).await?;
    sub.close().await?;
    Ok(Outcome::ok().note(format!(
        "lag {N} seen {:.1} s after publishing, {during} as a member joined, 0 seen {:.1} s after the last ack",
        seen_after.as_secs_f64(),
        drained.as_secs_f64()
    )))
}
