//! Limits and bad input: typed errors, nothing lost, no panic.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use busbar_core::{ErrorKind, Message, PublishOptions, SubscribeOptions};

use crate::support::{body, collect, expect_silence, latest, Ctx};
use crate::Outcome;

fn expect_kind<T>(r: busbar_core::Result<T>, kind: ErrorKind, what: &str) -> Result<()> {
    match r {
        Ok(_) => bail!("{what}: succeeded, expected a {kind} error"),
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => bail!("{what}: got {:?} ({e}), expected {kind:?}", e.kind()),
    }
}

/// A message exactly `message_max_bytes` long arrives intact; one byte more is rejected with
/// `PayloadTooLarge` and never delivered.
pub async fn large_payload(ctx: Ctx) -> Result<Outcome> {
    let max = ctx
        .bus
        .capabilities()
        .message_max_bytes
        .context("no message_max_bytes")?;
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let mut fits = Message::new(Vec::new()).with_key("big");
    let overhead = fits.encoded_len();
    ensure!(
        max > overhead,
        "message_max_bytes {max} leaves no room for a payload"
    );
    let payload: Vec<u8> = (0..max - overhead).map(|i| (i % 251) as u8).collect();
    fits.payload = payload.clone().into();
    ensure!(fits.encoded_len() == max, "test arithmetic");
    let mut too_big = Message::new(Vec::new()).with_key("big");
    let mut bigger = payload.clone();
    bigger.push(0);
    too_big.payload = bigger.into();
    too_big.id.clone_from(&fits.id);
    let too_big = too_big.with_id(format!("{}x", &fits.id[..fits.id.len() - 1]));
    expect_kind(
        bus.publish(&topic, too_big.clone(), &PublishOptions::default())
            .await,
        ErrorKind::PayloadTooLarge,
        "publishing one byte over message_max_bytes",
    )?;
    expect_kind(
        bus.publish_batch(
            &topic,
            vec![Message::new("small"), too_big],
            &PublishOptions::default(),
        )
        .await,
        ErrorKind::PayloadTooLarge,
        "a batch holding an oversized message",
    )?;
    let id = fits.id.clone();
    bus.publish(&topic, fits, &PublishOptions::default())
        .await
        .context("publishing exactly message_max_bytes")?;
    let expected: HashSet<String> = [id.clone()].into();
    let got = collect(&mut sub, &expected, Duration::from_secs(45), true).await?;
    ensure!(
        got.first[&id].0.payload == payload,
        "the large payload changed in transit"
    );
    // Neither the oversized message nor the batch holding it may show up.
    let dups = expect_silence(&mut sub, Duration::from_millis(500), &expected).await?;
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates + dups).note(format!("{max} bytes")))
}

/// Empty and invalid topics, bad options, settling twice and publishing after close are typed
/// errors, never panics.
pub async fn bad_input(ctx: Ctx) -> Result<Outcome> {
    let bus = &ctx.bus;
    let po = PublishOptions::default();
    for t in [
        "",
        "has space",
        "star*",
        "gt>",
        "slash/x",
        "ünï",
        ".dot",
        "a..b",
    ] {
        expect_kind(
            bus.publish(t, Message::new("x"), &po).await,
            ErrorKind::InvalidTopic,
            &format!("publish to {t:?}"),
        )?;
        expect_kind(
            bus.publish_batch(t, vec![Message::new("x")], &po).await,
            ErrorKind::InvalidTopic,
            &format!("batch to {t:?}"),
        )?;
        expect_kind(
            bus.subscribe(t, latest("g")).await,
            ErrorKind::InvalidTopic,
            &format!("subscribe to {t:?}"),
        )?;
    }
    let long = "t".repeat(busbar_core::limits::TOPIC_MAX_LEN + 1);
    expect_kind(
        bus.publish(&long, Message::new("x"), &po).await,
        ErrorKind::InvalidTopic,
        "an over-long topic",
    )?;

    let topic = ctx.topic("t");
    expect_kind(
        bus.subscribe(&topic, SubscribeOptions::new("")).await,
        ErrorKind::InvalidInput,
        "an empty group",
    )?;
    expect_kind(
        bus.subscribe(&topic, latest("g").max_in_flight(0)).await,
        ErrorKind::InvalidInput,
        "max_in_flight 0",
    )?;
    expect_kind(
        bus.subscribe(&topic, latest("g").ack_timeout(Duration::ZERO))
            .await,
        ErrorKind::InvalidInput,
        "ack_timeout 0",
    )?;

    // Settling twice.
    let group = ctx.group("g");
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    bus.publish(&topic, Message::new("once").with_key("k"), &po)
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .context("nothing arrived")??
        .context("subscription ended")?;
    d.ack().await.context("first ack")?;
    expect_kind(d.ack().await, ErrorKind::AlreadySettled, "a second ack")?;
    expect_kind(
        d.nack(busbar_core::NackAction::Redeliver).await,
        ErrorKind::AlreadySettled,
        "a nack after ack",
    )?;
    sub.close().await?;

    // After close, on a connection of its own.
    let other = ctx.connect().await?;
    other.close().await.context("close")?;
    other.close().await.context("a second close is a no-op")?;
    expect_kind(
        other.publish(&topic, Message::new("late"), &po).await,
        ErrorKind::Closed,
        "publish after close",
    )?;
    expect_kind(
        other
            .publish_batch(&topic, vec![Message::new("late")], &po)
            .await,
        ErrorKind::Closed,
        "batch after close",
    )?;
    expect_kind(
        other.subscribe(&topic, latest(&group)).await,
        ErrorKind::Closed,
        "subscribe after close",
    )?;
    Ok(Outcome::ok())
}

