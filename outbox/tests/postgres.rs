//! The outbox against the real PostgreSQL (`BUSBAR_POSTGRES_URL`, default
//! `postgres://busbar@127.0.0.1:5432/busbar`; `scripts/brokers.sh up` starts one). Each test
//! works in a schema of its own, so tests and relays of different tests never meet.
//!
//! Without a server the tests are reported ignored, or fail with `BUSBAR_REQUIRE_BROKERS=1`.

#![allow(clippy::panic, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use async_trait::async_trait;
use busbar_core::memory::MemoryBus;
use busbar_core::{
    Capabilities, Error, ErrorKind, EventBus, Message, PublishOptions, RetryPolicy,
    SubscribeOptions, Subscriber,
};
use busbar_outbox::{Outbox, Relay};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// `BUSBAR_POSTGRES_URL`, else a container where Docker answers, else the default (see
/// `busbar_conformance::containers`).
fn url() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        busbar_conformance::containers::urls_for(
            "postgres",
            "BUSBAR_POSTGRES_URL",
            "postgres://busbar@127.0.0.1:5432/busbar",
        )
        .swap_remove(0)
    })
    .clone()
}

/// A pool whose connections work in a fresh schema.
async fn pool() -> Result<PgPool> {
    let base: PgConnectOptions = url().parse().context("BUSBAR_POSTGRES_URL")?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(base.clone())
        .await
        .context("connecting to PostgreSQL")?;
    let schema = format!("busbar_test_{}", uuid_like());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(base.options([("search_path", schema.as_str())]))
        .await?;
    Outbox::migrate(&pool).await?;
    Ok(pool)
}

fn uuid_like() -> String {
    Message::new("").id.replace('-', "")
}

fn event(key: &str, i: usize) -> Message {
    Message::new(format!("{key}:{i}")).with_key(key)
}

/// Reads deliveries until every id in `want` arrived (or `limit` passes); returns per-key
/// sequences of first arrivals and the duplicate count.
async fn read_all(
    sub: &mut Box<dyn Subscriber>,
    want: &HashSet<String>,
    limit: Duration,
) -> Result<(HashMap<String, Vec<usize>>, usize)> {
    let deadline = Instant::now() + limit;
    let mut seen = HashSet::new();
    let mut order: HashMap<String, Vec<usize>> = HashMap::new();
    let mut dups = 0;
    while seen.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "only {} of {} arrived",
            seen.len(),
            want.len()
        );
        let Ok(next) = tokio::time::timeout(left, sub.next()).await else {
            continue;
        };
        let d = next?.ok_or_else(|| anyhow!("subscription ended"))?;
        ensure!(want.contains(d.id()), "unexpected message {}", d.id());
        if seen.insert(d.id().to_owned()) {
            let body = String::from_utf8_lossy(d.payload()).into_owned();
            let (k, i) = body
                .split_once(':')
                .ok_or_else(|| anyhow!("bad body {body}"))?;
            order.entry(k.to_owned()).or_default().push(i.parse()?);
        } else {
            dups += 1;
        }
        d.ack().await?;
    }
    Ok((order, dups))
}

fn check_order(order: &HashMap<String, Vec<usize>>) -> Result<()> {
    for (k, seq) in order {
        ensure!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "key {k} arrived out of order: {seq:?}"
        );
    }
    Ok(())
}

async fn enqueue_keys(
    pool: &PgPool,
    topic: &str,
    keys: usize,
    per_key: usize,
) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    // Interleaved keys, many transactions, so rows of one key are spread over the table.
    for i in 0..per_key {
        let mut tx = pool.begin().await?;
        let batch: Vec<Message> = (0..keys).map(|k| event(&format!("k{k}"), i)).collect();
        ids.extend(batch.iter().map(|m| m.id.clone()));
        Outbox::enqueue_batch(&mut tx, topic, &batch).await?;
        tx.commit().await?;
    }
    Ok(ids)
}

async fn subscriber(bus: &MemoryBus, topic: &str) -> Result<Box<dyn Subscriber>> {
    Ok(bus
        .subscribe(topic, SubscribeOptions::new("g").max_in_flight(10_000))
        .await?)
}

