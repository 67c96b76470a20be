//! What a backend declares off must answer `Unsupported`, never a silent no-op.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use busbar_core::{ErrorKind, Message, NackAction, PublishOptions, StartPosition};

use crate::support::{latest, opts, Ctx};
use crate::Outcome;

fn expect_unsupported<T>(r: busbar_core::Result<T>, what: &str) -> Result<()> {
    match r {
        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
        Err(e) => bail!("{what} is declared off but failed with {:?}: {e}", e.kind()),
        Ok(_) => bail!("{what} is declared off but succeeded silently"),
    }
}

/// Every capability declared off answers `Unsupported`.
pub async fn unsupported_is_typed(ctx: Ctx) -> Result<Outcome> {
    let caps = ctx.bus.capabilities();
    let bus = &ctx.bus;
    let topic = ctx.topic("t");
    let mut checked = Vec::new();
    if !caps.publish_with_delay {
        expect_unsupported(
            bus.publish(
                &topic,
                Message::new("x"),
                &PublishOptions::default().delay(Duration::from_secs(1)),
            )
            .await,
            "publish with delay",
        )?;
        checked.push("publish_with_delay");
    }
    if !caps.consumer_lag {
        expect_unsupported(bus.lag(&topic, "g").await, "reading consumer lag")?;
        checked.push("consumer_lag");
    }
    if !caps.replay && caps.consumer_groups {
        expect_unsupported(
            bus.subscribe(&topic, opts(&ctx.group("g")).start(StartPosition::Earliest))
                .await,
            "subscribe from the earliest message (replay)",
        )?;
        checked.push("replay");
    }
    if caps.consumer_groups && (!caps.nack_can_delay || !caps.ack_deadline_can_extend) {
        let group = ctx.group("g");
        bus.provision(&topic, &latest(&group)).await?;
        let mut sub = bus.subscribe(&topic, latest(&group)).await?;
        bus.publish(
            &topic,
            Message::new("x").with_key("k"),
            &PublishOptions::default(),
        )
        .await?;
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .context("nothing arrived")??
            .context("subscription ended")?;
        if !caps.ack_deadline_can_extend {
            expect_unsupported(
                d.extend_deadline(Duration::from_secs(5)).await,
                "extend_deadline",
            )?;
            checked.push("ack_deadline_can_extend");
        }
        if !caps.nack_can_delay {
            expect_unsupported(
                d.nack(NackAction::RedeliverAfter(Duration::from_secs(1)))
                    .await,
                "nack with delay",
            )?;
            checked.push("nack_can_delay");
        }
        d.ack().await.context("ack after the Unsupported answers")?;
        sub.close().await?;
    }
    Ok(Outcome::ok().note(if checked.is_empty() {
        "no operation-backed capability is declared off".to_owned()
    } else {
        format!("checked: {}", checked.join(", "))
    }))
}
