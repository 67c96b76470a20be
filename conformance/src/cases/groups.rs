//! Consumer groups: resume, fan-out across groups, competition inside one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};

use crate::support::{collect, keyed, latest, publish_all, Ctx};
use crate::Outcome;

const READ: Duration = Duration::from_secs(60);

/// After consuming part and closing, reopening the same group delivers the rest; nothing is
/// lost (what was acked may come again, as a duplicate).
pub async fn resume_after_close(ctx: Ctx) -> Result<Outcome> {
    let n = ctx.count(1000);
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&group)).await?;
    let msgs: Vec<_> = (0..n).map(|i| keyed(&format!("k{}", i % 16), i)).collect();
    let ids = publish_all(bus.as_ref(), &topic, msgs).await?;
    let all: HashSet<String> = ids.iter().cloned().collect();

    let mut first = bus.subscribe(&topic, latest(&group)).await?;
    let mut acked = HashSet::new();
    let part = n * 2 / 5;
    let deadline = Instant::now() + READ;
    while acked.len() < part {
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} arrived",
            acked.len()
        );
        let d = tokio::time::timeout(READ, first.next())
            .await
            .map_err(|_| anyhow!("no delivery within {READ:?}"))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        ensure!(all.contains(d.id()), "unexpected message {}", d.id());
        d.ack().await?;
        acked.insert(d.id().to_owned());
    }
    first.close().await.context("close")?;

    // Reopen on a new connection: everything not acked must arrive.
    let bus2 = ctx.connect().await?;
    let mut second = bus2.subscribe(&topic, latest(&group)).await?;
    let rest: HashSet<String> = all.difference(&acked).cloned().collect();
    let got = collect(&mut second, &rest, READ, false).await?;
    second.close().await?;
    let _ = bus2.close().await;
    Ok(Outcome::with_duplicates(got.duplicates).note(format!(
        "{} acked before close, {} after reopening",
        acked.len(),
        rest.len()
    )))
}

/// Two groups each get every message.
pub async fn consumer_groups_fan_out(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let (ga, gb) = (ctx.group("a"), ctx.group("b"));
    let bus = &ctx.bus;
    bus.provision(&topic, &latest(&ga)).await?;
    bus.provision(&topic, &latest(&gb)).await?;
    let mut a = bus.subscribe(&topic, latest(&ga)).await?;
    let mut b = bus.subscribe(&topic, latest(&gb)).await?;
    let n = ctx.count(50);
    let ids = publish_all(
        bus.as_ref(),
        &topic,
        (0..n).map(|i| keyed(&format!("k{}", i % 5), i)).collect(),
    )
    .await?;
    let expected: HashSet<String> = ids.into_iter().collect();
    let (ra, rb) = tokio::join!(
        collect(&mut a, &expected, READ, true),
        collect(&mut b, &expected, READ, true)
    );
    let (ra, rb) = (ra.context("group a")?, rb.context("group b")?);
    a.close().await?;
    b.close().await?;
    Ok(Outcome::with_duplicates(ra.duplicates + rb.duplicates))
}

/// Three consumers of one group each get some messages, and together all of them.
///
/// Messages are published in small waves (and more waves follow while a member still has
/// nothing, up to a minute), so backends that rebalance partitions when members join get the
/// time they need; every published message must arrive exactly once or more.
pub async fn competing_consumers_share(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let n = ctx.count(300).max(30);
    ctx.bus.provision(&topic, &latest(&group)).await?;
    let mut buses = vec![ctx.bus.clone()];
    for _ in 0..2 {
        buses.push(ctx.connect().await?);
    }
    let mut subs = Vec::new();
    for b in &buses {
        subs.push(b.subscribe(&topic, latest(&group)).await?);
    }
    let expected: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let shares: Arc<Vec<AtomicUsize>> =
        Arc::new((0..buses.len()).map(|_| AtomicUsize::new(0)).collect());
    let publishing = Arc::new(AtomicBool::new(true));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut sub) in subs.into_iter().enumerate() {
        let (expected, seen, shares, publishing) = (
            expected.clone(),
            seen.clone(),
            shares.clone(),
            publishing.clone(),
        );
        tasks.spawn(async move {
            let mut dups = 0u64;
            let deadline = Instant::now() + READ * 2;
            loop {
                let all_in = !publishing.load(AtomicOrdering::Acquire) && {
                    let (e, s) = (lock(&expected)?, lock(&seen)?);
                    s.len() >= e.len()
                };
                if all_in || Instant::now() >= deadline {
                    break;
                }
                let next = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
                let Ok(next) = next else { continue };
                let Some(d) = next.context("next")? else {
                    break;
                };
                if lock(&seen)?.insert(d.id().to_owned()) {
                    shares[i].fetch_add(1, AtomicOrdering::Relaxed);
                } else {
                    dups += 1;
                }
                d.ack().await?;
                // Simulated work, so that one fast consumer cannot take everything.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sub.close().await?;
            Ok::<_, anyhow::Error>(dups)
        });
    }
    let share_of = |shares: &[AtomicUsize]| -> Vec<usize> {
        shares
            .iter()
            .map(|s| s.load(AtomicOrdering::Relaxed))
            .collect()
    };
    let started = Instant::now();
    let mut published = 0usize;
    let mut wave = 0usize;
    while published < n || (share_of(&shares).contains(&0) && started.elapsed() < READ) {
        let msgs: Vec<_> = (0..10)
            .map(|j| keyed(&format!("k{}", (wave * 10 + j) % 30), wave * 10 + j))
            .collect();
        let ids = publish_all(ctx.bus.as_ref(), &topic, msgs).await?;
        lock(&expected)?.extend(ids);
        published += 10;
        wave += 1;
        tokio::time::sleep(Duration::from_millis(if published < n { 30 } else { 200 })).await;
    }
    publishing.store(false, AtomicOrdering::Release);
    let mut dups = 0;
    while let Some(r) = tasks.join_next().await {
        dups += r.context("consumer task panicked")??;
    }
    let (expected, seen) = (lock(&expected)?.clone(), lock(&seen)?.clone());
    let missing = expected.difference(&seen).count();
    ensure!(
        missing == 0,
        "lost messages: {missing} of {} never arrived",
        expected.len()
    );
    let shares = share_of(&shares);
    ensure!(
        !shares.contains(&0),
        "a consumer got nothing: shares {shares:?} after {published} messages in {:.1?}",
        started.elapsed()
    );
    for b in buses.iter().skip(1) {
        let _ = b.close().await;
    }
    Ok(Outcome::with_duplicates(dups).note(format!("shares {shares:?} of {published}")))
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow!("a consumer task panicked while holding a lock"))
}