/// A rolled-back transaction publishes nothing; a committed one exactly its events.
async fn rollback_publishes_nothing_commit_publishes_exactly() -> Result<()> {
    let pool = pool().await?;
    let bus = MemoryBus::new();
    let mut sub = subscriber(&bus, "orders").await?;
    let mut tx = pool.begin().await?;
    sqlx::query("CREATE TABLE orders (id INT PRIMARY KEY, total INT)")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders VALUES (1, 10)")
        .execute(&mut *tx)
        .await?;
    Outbox::enqueue(&mut tx, "orders", &event("o1", 0)).await?;
    tx.rollback().await?;

    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders VALUES (2, 20)")
        .execute(&mut *tx)
        .await?;
    let committed: Vec<Message> = (0..5).map(|i| event("o2", i)).collect();
    Outbox::enqueue_batch(&mut tx, "orders", &committed).await?;
    tx.commit().await?;

    let relay = Relay::new(pool.clone(), Arc::new(bus.clone()));
    let r = relay.relay_once().await?;
    ensure!(r.published == 5, "published {r:?}");
    let want: HashSet<String> = committed.iter().map(|m| m.id.clone()).collect();
    let (order, dups) = read_all(&mut sub, &want, Duration::from_secs(10)).await?;
    check_order(&order)?;
    ensure!(dups == 0, "{dups} duplicates");
    ensure!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err(),
        "something more than the committed events arrived"
    );
    ensure!(Outbox::pending(&pool).await? == 0, "rows left pending");
    ensure!(relay.relay_once().await?.published == 0, "published twice");
    Ok(())
}

/// Events a consumer's handler enqueues carry the handled event's correlation and causation
/// ids when the relay publishes them later.
async fn enqueued_by_a_handler_they_join_its_chain() -> Result<()> {
    use busbar_core::{Consumer, Event};
    let pool = pool().await?;
    let bus = MemoryBus::new();
    bus.provision("payments", &SubscribeOptions::new("g"))
        .await?;
    let mut sub = subscriber(&bus, "receipts").await?;
    let cause = Message::new("paid").with_key("o1");
    bus.publish("payments", cause.clone(), &PublishOptions::default())
        .await?;
    let p = pool.clone();
    let report = Consumer::new(Arc::new(bus.clone()), "payments")
        .group("g")
        .run_until(
            move |_e: Event| {
                let p = p.clone();
                async move {
                    let mut tx = p.begin().await.map_err(|e| e.to_string())?;
                    Outbox::enqueue(&mut tx, "receipts", &event("o1", 0))
                        .await
                        .map_err(|e| e.to_string())?;
                    tx.commit().await.map_err(|e| e.to_string())
                }
            },
            tokio::time::sleep(Duration::from_millis(500)),
        )
        .await?;
    ensure!(report.processed == 1, "{report:?}");
    let r = Relay::new(pool.clone(), Arc::new(bus.clone()))
        .relay_once()
        .await?;
    ensure!(r.published == 1, "published {r:?}");
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .map_err(|_| anyhow!("the receipt never arrived"))??
        .ok_or_else(|| anyhow!("subscription ended"))?;
    ensure!(
        d.message().correlation_id() == cause.id
            && d.message().causation_id() == Some(cause.id.as_str()),
        "the receipt is not in the payment's chain: {:?}",
        d.message().headers
    );
    Ok(())
}

