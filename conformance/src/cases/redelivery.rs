//! Nack, ack timeout and ack: what comes back and what does not.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use busbar_core::{Delivery, NackAction, Subscriber};

use crate::support::{body, collect, expect_silence, keyed, latest, publish_all, Ctx};
use crate::Outcome;

async fn next_within(sub: &mut Box<dyn Subscriber>, limit: Duration) -> Result<Delivery> {
    tokio::time::timeout(limit, sub.next())
        .await
        .map_err(|_| anyhow!("nothing arrived within {limit:?}"))?
        .context("next")?
        .ok_or_else(|| anyhow!("the subscription ended early"))
}

/// A nacked delivery comes back with attempt 2 (same id, same payload).
pub async fn nack_redelivers(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let n = 5;
    let ids = publish_all(
        bus.as_ref(),
        &topic,
        (0..n).map(|i| keyed(&format!("k{i}"), 0)).collect(),
    )
    .await?;
    let expected: HashSet<String> = ids.iter().cloned().collect();
    let mut nacked = HashSet::new();
    let mut redelivered: HashMap<String, u32> = HashMap::new();
    let mut dups = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while redelivered.len() < n {
        let Ok(next) = tokio::time::timeout_at(deadline, sub.next()).await else {
            bail!(
                "lost messages: {} of {n} nacked messages never came back",
                n - redelivered.len()
            );
        };
        let d = next
            .context("next")?
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        let id = d.id().to_owned();
        ensure!(expected.contains(&id), "unexpected message {id}");
        if nacked.insert(id.clone()) {
            ensure!(
                d.attempt() == 1,
                "first delivery of {id} has attempt {}",
                d.attempt()
            );
            d.nack(NackAction::Redeliver).await.context("nack")?;
        } else if let std::collections::hash_map::Entry::Vacant(slot) =
            redelivered.entry(id.clone())
        {
            ensure!(
                d.attempt() == 2,
                "redelivery of {id} after one nack has attempt {}, expected 2",
                d.attempt()
            );
            slot.insert(d.attempt());
            d.ack().await?;
        } else {
            dups += 1;
            d.ack().await?;
        }
    }
    dups += expect_silence(&mut sub, Duration::from_millis(500), &expected).await?;
    sub.close().await?;
    Ok(Outcome::with_duplicates(dups))
}

/// A delivery nacked with a delay does not come back before the delay.
pub async fn nack_with_delay_waits(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let ids = publish_all(bus.as_ref(), &topic, vec![keyed("k", 0)]).await?;
    let d = next_within(&mut sub, Duration::from_secs(30)).await?;
    ensure!(d.id() == ids[0], "unexpected message");
    let delay = Duration::from_secs(2);
    let nacked_at = Instant::now();
    d.nack(NackAction::RedeliverAfter(delay))
        .await
        .context("nack with delay")?;
    let again = next_within(&mut sub, Duration::from_secs(30)).await?;
    let waited = nacked_at.elapsed();
    ensure!(again.id() == ids[0], "a different message came back");
    ensure!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    ensure!(
        again.attempt() == 2,
        "attempt {} after one nack",
        again.attempt()
    );
    again.ack().await?;
    sub.close().await?;
    Ok(Outcome::ok().note(format!(
        "redelivered after {waited:.2?} for a {delay:?} delay"
    )))
}

