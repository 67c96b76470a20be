//! Where a new consumer group starts.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use busbar_core::StartPosition;

use crate::support::{collect, expect_silence, keyed, latest, opts, publish_all, Ctx};
use crate::Outcome;

/// A new group at `latest` sees only messages published after it exists.
pub async fn start_position_latest(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let bus = &ctx.bus;
    // The topic exists and has history before the group is created.
    bus.provision(&topic, &latest(&ctx.group("other"))).await?;
    let old: HashSet<String> = publish_all(
        bus.as_ref(),
        &topic,
        (0..10).map(|i| keyed("old", i)).collect(),
    )
    .await?
    .into_iter()
    .collect();
    let group = ctx.group("late");
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let new: HashSet<String> = publish_all(
        bus.as_ref(),
        &topic,
        (0..5).map(|i| keyed("new", i)).collect(),
    )
    .await?
    .into_iter()
    .collect();
    // `collect` is strict: an old message arriving fails the case.
    let got = collect(&mut sub, &new, Duration::from_secs(45), true).await?;
    let dups = expect_silence(&mut sub, Duration::from_millis(500), &new).await?;
    drop(old);
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates + dups))
}

/// A new group at `earliest` replays the retained messages, then gets new ones.
pub async fn start_position_earliest(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&ctx.group("other"))).await?;
    let old = publish_all(
        bus.as_ref(),
        &topic,
        (0..10).map(|i| keyed("old", i)).collect(),
    )
    .await?;
    let group = ctx.group("early");
    let o = opts(&group).start(StartPosition::Earliest);
    let mut sub = bus.subscribe(&topic, o).await?;
    let new = publish_all(
        bus.as_ref(),
        &topic,
        (0..5).map(|i| keyed("new", i)).collect(),
    )
    .await?;
    let all: HashSet<String> = old.into_iter().chain(new).collect();
    let got = collect(&mut sub, &all, Duration::from_secs(45), true).await?;
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates))
}
