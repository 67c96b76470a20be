//! Publishing and receiving.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use busbar_core::{Message, PublishOptions};
use chrono::{TimeZone, Utc};

use crate::support::{collect, expect_silence, keyed, latest, publish_all, Ctx};
use crate::Outcome;

const READ: Duration = Duration::from_secs(45);

/// Payload, key, headers, id, type, source, time and content type survive the round trip.
pub async fn publish_subscribe(ctx: Ctx) -> Result<Outcome> {
    let n = ctx.count(100);
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    let time = Utc
        .timestamp_opt(1_700_000_000, 123_456_789)
        .single()
        .context("fixed time")?;
    let sent: Vec<Message> = (0..n)
        .map(|i| {
            let mut payload = vec![0u8, 255, b'\n', b'"'];
            payload.extend_from_slice(format!("payload-{i}-é").as_bytes());
            let mut m = Message::new(payload)
                .with_type("busbar.test.created")
                .with_source("/busbar/conformance")
                .with_content_type("application/octet-stream")
                .with_header("x-tenant", "acme")
                .with_header("x-unicode", "grüße 東京")
                .with_header("x-empty", "")
                .with_time(time);
            if i % 4 != 0 {
                m = m.with_key(format!("key-{}", i % 7));
            }
            if i == 0 {
                m = m.with_id("caller-chosen-id");
            }
            m
        })
        .collect();
    let ids = publish_all(bus.as_ref(), &topic, sent.clone()).await?;
    let expected: HashSet<String> = ids.into_iter().collect();
    let got = collect(&mut sub, &expected, READ, true).await?;
    for m in &sent {
        let (back, attempt, t) = &got.first[&m.id];
        ensure!(t == &topic, "delivery topic {t:?}, expected {topic:?}");
        ensure!(
            *attempt == 1,
            "first delivery of {} has attempt {attempt}",
            m.id
        );
        ensure!(back.payload == m.payload, "payload of {} changed", m.id);
        ensure!(
            back.key == m.key,
            "key of {}: {:?} != {:?}",
            m.id,
            back.key,
            m.key
        );
        ensure!(
            back.headers == m.headers,
            "headers of {}: {:?} != {:?}",
            m.id,
            back.headers,
            m.headers
        );
        ensure!(back.event_type == m.event_type, "type of {} changed", m.id);
        ensure!(back.source == m.source, "source of {} changed", m.id);
        ensure!(
            back.time == m.time,
            "time of {}: {} != {}",
            m.id,
            back.time,
            m.time
        );
        ensure!(
            back.content_type == m.content_type,
            "content type of {} changed",
            m.id
        );
    }
    ensure!(
        got.first.contains_key("caller-chosen-id"),
        "caller-set id lost"
    );
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates))
}

/// A published batch arrives whole, and in order per key where the backend declares per-key order.
pub async fn batch_publish(ctx: Ctx) -> Result<Outcome> {
    let caps = ctx.bus.capabilities();
    let n = caps.batch_max_size.unwrap_or(100).min(ctx.count(100));
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    // Runs of three messages per key, so that any swap of neighbours breaks a key's order.
    let batch: Vec<Message> = (0..n)
        .map(|i| keyed(&format!("k{}", (i / 3) % 5), i))
        .collect();
    let expected: HashSet<String> = batch.iter().map(|m| m.id.clone()).collect();
    let by_id: HashMap<String, Message> = batch.iter().map(|m| (m.id.clone(), m.clone())).collect();
    bus.publish_batch(&topic, batch, &PublishOptions::default())
        .await
        .context("publish_batch")?;
    bus.publish_batch(&topic, Vec::new(), &PublishOptions::default())
        .await
        .context("an empty batch is accepted and publishes nothing")?;
    let got = collect(&mut sub, &expected, READ, true).await?;
    sub.close().await?;
    if caps.ordering != busbar_core::Ordering::PerKey {
        // Whole, but in no promised order (e.g. SQS standard queues).
        return Ok(Outcome::with_duplicates(got.duplicates)
            .note("order not checked: the backend declares ordering None"));
    }
    let mut last: HashMap<String, usize> = HashMap::new();
    for id in &got.order {
        let m = &by_id[id];
        let (k, seq) = crate::support::parse_keyed(&m.payload)?;
        if let Some(prev) = last.insert(k.clone(), seq) {
            ensure!(seq > prev, "key {k}: {seq} arrived after {prev}");
        }
    }
    Ok(Outcome::with_duplicates(got.duplicates))
}

/// Two topics never see each other's messages.
pub async fn topic_isolation(ctx: Ctx) -> Result<Outcome> {
    let (ta, tb) = (ctx.topic("a"), ctx.topic("b"));
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&ta, &latest(&group)).await?;
    bus.provision(&tb, &latest(&group)).await?;
    let mut sa = bus.subscribe(&ta, latest(&group)).await?;
    let mut sb = bus.subscribe(&tb, latest(&group)).await?;
    let n = ctx.count(20);
    let ida: HashSet<String> =
        publish_all(bus.as_ref(), &ta, (0..n).map(|i| keyed("a", i)).collect())
            .await?
            .into_iter()
            .collect();
    let idb: HashSet<String> =
        publish_all(bus.as_ref(), &tb, (0..n).map(|i| keyed("b", i)).collect())
            .await?
            .into_iter()
            .collect();
    let ga = collect(&mut sa, &ida, READ, true).await?;
    let gb = collect(&mut sb, &idb, READ, true).await?;
    let quiet = Duration::from_millis(500);
    let da = expect_silence(&mut sa, quiet, &ida).await?;
    let db = expect_silence(&mut sb, quiet, &idb).await?;
    sa.close().await?;
    sb.close().await?;
    Ok(Outcome::with_duplicates(
        ga.duplicates + gb.duplicates + da + db,
    ))
}