/// A delivery dropped without ack comes back after the ack timeout, to the same or another
/// consumer of the group.
pub async fn ack_timeout_redelivers(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let ack_timeout = Duration::from_secs(3);
    let o = latest(&group).ack_timeout(ack_timeout);
    let bus = &ctx.bus;
    bus.provision(&topic, &o).await?;
    let other_bus = ctx.connect().await?;
    let mut a = bus.subscribe(&topic, o.clone()).await?;
    let mut b = other_bus.subscribe(&topic, o).await?;
    let ids = publish_all(
        bus.as_ref(),
        &topic,
        (0..3).map(|i| keyed(&format!("k{i}"), 0)).collect(),
    )
    .await?;
    let expected: HashSet<String> = ids.iter().cloned().collect();
    // Receive the three first deliveries on whichever consumer gets them; drop them unacked.
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut back: HashMap<String, (u32, Duration)> = HashMap::new();
    let mut dups = 0;
    let deadline = tokio::time::Instant::now() + ack_timeout * 2 + Duration::from_secs(30);
    while back.len() < expected.len() {
        let next = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                r = a.next() => r,
                r = b.next() => r,
            }
        })
        .await;
        let Ok(next) = next else {
            bail!(
                "lost messages: {} of {} dropped deliveries never came back",
                expected.len() - back.len(),
                expected.len()
            );
        };
        let d = next
            .context("next")?
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        let id = d.id().to_owned();
        ensure!(expected.contains(&id), "unexpected message {id}");
        match first_seen.get(&id) {
            None => {
                ensure!(
                    d.attempt() == 1,
                    "first delivery of {id} has attempt {}",
                    d.attempt()
                );
                first_seen.insert(id, Instant::now());
                drop(d); // not acked
            }
            Some(at) if !back.contains_key(&id) => {
                let after = at.elapsed();
                ensure!(
                    d.attempt() >= 2,
                    "redelivery of {id} has attempt {}",
                    d.attempt()
                );
                // Small slack for clock granularity between the broker and this process.
                ensure!(
                    after + Duration::from_millis(100) >= ack_timeout,
                    "{id} came back after {after:?}, before the {ack_timeout:?} ack timeout"
                );
                back.insert(id, (d.attempt(), after));
                d.ack().await?;
            }
            Some(_) => {
                dups += 1;
                d.ack().await?;
            }
        }
    }
    a.close().await?;
    b.close().await?;
    let _ = other_bus.close().await;
    let slowest = back.values().map(|(_, t)| *t).max().unwrap_or_default();
    Ok(Outcome::with_duplicates(dups).note(format!(
        "redelivered within {slowest:.2?} for a {ack_timeout:?} ack timeout"
    )))
}

/// Acked messages do not come back within 2 x ack timeout.
pub async fn no_redelivery_after_ack(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let ack_timeout = Duration::from_secs(2);
    let o = latest(&group).ack_timeout(ack_timeout);
    ctx.bus.provision(&topic, &o).await?;
    let mut sub = ctx.bus.subscribe(&topic, o).await?;
    let n = ctx.count(20);
    let ids = publish_all(
        ctx.bus.as_ref(),
        &topic,
        (0..n).map(|i| keyed(&format!("k{}", i % 4), i)).collect(),
    )
    .await?;
    let expected: HashSet<String> = ids.into_iter().collect();
    let got = collect(&mut sub, &expected, Duration::from_secs(45), true).await?;
    let deadline = tokio::time::Instant::now() + ack_timeout * 2 + Duration::from_millis(500);
    if let Ok(r) = tokio::time::timeout_at(deadline, sub.next()).await {
        let d = r?.ok_or_else(|| anyhow!("the subscription ended early"))?;
        bail!(
            "acked message {} ({:?}) came back with attempt {}",
            d.id(),
            body(&d),
            d.attempt()
        );
    }
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates))
}

/// How many members in turn take the message and leave without settling it: more than the
/// 20 deliveries after which RabbitMQ 4's quorum queues drop a message by default.
const HAND_BACKS: usize = 22;

/// A message that member after member receives and hands back unsettled (each closes its
/// subscription cleanly) is never dropped or dead-lettered by a delivery limit: the next
/// member still gets it.
pub async fn handed_back_many_times_is_kept(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let o = latest(&group);
    ctx.bus.provision(&topic, &o).await?;
    let m = keyed("k", 0);
    let id = m.id.clone();
    ctx.bus
        .publish(&topic, m, &busbar_core::PublishOptions::default())
        .await?;
    let mut attempts = Vec::new();
    for round in 0..=HAND_BACKS {
        let bus = ctx.connect().await?;
        let mut sub = bus.subscribe(&topic, o.clone()).await?;
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "the message was not delivered again after {round} hand-backs (attempts so far {attempts:?}): dropped or dead-lettered"
                )
            })?
            .context("next")?
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        ensure!(d.id() == id, "round {round}: unexpected message {}", d.id());
        attempts.push(d.attempt());
        if round == HAND_BACKS {
            d.ack().await?;
        } else {
            drop(d); // handed back, unsettled, when the member closes
        }
        sub.close().await?;
        bus.close().await?;
    }
    Ok(Outcome::ok().note(format!(
        "delivered {} times; attempts seen {attempts:?}",
        HAND_BACKS + 1
    )))
}