/// A relay is dropped mid-batch; another takes over: nothing lost, per-key order kept.
async fn killed_relay_loses_nothing() -> Result<()> {
    let pool = pool().await?;
    let bus = MemoryBus::new();
    let mut sub = subscriber(&bus, "t").await?;
    let want = enqueue_keys(&pool, "t", 20, 50).await?;
    let slow: Arc<dyn EventBus> = Arc::new(Flaky::new(bus.clone(), Duration::from_millis(30)));
    let first = tokio::spawn(
        Relay::new(pool.clone(), slow)
            .batch_size(40)
            .run(futures::future::pending::<()>()),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.abort();
    let _ = first.await;
    let left = Outbox::pending(&pool).await?;
    ensure!(
        left > 0 && left < 1000,
        "the first relay should be mid-way; {left} pending"
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(Relay::new(pool.clone(), Arc::new(bus.clone())).run(stopped));
    let (order, dups) = read_all(&mut sub, &want, Duration::from_secs(60)).await?;
    check_order(&order)?;
    let _ = stop.send(());
    second.await??;
    eprintln!(
        "  killed relay: {} events, {left} pending at the kill, {dups} duplicates",
        want.len()
    );
    Ok(())
}

/// Two relays at once: nothing lost, per-key order kept.
async fn two_relays_keep_order() -> Result<()> {
    let pool = pool().await?;
    let bus = MemoryBus::new();
    let mut sub = subscriber(&bus, "t").await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut relays = Vec::new();
    for _ in 0..2 {
        let mut rx = stopped.clone();
        let delayed: Arc<dyn EventBus> =
            Arc::new(Flaky::new(bus.clone(), Duration::from_millis(2)));
        relays.push(tokio::spawn(
            Relay::new(pool.clone(), delayed)
                .batch_size(25)
                .poll_interval(Duration::from_millis(50))
                .run(async move {
                    let _ = rx.wait_for(|s| *s).await;
                }),
        ));
    }
    let want = enqueue_keys(&pool, "t", 20, 50).await?;
    let (order, dups) = read_all(&mut sub, &want, Duration::from_secs(60)).await?;
    check_order(&order)?;
    let _ = stop.send(true);
    let mut shares = Vec::new();
    for r in relays {
        shares.push(r.await??.published);
    }
    ensure!(dups == 0, "{dups} duplicates without any failure");
    ensure!(
        shares.iter().all(|s| *s > 0),
        "one relay did nothing: {shares:?}"
    );
    eprintln!("  two relays: shares {shares:?}");
    Ok(())
}

/// The bus fails for a while: delivery is delayed, nothing lost, order kept.
async fn bus_outage_delays_but_loses_nothing() -> Result<()> {
    let pool = pool().await?;
    let bus = MemoryBus::new();
    let mut sub = subscriber(&bus, "t").await?;
    let flaky = Arc::new(Flaky::new(bus.clone(), Duration::ZERO));
    flaky.down.store(true, Ordering::Release);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        Relay::new(pool.clone(), flaky.clone() as Arc<dyn EventBus>)
            .retry(
                RetryPolicy::builder()
                    .max_attempts(100)
                    .initial_delay(Duration::from_millis(20))
                    .max_delay(Duration::from_millis(200))
                    .build()?,
            )
            .poll_interval(Duration::from_millis(50))
            .run(stopped),
    );
    let want = enqueue_keys(&pool, "t", 10, 20).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        Outbox::pending(&pool).await? == 200,
        "rows published while the bus was down"
    );
    flaky.down.store(false, Ordering::Release);
    let (order, _) = read_all(&mut sub, &want, Duration::from_secs(30)).await?;
    check_order(&order)?;
    let _ = stop.send(());
    let report = relay.await??;
    ensure!(report.retried > 0 && report.parked == 0, "{report:?}");
    eprintln!(
        "  outage: {report:?}; {} failed publish calls",
        flaky.failures.load(Ordering::Relaxed)
    );
    Ok(())
}