/// 20 tasks publishing at once lose nothing.
pub async fn concurrent_publishers(ctx: Ctx) -> Result<Outcome> {
    const TASKS: usize = 20;
    let per_task = ctx.count(2000).div_ceil(TASKS);
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    ctx.bus.provision(&topic, &latest(&group)).await?;
    let mut sub = ctx.bus.subscribe(&topic, latest(&group)).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let bus = ctx.bus.clone();
        let topic = topic.clone();
        tasks.spawn(async move {
            let msgs = (0..per_task).map(|i| keyed(&format!("p{t}"), i)).collect();
            publish_all(bus.as_ref(), &topic, msgs).await
        });
    }
    let mut expected = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        expected.extend(r.context("publisher task panicked")??);
    }
    ensure!(
        expected.len() == TASKS * per_task,
        "duplicate ids generated"
    );
    let got = collect(&mut sub, &expected, READ * 2, true).await?;
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates).note(format!(
        "{} messages from {TASKS} publishers",
        expected.len()
    )))
}

/// `next_batch` hands out batches within `max_in_flight` (a call at the bound waits and can
/// be dropped without losing anything), and brings every message, each key in order.
pub async fn next_batch(ctx: Ctx) -> Result<Outcome> {
    const LIMIT: usize = 10;
    const KEYS: usize = 4;
    const PER_KEY: usize = 4;
    const ASK: usize = 16;
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    // An ack timeout longer than the whole case: nothing may come back by a timeout, so a
    // delivery a dropped call lost would be missing, not redelivered.
    let options = latest(&group)
        .max_in_flight(LIMIT)
        .ack_timeout(Duration::from_secs(300));
    bus.provision(&topic, &options).await?;
    let mut sub = bus.subscribe(&topic, options).await?;
    let sent: Vec<Message> = (0..KEYS * PER_KEY)
        .map(|i| keyed(&format!("k{}", i % KEYS), i / KEYS))
        .collect();
    let expected: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    bus.publish_batch(&topic, sent, &PublishOptions::default())
        .await
        .context("publish_batch")?;
    let mut arrivals: Vec<(String, String)> = Vec::new();
    let mut largest = 0;
    let mut record = |batch: &[busbar_core::Delivery], arrivals: &mut Vec<(String, String)>| {
        largest = largest.max(batch.len());
        for d in batch {
            arrivals.push((d.id().to_owned(), crate::support::body(d)));
        }
    };
    // Nothing acked: batches until a call finds nothing more within 3 s (dropped then).
    let mut held = Vec::new();
    loop {
        let wait = if held.is_empty() {
            READ
        } else {
            Duration::from_secs(3)
        };
        let Ok(batch) = tokio::time::timeout(wait, sub.next_batch(ASK)).await else {
            ensure!(!held.is_empty(), "nothing arrived within {READ:?}");
            break;
        };
        let batch = batch.context("next_batch")?;
        ensure!(!batch.is_empty(), "the subscription ended early");
        ensure!(
            batch.len() <= ASK,
            "a batch of {} where at most {ASK} were asked for",
            batch.len()
        );
        record(&batch, &mut arrivals);
        held.extend(batch);
        ensure!(
            held.len() <= LIMIT,
            "{} unacked deliveries handed out; max_in_flight is {LIMIT}",
            held.len()
        );
    }
    let most_held = held.len();
    for d in held {
        d.ack().await.context("ack")?;
    }
    // Then the rest, each batch acked.
    let deadline = tokio::time::Instant::now() + READ;
    let arrived = |a: &[(String, String)]| a.iter().map(|(id, _)| id).collect::<HashSet<_>>().len();
    while arrived(&arrivals) < expected.len() {
        let batch = tokio::time::timeout_at(deadline, sub.next_batch(ASK))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "lost messages: {} of {} never arrived (a dropped next_batch call must hand out nothing)",
                    expected.len() - arrived(&arrivals),
                    expected.len()
                )
            })?
            .context("next_batch")?;
        ensure!(!batch.is_empty(), "the subscription ended early");
        ensure!(batch.len() <= ASK, "a batch of {}", batch.len());
        record(&batch, &mut arrivals);
        for d in batch {
            d.ack().await.context("ack")?;
        }
    }
    sub.close().await?;
    let unexpected: Vec<&String> = arrivals
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !expected.contains(*id))
        .collect();
    ensure!(unexpected.is_empty(), "unexpected messages {unexpected:?}");
    let duplicates = (arrivals.len() - expected.len()) as u64;
    if bus.capabilities().ordering == busbar_core::Ordering::PerKey {
        let mut last: HashMap<String, usize> = HashMap::new();
        for (_, body) in &arrivals {
            let (k, seq) = crate::support::parse_keyed(body.as_bytes())?;
            if let Some(prev) = last.insert(k.clone(), seq) {
                ensure!(seq > prev, "key {k}: {seq} arrived after {prev}");
            }
        }
    }
    Ok(Outcome::with_duplicates(duplicates).note(format!(
        "largest batch {largest}; {most_held} held unacked at the bound (max_in_flight {LIMIT})"
    )))
}
