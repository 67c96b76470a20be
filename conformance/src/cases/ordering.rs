//! Per-key order, with one consumer and with competing consumers that crash and join.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use busbar_core::{Consumer, Event, EventBus, RetryPolicy, StartPosition};

use crate::support::{
    collect, keyed, latest, parse_keyed, publish_all, wait_for, Ctx, OrderTracker,
};
use crate::Outcome;

/// Publishes messages `seq` (e.g. `0..100`) of each key, each key from its own task (so keys
/// interleave), and returns all ids.
async fn publish_keys(
    bus: &Arc<dyn EventBus>,
    topic: &str,
    keys: &[String],
    seq: std::ops::Range<usize>,
) -> Result<Vec<String>> {
    let mut tasks = tokio::task::JoinSet::new();
    for k in keys {
        let (bus, topic, k, seq) = (bus.clone(), topic.to_owned(), k.clone(), seq.clone());
        tasks.spawn(async move {
            let msgs = seq.map(|n| keyed(&k, n)).collect();
            publish_all(bus.as_ref(), &topic, msgs).await
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.extend(r.context("publisher task panicked")??);
    }
    Ok(ids)
}

/// 16 keys x 100 messages arrive in per-key order at one consumer.
pub async fn per_key_order_single_consumer(ctx: Ctx) -> Result<Outcome> {
    let per_key = ctx.count(100);
    let keys: Vec<String> = (0..16).map(|k| format!("key{k}")).collect();
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    ctx.bus.provision(&topic, &latest(&group)).await?;
    let mut sub = ctx.bus.subscribe(&topic, latest(&group)).await?;
    let ids = publish_keys(&ctx.bus, &topic, &keys, 0..per_key).await?;
    let expected: HashSet<String> = ids.into_iter().collect();
    let got = collect(&mut sub, &expected, Duration::from_secs(90), true).await?;
    let mut next: HashMap<String, usize> = HashMap::new();
    for id in &got.order {
        let (k, n) = parse_keyed(&got.first[id].0.payload)?;
        let want = next.entry(k.clone()).or_default();
        ensure!(
            n == *want,
            "key {k}: got message {n} while expecting {want}"
        );
        *want += 1;
    }
    sub.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates))
}

/// Deterministic injected failure: about 1 in 16 messages fails its first attempt.
fn injected_failure(e: &Event) -> bool {
    let h = e
        .id()
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    h % 16 == 0 && e.attempt() == 1
}

fn start_consumer(
    who: &'static str,
    bus: Arc<dyn EventBus>,
    topic: &str,
    group: &str,
    tracker: Arc<OrderTracker>,
    ack_timeout: Duration,
) -> tokio::task::JoinHandle<Result<busbar_core::ConsumerReport>> {
    let consumer = Consumer::new(bus, topic)
        .group(group)
        .start(StartPosition::Latest)
        .concurrency(8)
        .max_in_flight(64)
        .ack_timeout(ack_timeout)
        .drain_timeout(Duration::from_secs(5))
        .retry(
            RetryPolicy::builder()
                .max_attempts(10)
                .initial_delay(Duration::from_millis(5))
                .max_delay(Duration::from_millis(50))
                .build()
                .unwrap_or_default(),
        );
    let ended = tracker.clone();
    tokio::spawn(async move {
        let report = consumer
            .run(move |e: Event| {
                let tracker = tracker.clone();
                async move {
                    let (k, n) = parse_keyed(e.payload()).map_err(|e| e.to_string())?;
                    tracker.start_by(&k, n, who, e.attempt());
                    tokio::time::sleep(Duration::from_micros(fastrand_like(e.id()) % 1500)).await;
                    if injected_failure(&e) {
                        tracker.failed_by(&k, n, who);
                        return Err(format!("injected failure of {k}/{n}"));
                    }
                    tracker.done_by(&k, n, who);
                    Ok(())
                }
            })
            .await
            .map_err(anyhow::Error::from);
        // Nothing in the case stops a consumer but the buses' close at its end: an earlier
        // end is reported while the case still waits.
        match &report {
            Ok(r) => ended.consumer_ended(who, &format!("{r:?}")),
            Err(e) => ended.consumer_ended(who, &format!("{e:#}")),
        }
        report
    })
}

/// Fails if a consumer of the case stopped by itself (the case stops none before its end).
fn ensure_all_running(tracker: &OrderTracker) -> Result<()> {
    let ended = tracker.ended_consumers();
    ensure!(
        ended.is_empty(),
        "a consumer stopped while the case still needed it: {}",
        ended.join("; ")
    );
    Ok(())
}

fn fastrand_like(id: &str) -> u64 {
    id.bytes()
        .fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)))
}