/// The longest durations and metadata strings are typed errors, never panics, and a batch
/// holding one bad message publishes nothing: ack timeouts, redelivery delays, deadline
/// extensions and publish delays past [`busbar_core::limits::DURATION_MAX`]; an id, type or content
/// type over [`busbar_core::limits::METADATA_MAX_BYTES`].
pub async fn extreme_values(ctx: Ctx) -> Result<Outcome> {
    let bus = &ctx.bus;
    let caps = bus.capabilities();
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let too_long = busbar_core::limits::DURATION_MAX + Duration::from_secs(1);
    for d in [Duration::MAX, too_long] {
        expect_kind(
            bus.subscribe(&topic, latest(&group).ack_timeout(d)).await,
            ErrorKind::InvalidInput,
            &format!("ack_timeout {d:?}"),
        )?;
        let delayed = bus
            .publish(
                &topic,
                Message::new("x"),
                &PublishOptions::default().delay(d),
            )
            .await;
        let kind = if caps.publish_with_delay {
            ErrorKind::InvalidInput
        } else {
            ErrorKind::Unsupported
        };
        expect_kind(delayed, kind, &format!("a publish delay of {d:?}"))?;
    }
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;

    // Metadata over the limit, alone and in the middle of a batch: nothing is published.
    let long = "i".repeat(busbar_core::limits::METADATA_MAX_BYTES + 1);
    let bad = [
        Message::new("long id").with_id(long.clone()),
        Message::new("long type").with_type(long.clone()),
        Message::new("long content type").with_content_type(long.clone()),
    ];
    let po = PublishOptions::default();
    for m in &bad {
        expect_kind(
            bus.publish(&topic, m.clone(), &po).await,
            ErrorKind::InvalidInput,
            &format!("publishing {:?}", String::from_utf8_lossy(&m.payload)),
        )?;
        expect_kind(
            bus.publish_batch(
                &topic,
                vec![
                    Message::new("before").with_key("k"),
                    m.clone(),
                    Message::new("after").with_key("k"),
                ],
                &po,
            )
            .await,
            ErrorKind::InvalidInput,
            &format!("a batch holding {:?}", String::from_utf8_lossy(&m.payload)),
        )?;
    }
    // Exactly at the limit is fine.
    let at_limit = Message::new("at the limit")
        .with_key("k")
        .with_id("j".repeat(busbar_core::limits::METADATA_MAX_BYTES))
        .with_type("t".repeat(busbar_core::limits::METADATA_MAX_BYTES))
        .with_content_type("c".repeat(busbar_core::limits::METADATA_MAX_BYTES));
    let id = at_limit.id.clone();
    bus.publish(&topic, at_limit, &po)
        .await
        .context("publishing metadata exactly at the limit")?;
    let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .context("nothing arrived")??
        .context("subscription ended")?;
    ensure!(
        d.id() == id,
        "a message of a refused publish arrived: {:?}",
        body(&d)
    );

    // A delivery refuses extreme durations and stays usable.
    expect_kind(
        d.extend_deadline(Duration::MAX).await,
        ErrorKind::InvalidInput,
        "extend_deadline(Duration::MAX)",
    )?;
    match d
        .nack(busbar_core::NackAction::RedeliverAfter(Duration::MAX))
        .await
    {
        Err(e) if e.kind() == ErrorKind::InvalidInput => {}
        Err(e) if e.kind() == ErrorKind::Unsupported && !caps.nack_can_delay => {}
        other => bail!("nack(RedeliverAfter(Duration::MAX)): got {other:?}, expected InvalidInput"),
    }
    d.ack().await.context("acking after the refused calls")?;
    let allowed: HashSet<String> = [id].into();
    let dups = expect_silence(&mut sub, Duration::from_millis(500), &allowed).await?;
    sub.close().await?;
    Ok(Outcome::with_duplicates(dups))
}

/// The longest topic and group names busbar accepts, full of the characters backends escape,
/// work end to end — the topic's dead-letter topic included — where they used to make
/// backends with shorter name limits fail with retryable broker errors.
pub async fn longest_names(ctx: Ctx) -> Result<Outcome> {
    let bus = &ctx.bus;
    let topic = format!(
        "{}{}",
        ctx.topic("n"),
        "_".repeat(busbar_core::limits::TOPIC_MAX_LEN)
    )[..busbar_core::limits::TOPIC_MAX_LEN]
        .to_owned();
    let group = format!(
        "{}{}",
        ctx.group("g"),
        "_".repeat(busbar_core::limits::GROUP_MAX_LEN)
    )[..busbar_core::limits::GROUP_MAX_LEN]
        .to_owned();
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let m = Message::new("long names").with_key("k");
    let id = m.id.clone();
    bus.publish(&topic, m, &PublishOptions::default()).await?;
    let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .context("nothing arrived")??
        .context("subscription ended")?;
    ensure!(d.id() == id, "got {} instead of {id}", d.id());
    d.nack(busbar_core::NackAction::DeadLetter {
        reason: "long names".into(),
    })
    .await
    .context("dead-lettering under the longest names")?;
    sub.close().await?;
    let dlq = busbar_core::dead_letter::default_topic(&topic);
    let start = if bus.capabilities().replay {
        busbar_core::StartPosition::Earliest
    } else {
        busbar_core::StartPosition::Latest
    };
    let mut dead = bus
        .subscribe(
            &dlq,
            SubscribeOptions::new(busbar_core::dead_letter::GROUP).start(start),
        )
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .context("the dead letter did not arrive")??
        .context("subscription ended")?;
    ensure!(d.id() == id, "the dead-letter topic holds {}", d.id());
    d.ack().await?;
    dead.close().await?;
    Ok(Outcome::ok().note(format!(
        "topic {} and group {} characters",
        topic.len(),
        group.len()
    )))
}
