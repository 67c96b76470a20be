//! Reading a topic without a consumer group (capability `browse`).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use busbar_core::{BrowseOptions, Message, PublishOptions};

use crate::support::{latest, Ctx};
use crate::Outcome;

/// Five messages over two keys, three before a moment and two after: browsing from the
/// earliest returns all five (each key in order), a limit cuts the list, browsing from the
/// moment returns the last two, an unknown topic is empty — and the group provisioned before
/// still receives all five, first attempt, nothing consumed by the browsing.
pub async fn browse_reads_without_consuming(ctx: Ctx) -> Result<Outcome> {
    let bus = ctx.bus.clone();
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    bus.provision(&topic, &latest(&group)).await?;
    let make = |body: &str, key: &str| Message::new(body.to_owned()).with_key(key);
    let before = [make("a1", "a"), make("b1", "b"), make("a2", "a")];
    for m in &before {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let moment = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Made now: where the broker has no clock of its own, a message's time is its own.
    let after = [make("b2", "b"), make("a3", "a")];
    for m in &after {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    let body = |m: &Message| String::from_utf8_lossy(&m.payload).into_owned();
    let all = bus.browse(&topic, &BrowseOptions::earliest(100)).await?;
    let bodies: Vec<String> = all.iter().map(body).collect();
    ensure!(
        all.len() == 5,
        "browse from the earliest returned {bodies:?}"
    );
    for key in ["a", "b"] {
        let of_key: Vec<&String> = bodies.iter().filter(|b| b.starts_with(key)).collect();
        let mut sorted = of_key.clone();
        sorted.sort();
        ensure!(of_key == sorted, "key {key} out of order: {bodies:?}");
    }
    let sent: HashSet<&str> = before.iter().chain(&after).map(|m| m.id.as_str()).collect();
    ensure!(
        all.iter().all(|m| sent.contains(m.id.as_str())),
        "browse returned other ids than the published ones"
    );
    let two = bus.browse(&topic, &BrowseOptions::earliest(2)).await?;
    ensure!(two.len() == 2, "a limit of 2 returned {}", two.len());
    let late = bus
        .browse(&topic, &BrowseOptions::since(moment, 100))
        .await?;
    let mut late_bodies: Vec<String> = late.iter().map(body).collect();
    late_bodies.sort();
    ensure!(
        late_bodies == ["a3", "b2"],
        "browse from a moment between the publishes returned {late_bodies:?}"
    );
    let none = bus
        .browse(&ctx.topic("never"), &BrowseOptions::earliest(10))
        .await?;
    ensure!(
        none.is_empty(),
        "an unknown topic returned {} messages",
        none.len()
    );
    let bad = bus.browse(&topic, &BrowseOptions::earliest(0)).await;
    ensure!(
        bad.as_ref()
            .is_err_and(|e| e.kind() == busbar_core::ErrorKind::InvalidInput),
        "a limit of 0 answered {bad:?}"
    );
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| anyhow!("the group received {} of 5 after browsing", got.len()))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        ensure!(
            d.attempt() == 1 || !bus.capabilities().exact_attempts,
            "{} arrived as attempt {} after browsing",
            d.id(),
            d.attempt()
        );
        got.push(d.id().to_owned());
        d.ack().await?;
    }
    sub.close().await?;
    Ok(Outcome::ok().note("5 browsed, 2 from the moment on, all 5 still delivered"))
}