/// Per-key order holds through the consumer runner with 3 consumers in one group, one of
/// them dropped (not closed) halfway, a new one joining — and getting work: messages keep
/// coming until it has handled some — and injected handler failures that the runner
/// retries: whenever a handler starts message n of a key, every earlier message of that key
/// has been handled successfully at least once. Nothing is lost.
pub async fn per_key_order_competing_consumers(ctx: Ctx) -> Result<Outcome> {
    let keys: Vec<String> = (0..64).map(|k| format!("key{k}")).collect();
    // Messages per key before the crash; more follow while c4 joins.
    let first = ctx.count(50);
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let ack_timeout = Duration::from_secs(3);
    ctx.bus
        .provision(&topic, &latest(&group).ack_timeout(ack_timeout))
        .await?;
    let tracker = Arc::new(OrderTracker::default());
    let mut buses = Vec::new();
    let mut consumers = Vec::new();
    for who in ["c1", "c2", "c3"] {
        let bus = ctx.connect().await?;
        consumers.push(start_consumer(
            who,
            bus.clone(),
            &topic,
            &group,
            tracker.clone(),
            ack_timeout,
        ));
        buses.push(bus);
    }
    publish_keys(&ctx.bus, &topic, &keys, 0..first).await?;

    let t = tracker.clone();
    let half = keys.len() * first / 2;
    wait_for(
        Duration::from_secs(120),
        "half of the messages to be handled",
        move || t.handled() >= half || !t.ended_consumers().is_empty(),
    )
    .await
    .with_context(|| tracker.progress(&keys, first))?;
    ensure_all_running(&tracker)?;
    // Crash one consumer (c2): its runner and subscriber are dropped, nothing is closed or
    // acked.
    tracker.note_all("-- c2 crashes, c4 joins --");
    consumers[1].abort();
    let bus = ctx.connect().await?;
    consumers.push(start_consumer(
        "c4",
        bus.clone(),
        &topic,
        &group,
        tracker.clone(),
        ack_timeout,
    ));
    buses.push(bus);

    // c4 must get work, not join a group that already finished: one more message per key
    // every round until c4 has handled one, then a few rounds more.
    let mut per_key = first;
    let joining_since = tokio::time::Instant::now();
    let mut rounds_left: Option<u32> = None;
    let mut c4_first = Duration::ZERO;
    while rounds_left != Some(0) {
        publish_keys(&ctx.bus, &topic, &keys, per_key..per_key + 1).await?;
        per_key += 1;
        ensure_all_running(&tracker).with_context(|| tracker.progress(&keys, per_key))?;
        match rounds_left.as_mut() {
            Some(left) => *left -= 1,
            None if tracker.handled_by("c4") > 0 => {
                c4_first = joining_since.elapsed();
                rounds_left = Some(5);
            }
            None if joining_since.elapsed() > Duration::from_secs(90) => bail!(
                "c4 handled nothing within 90 s of joining while the group kept receiving messages ({})",
                tracker.progress(&keys, per_key)
            ),
            None => {}
        }
        let pause = if per_key - first < 50 { 100 } else { 500 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let total = keys.len() * per_key;

    let t = tracker.clone();
    let all = wait_for(
        Duration::from_secs(150),
        "every message to be handled",
        move || t.handled() >= total || !t.ended_consumers().is_empty(),
    )
    .await
    .and_then(|()| ensure_all_running(&tracker))
    .with_context(|| tracker.progress(&keys, per_key));
    // Closing is bounded: a broker that stopped answering fails the case with its own
    // findings, not the harness's timeout.
    let closing = async {
        for b in &buses {
            let _ = b.close().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), closing)
        .await
        .is_err()
    {
        all?;
        bail!("closing the consumers' buses took longer than 20 s");
    }
    for (i, c) in consumers.into_iter().enumerate() {
        let joined = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .map_err(|_| anyhow!("consumer {i} did not stop within 20 s of its bus closing"));
        match joined {
            Err(e) => {
                all?;
                return Err(e);
            }
            // Closing the buses above can catch the consumer that joined last still
            // subscribing (a slow join): that is the test ending, not a lost guarantee — loss
            // and order are checked by the tracker.
            Ok(Ok(Err(e)))
                if e.downcast_ref::<busbar_core::Error>()
                    .is_some_and(|e| e.kind() == busbar_core::ErrorKind::Closed) => {}
            Ok(Ok(r)) => {
                r.with_context(|| format!("consumer {i}"))?;
            }
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => return Err(anyhow!("consumer {i} panicked: {e}")),
        }
    }
    tracker.verify(&keys, per_key)?;
    all?;
    Ok(Outcome::with_duplicates(tracker.duplicates()).note(format!(
        "{total} messages, 64 keys; c2 crashed, c4 joined, handled its first after {:.1}s and {} in all",
        c4_first.as_secs_f64(),
        tracker.handled_by("c4")
    )))
}

/// A consumer dropped without acking (not closed) loses nothing: another member of the group
/// gets everything, including what the dropped one held.
pub async fn consumer_crash(ctx: Ctx) -> Result<Outcome> {
    let n = ctx.count(200);
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let o = latest(&group).ack_timeout(Duration::from_secs(2));
    ctx.bus.provision(&topic, &o).await?;
    let crashing_bus = ctx.connect().await?;
    let mut crashing = crashing_bus.subscribe(&topic, o.clone()).await?;
    let ids = publish_all(
        ctx.bus.as_ref(),
        &topic,
        (0..n).map(|i| keyed(&format!("k{}", i % 8), i)).collect(),
    )
    .await?;
    let expected: HashSet<String> = ids.into_iter().collect();
    let mut held = Vec::new();
    let take = (n / 4).max(1);
    while held.len() < take {
        let d = tokio::time::timeout(Duration::from_secs(45), crashing.next())
            .await
            .map_err(|_| anyhow!("the first consumer got only {} messages", held.len()))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        held.push(d);
    }
    // Crash: drop the deliveries, the subscriber and the connection without closing anything.
    drop(held);
    drop(crashing);
    drop(crashing_bus);
    let mut survivor = ctx.bus.subscribe(&topic, o).await?;
    let got = collect(&mut survivor, &expected, Duration::from_secs(60), true).await?;
    survivor.close().await?;
    Ok(Outcome::with_duplicates(got.duplicates)
        .note(format!("{take} held by the crashed consumer")))
}

/// The batch handler API on the broker: 16 keys x 50 messages through `run_batches` (batches
/// of up to 32, 4 at once, about 1 in 16 events failing once): no batch holds two events of a
/// key, each key is handled in order across batches and retries, nothing is lost.
pub async fn batches_keep_per_key_order(ctx: Ctx) -> Result<Outcome> {
    const MAX_BATCH: usize = 32;
    let per_key = ctx.count(50);
    let keys: Vec<String> = (0..16).map(|k| format!("key{k}")).collect();
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let consumer = Consumer::new(ctx.bus.clone(), &topic)
        .group(&group)
        .start(StartPosition::Latest)
        .concurrency(4)
        .max_in_flight(128)
        .retry(
            RetryPolicy::builder()
                .max_attempts(10)
                .initial_delay(Duration::from_millis(5))
                .max_delay(Duration::from_millis(50))
                .build()
                .unwrap_or_default(),
        );
    ctx.bus
        .provision(&topic, &consumer.subscribe_options())
        .await?;
    let tracker = Arc::new(OrderTracker::default());
    let shared_keys = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let largest = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (t, twice, big) = (tracker.clone(), shared_keys.clone(), largest.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run_batches_until(
        MAX_BATCH,
        move |events: Vec<Event>| {
            let (t, twice, big) = (t.clone(), twice.clone(), big.clone());
            async move {
                big.fetch_max(events.len(), std::sync::atomic::Ordering::AcqRel);
                let parsed: Vec<Option<(String, usize)>> = events
                    .iter()
                    .map(|e| parse_keyed(e.payload()).ok())
                    .collect();
                let distinct: HashSet<&String> = parsed.iter().flatten().map(|(k, _)| k).collect();
                if distinct.len() != parsed.iter().flatten().count() {
                    twice.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                for (e, p) in events.iter().zip(&parsed) {
                    if let Some((k, n)) = p {
                        t.start_by(k, *n, "batch", e.attempt());
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                events
                    .iter()
                    .zip(parsed)
                    .map(|(e, p)| {
                        let (k, n) = p.ok_or_else(|| format!("not <key>/<n>: {}", e.id()))?;
                        if injected_failure(e) {
                            t.failed_by(&k, n, "batch");
                            return Err(format!("injected failure of {k}/{n}"));
                        }
                        t.done_by(&k, n, "batch");
                        Ok(())
                    })
                    .collect::<Vec<_>>()
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    publish_keys(&ctx.bus, &topic, &keys, 0..per_key).await?;
    let total = keys.len() * per_key;
    let waited = wait_for(Duration::from_secs(120), "every message handled", || {
        tracker.handled() >= total
    })
    .await;
    let _ = stop_tx.send(());
    let report = run
        .await
        .map_err(|e| anyhow!("the consumer task failed: {e}"))??;
    waited.map_err(|e| anyhow!("{e}: {}", tracker.progress(&keys, per_key)))?;
    tracker.verify(&keys, per_key)?;
    let twice = shared_keys.load(std::sync::atomic::Ordering::Acquire);
    ensure!(twice == 0, "{twice} batches held two events of one key");
    ensure!(
        report.error.is_none(),
        "the run ended with {:?}",
        report.error
    );
    Ok(Outcome::with_duplicates(tracker.duplicates()).note(format!(
        "{total} messages, largest batch {}, {} retried",
        largest.load(std::sync::atomic::Ordering::Acquire),
        report.retried
    )))
}