/// A row that keeps failing is parked with its error; other keys go on; its own key waits
/// behind it until it is requeued.
async fn poison_row_is_parked_without_blocking_other_keys() -> Result<()> {
    let pool = pool().await?;
    let bus = MemoryBus::new();
    let mut sub = subscriber(&bus, "t").await?;
    let flaky = Arc::new(Flaky::new(bus.clone(), Duration::ZERO));
    let mut tx = pool.begin().await?;
    let poison = event("bad", 0).with_header("poison", "1");
    let after = event("bad", 1);
    let others: Vec<Message> = (0..10).map(|i| event("good", i)).collect();
    Outbox::enqueue(&mut tx, "t", &poison).await?;
    Outbox::enqueue(&mut tx, "t", &after).await?;
    Outbox::enqueue_batch(&mut tx, "t", &others).await?;
    tx.commit().await?;
    let relay = Relay::new(pool.clone(), flaky.clone() as Arc<dyn EventBus>).retry(
        RetryPolicy::builder()
            .max_attempts(3)
            .initial_delay(Duration::from_millis(1))
            .max_delay(Duration::from_millis(5))
            .build()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Outbox::parked(&pool).await?.is_empty() {
        ensure!(Instant::now() < deadline, "the poison row was never parked");
        relay.relay_once().await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let parked = Outbox::parked(&pool).await?;
    ensure!(
        parked.len() == 1 && parked[0].message_id == poison.id,
        "{parked:?}"
    );
    ensure!(parked[0].attempts == 3, "{parked:?}");
    ensure!(
        parked[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("poison")),
        "{parked:?}"
    );
    let good: HashSet<String> = others.iter().map(|m| m.id.clone()).collect();
    let (order, _) = read_all(&mut sub, &good, Duration::from_secs(10)).await?;
    check_order(&order)?;
    ensure!(
        Outbox::pending(&pool).await? == 2,
        "the parked row and the one behind it wait"
    );
    // Fixed: requeue; both rows of the key go out, in order.
    flaky.reject_poison.store(false, Ordering::Release);
    ensure!(Outbox::requeue(&pool, parked[0].seq).await?, "requeue");
    relay.relay_once().await?;
    let rest: HashSet<String> = [poison.id.clone(), after.id.clone()].into();
    let (order, _) = read_all(&mut sub, &rest, Duration::from_secs(10)).await?;
    ensure!(order.get("bad") == Some(&vec![0, 1]), "{order:?}");
    Ok(())
}

/// A bus wrapper: delays publishes, fails them all while `down`, and rejects messages with
/// a `poison` header while `reject_poison`.
#[derive(Debug)]
struct Flaky {
    inner: MemoryBus,
    delay: Duration,
    down: AtomicBool,
    reject_poison: AtomicBool,
    failures: AtomicUsize,
}

impl Flaky {
    fn new(inner: MemoryBus, delay: Duration) -> Self {
        Self {
            inner,
            delay,
            down: AtomicBool::new(false),
            reject_poison: AtomicBool::new(true),
            failures: AtomicUsize::new(0),
        }
    }

    /// Checked before publishing (the delay comes after it, so a relay killed meanwhile
    /// has published rows it has not marked yet).
    async fn gate(&self, messages: &[Message]) -> busbar_core::Result<()> {
        if self.down.load(Ordering::Acquire) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(Error::new(
                ErrorKind::Connection,
                "the broker is down (test)",
            ));
        }
        if self.reject_poison.load(Ordering::Acquire)
            && messages.iter().any(|m| m.headers.get("poison").is_some())
        {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(Error::new(
                ErrorKind::Timeout,
                "poison message times out (test)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl EventBus for Flaky {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn publish(
        &self,
        topic: &str,
        message: Message,
        options: &PublishOptions,
    ) -> busbar_core::Result<()> {
        self.gate(std::slice::from_ref(&message)).await?;
        self.inner.publish(topic, message, options).await?;
        tokio::time::sleep(self.delay).await;
        Ok(())
    }
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> busbar_core::Result<()> {
        self.gate(&messages).await?;
        self.inner.publish_batch(topic, messages, options).await?;
        tokio::time::sleep(self.delay).await;
        Ok(())
    }
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> busbar_core::Result<Box<dyn Subscriber>> {
        self.inner.subscribe(topic, options).await
    }
    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> busbar_core::Result<()> {
        self.inner.provision(topic, options).await
    }
    async fn close(&self) -> busbar_core::Result<()> {
        self.inner.close().await
    }
}

type TestFn = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let runtime = busbar_conformance::test_runtime();
    let reachable = runtime.block_on(async {
        let opts: std::result::Result<PgConnectOptions, _> = url().parse();
        match opts {
            Ok(o) => PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(o)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    let required = busbar_conformance::Harness::brokers_required();
    let tests: &[(&str, TestFn)] = &[
        (
            "rollback_publishes_nothing_commit_publishes_exactly",
            || Box::pin(rollback_publishes_nothing_commit_publishes_exactly()),
        ),
        ("enqueued_by_a_handler_they_join_its_chain", || {
            Box::pin(enqueued_by_a_handler_they_join_its_chain())
        }),
        ("killed_relay_loses_nothing", || {
            Box::pin(killed_relay_loses_nothing())
        }),
        (
            "two_relays_keep_order",
            || Box::pin(two_relays_keep_order()),
        ),
        ("bus_outage_delays_but_loses_nothing", || {
            Box::pin(bus_outage_delays_but_loses_nothing())
        }),
        ("poison_row_is_parked_without_blocking_other_keys", || {
            Box::pin(poison_row_is_parked_without_blocking_other_keys())
        }),
    ];
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            let rt = runtime.clone();
            let down = reachable.clone().err();
            let trial = libtest_mimic::Trial::test(name, move || {
                if let Some(why) = &down {
                    return Err(format!("no PostgreSQL at {}: {why}; run scripts/brokers.sh up", url()).into());
                }
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(120), test()).await })
                    .map_err(|_| libtest_mimic::Failed::from("timed out after 120 s"))?
                    .map_err(|e| format!("{e:#}").into())
            });
            match &reachable {
                Err(why) if !required => {
                    eprintln!("IGNORED {name}: no PostgreSQL ({why}); run scripts/brokers.sh up or set BUSBAR_POSTGRES_URL");
                    trial.with_ignored_flag(true)
                }
                _ => trial,
            }
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    busbar_conformance::containers::remove_all();
    std::process::exit(if conclusion.has_failed() { 101 } else { 0 })
}
