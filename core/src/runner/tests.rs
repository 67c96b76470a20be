use super::*;
use crate::bus::{Ack, NackAction};
use crate::memory::MemoryBus;
use crate::message::Message;
use crate::options::{PublishOptions, StartPosition};
use async_trait::async_trait;
use std::sync::atomic::AtomicUsize;

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(max_attempts)
        .initial_delay(Duration::from_millis(5))
        .max_delay(Duration::from_millis(20))
        .build()
        .expect("valid policy")
}

async fn setup(topic: &str, group: &str) -> Arc<dyn EventBus> {
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    bus.provision(topic, &SubscribeOptions::new(group))
        .await
        .expect("provision");
    bus
}

async fn publish(bus: &Arc<dyn EventBus>, topic: &str, key: Option<&str>, body: String) {
    let mut m = Message::new(body);
    m.key = key.map(str::to_owned);
    bus.publish(topic, m, &PublishOptions::default())
        .await
        .expect("publish");
}

/// Resolves once `cond` holds (polled), or after `limit`.
async fn until(limit: Duration, cond: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !cond() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn seq_of(e: &Event) -> (String, usize) {
    let body = String::from_utf8_lossy(e.payload()).into_owned();
    let (k, n) = body.rsplit_once('-').expect("key-n body");
    (k.to_owned(), n.parse().expect("number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_while_keys_run_concurrently() {
    const KEYS: usize = 8;
    const PER_KEY: usize = 40;
    let bus = setup("t", "g").await;
    for n in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("k{k}");
            publish(&bus, "t", Some(&key), format!("{key}-{n}")).await;
        }
    }
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let running_keys: Arc<Mutex<Vec<String>>> = Arc::default();
    let violations = Arc::new(AtomicUsize::new(0));
    let (s, r, m, rk, v) = (
        seen.clone(),
        running.clone(),
        max_running.clone(),
        running_keys.clone(),
        violations.clone(),
    );
    let total = KEYS * PER_KEY;
    let done = seen.clone();
    let report = Consumer::new(bus, "t")
        .group("g")
        .concurrency(4)
        .run_until(
            move |e: Event| {
                let (s, r, m, rk, v) = (s.clone(), r.clone(), m.clone(), rk.clone(), v.clone());
                async move {
                    let (key, n) = seq_of(&e);
                    {
                        let mut keys = rk.lock().expect("lock");
                        if keys.contains(&key) {
                            v.fetch_add(1, AtomicOrdering::SeqCst);
                        }
                        keys.push(key.clone());
                    }
                    let now = r.fetch_add(1, AtomicOrdering::SeqCst) + 1;
                    m.fetch_max(now, AtomicOrdering::SeqCst);
                    tokio::time::sleep(Duration::from_micros(200 + fastrand::u64(0..800))).await;
                    r.fetch_sub(1, AtomicOrdering::SeqCst);
                    rk.lock().expect("lock").retain(|k| *k != key);
                    s.lock().expect("lock").entry(key).or_default().push(n);
                    Ok::<(), String>(())
                }
            },
            until(Duration::from_secs(20), move || {
                done.lock()
                    .expect("lock")
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
                    >= total
            }),
        )
        .await
        .expect("run");
    assert_eq!(report.processed as usize, total);
    assert_eq!(
        violations.load(AtomicOrdering::SeqCst),
        0,
        "a key ran twice at once"
    );
    for (key, ns) in seen.lock().expect("lock").iter() {
        assert_eq!(*ns, (0..PER_KEY).collect::<Vec<_>>(), "order of {key}");
    }
    let max = max_running.load(AtomicOrdering::SeqCst);
    assert!(max > 1, "keys never ran concurrently");
    assert!(max <= 4, "concurrency limit exceeded: {max}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_retried_then_dead_lettered_while_other_keys_flow() {
    let bus = setup("orders", "g").await;
    bus.provision("orders.dlq", &SubscribeOptions::new("inspect"))
        .await
        .expect("provision dlq");
    publish(&bus, "orders", Some("bad"), "bad-0".into()).await;
    publish(&bus, "orders", Some("bad"), "bad-1".into()).await;
    for n in 0..20 {
        publish(&bus, "orders", Some("good"), format!("good-{n}")).await;
    }
    let log: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let l = log.clone();
    let done = log.clone();
    let report = Consumer::new(bus.clone(), "orders")
        .group("g")
        .retry(
            RetryPolicy::builder()
                .max_attempts(3)
                .initial_delay(Duration::from_millis(40))
                .max_delay(Duration::from_millis(40))
                .multiplier(1.0)
                .build()
                .expect("policy"),
        )
        .run_until(
            move |e: Event| {
                let l = l.clone();
                async move {
                    let body = String::from_utf8_lossy(e.payload()).into_owned();
                    l.lock().expect("lock").push((body.clone(), e.attempt()));
                    if body == "bad-0" {
                        Err(format!("cannot parse {body}"))
                    } else {
                        Ok(())
                    }
                }
            },
            until(Duration::from_secs(10), move || {
                done.lock().expect("lock").iter().any(|(b, _)| b == "bad-1")
            }),
        )
        .await
        .expect("run");
    let log = log.lock().expect("lock").clone();
    let attempts: Vec<u32> = log
        .iter()
        .filter(|(b, _)| b == "bad-0")
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(
        attempts,
        [1, 2, 3],
        "three attempts with increasing attempt numbers"
    );
    let pos = |b: &str| log.iter().position(|(x, _)| x == b).expect("seen");
    let last_bad0 = log.iter().rposition(|(b, _)| b == "bad-0").expect("seen");
    assert!(
        pos("good-19") < last_bad0,
        "other keys were blocked by the retries"
    );
    assert!(pos("bad-1") > last_bad0, "bad-1 overtook bad-0");
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.retried, 2);
    assert_eq!(report.processed, 21);

    let mut dlq = bus
        .subscribe("orders.dlq", SubscribeOptions::new("inspect"))
        .await
        .expect("sub");
    let dead = tokio::time::timeout(Duration::from_secs(2), dlq.next())
        .await
        .expect("dead letter arrives")
        .expect("ok")
        .expect("some");
    assert_eq!(&dead.payload()[..], b"bad-0");
    assert_eq!(dead.key(), Some("bad"));
    let h = dead.headers();
    assert_eq!(h.get(crate::dead_letter::headers::ATTEMPTS), Some("3"));
    assert_eq!(
        h.get(crate::dead_letter::headers::ERROR),
        Some("cannot parse bad-0")
    );
    assert_eq!(
        h.get(crate::dead_letter::headers::ORIGINAL_TOPIC),
        Some("orders")
    );
    assert_eq!(h.get(crate::dead_letter::headers::GROUP), Some("g"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_at_once() {
    let bus = setup("t", "g").await;
    bus.provision("t.dlq", &SubscribeOptions::new("inspect"))
        .await
        .expect("provision");
    for n in 0..3 {
        publish(&bus, "t", Some("k"), format!("k-{n}")).await;
    }
    let attempts: Arc<Mutex<Vec<(usize, u32)>>> = Arc::default();
    let a = attempts.clone();
    let done = attempts.clone();
    let report = Consumer::new(bus.clone(), "t")
        .group("g")
        .retry(fast_retry(5))
        .run_until(
            move |e: Event| {
                let a = a.clone();
                async move {
                    let (_, n) = seq_of(&e);
                    a.lock().expect("lock").push((n, e.attempt()));
                    match n {
                        // Directly, and boxed as applications usually return errors.
                        0 => Err(Box::new(Permanent::new("not an order"))
                            as Box<dyn std::error::Error + Send + Sync>),
                        1 => Err("a transient failure".into()),
                        _ => Ok(()),
                    }
                }
            },
            until(Duration::from_secs(10), move || {
                done.lock().expect("lock").len() >= 7
            }),
        )
        .await
        .expect("run");
    let attempts = attempts.lock().expect("lock").clone();
    assert_eq!(
        attempts.iter().filter(|(n, _)| *n == 0).count(),
        1,
        "a permanent failure is not retried: {attempts:?}"
    );
    assert_eq!(attempts.iter().filter(|(n, _)| *n == 1).count(), 5);
    assert_eq!(report.dead_lettered, 2);
    let mut dlq = bus
        .subscribe("t.dlq", SubscribeOptions::new("inspect"))
        .await
        .expect("subscribe");
    let first = dlq.next().await.expect("next").expect("a dead letter");
    assert_eq!(first.payload().as_ref(), b"k-0");
    assert_eq!(
        first.headers().get(crate::dead_letter::headers::ATTEMPTS),
        Some("1")
    );
    assert!(first
        .headers()
        .get(crate::dead_letter::headers::ERROR)
        .is_some_and(|e| e.contains("not an order")));
}

#[test]
fn permanent_is_recognised_directly_and_boxed() {
    assert!(Failure::of(Permanent::new("x")).permanent);
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(Permanent::new("x"));
    assert!(Failure::of(boxed).permanent);
    assert!(!Failure::of("x".to_string()).permanent);
    assert_eq!(
        Failure::of(Permanent::new("bad")).text,
        "permanent failure: bad"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_failed_attempt_not_a_crash() {
    let bus = setup("t", "g").await;
    for n in 0..5 {
        publish(&bus, "t", Some("k"), format!("k-{n}")).await;
    }
    let handled: Arc<Mutex<Vec<(usize, u32)>>> = Arc::default();
    let h = handled.clone();
    let done = handled.clone();
    let report = Consumer::new(bus, "t")
        .group("g")
        .retry(fast_retry(3))
        .run_until(
            move |e: Event| {
                let h = h.clone();
                let (_, n) = seq_of(&e);
                if n == 1 && e.attempt() == 1 {
                    panic!("synchronous panic before the future exists");
                }
                async move {
                    if n == 3 && e.attempt() == 1 {
                        panic!("panic inside the future");
                    }
                    h.lock().expect("lock").push((n, e.attempt()));
                    Ok::<(), String>(())
                }
            },
            until(Duration::from_secs(10), move || {
                done.lock().expect("lock").len() >= 5
            }),
        )
        .await
        .expect("run");
    let handled = handled.lock().expect("lock").clone();
    assert_eq!(handled, [(0, 1), (1, 2), (2, 1), (3, 2), (4, 1)]);
    assert_eq!(report.processed, 5);
    assert_eq!(report.retried, 2);
    assert_eq!(report.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_work_and_reports_what_is_left() {
    let bus = setup("t", "g").await;
    // Key "slow": 3 messages taking 300 ms each; key "stuck": one that never finishes.
    for n in 0..3 {
        publish(&bus, "t", Some("slow"), format!("slow-{n}")).await;
    }
    publish(&bus, "t", Some("stuck"), "stuck-0".into()).await;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let s2 = started.clone();
    let report = Consumer::new(bus.clone(), "t")
        .group("g")
        .drain_timeout(Duration::from_millis(500))
        .ack_timeout(Duration::from_secs(60))
        .run_until(
            move |e: Event| {
                let s = s.clone();
                async move {
                    s.fetch_add(1, AtomicOrdering::SeqCst);
                    let wait = if e.key() == Some("stuck") { 3600 } else { 0 };
                    tokio::time::sleep(Duration::from_millis(300) + Duration::from_secs(wait))
                        .await;
                    Ok::<(), String>(())
                }
            },
            // Shut down while slow-0 and stuck-0 are running.
            until(Duration::from_secs(5), move || {
                s2.load(AtomicOrdering::SeqCst) >= 2
            }),
        )
        .await
        .expect("run");
    // slow-0 finishes within the drain deadline and is acked; slow-1 and slow-2 never start;
    // stuck-0 is abandoned at the deadline.
    assert_eq!(report.received, 4);
    assert_eq!(report.processed, 1);
    assert_eq!(report.left_unacked, 3);
    assert!(report.error.is_none());

    // Nothing is lost: the next consumer gets exactly the three unacked ones. The two no
    // handler ever received were released, not counted: they come back at attempt 1; the one
    // abandoned in its handler comes back at attempt 2.
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let sn = seen.clone();
    let done = seen.clone();
    Consumer::new(bus, "t")
        .group("g")
        .run_until(
            move |e: Event| {
                let sn = sn.clone();
                async move {
                    sn.lock().expect("lock").push((
                        String::from_utf8_lossy(e.payload()).into_owned(),
                        e.attempt(),
                    ));
                    Ok::<(), String>(())
                }
            },
            until(Duration::from_secs(5), move || {
                done.lock().expect("lock").len() >= 3
            }),
        )
        .await
        .expect("run");
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("slow-1".to_owned(), 1),
            ("slow-2".to_owned(), 1),
            ("stuck-0".to_owned(), 2)
        ]
    );
}

/// A bus wrapper that counts deliveries handed out but not yet settled or dropped.
#[derive(Debug)]
struct CountingBus {
    inner: MemoryBus,
    outstanding: Arc<AtomicUsize>,
    max_outstanding: Arc<AtomicUsize>,
}

struct CountingSub {
    inner: Box<dyn Subscriber>,
    outstanding: Arc<AtomicUsize>,
    max_outstanding: Arc<AtomicUsize>,
}

struct CountingAck {
    delivery: Delivery,
    outstanding: Arc<AtomicUsize>,
    done: AtomicBool,
}

impl CountingAck {
    fn finish(&self) {
        if !self.done.swap(true, AtomicOrdering::SeqCst) {
            self.outstanding.fetch_sub(1, AtomicOrdering::SeqCst);
        }
    }
}

impl Drop for CountingAck {
    fn drop(&mut self) {
        self.finish();
    }
}

#[async_trait]
impl Ack for CountingAck {
    async fn ack(&self) -> Result<()> {
        self.delivery.ack().await?;
        self.finish();
        Ok(())
    }
    async fn redeliver(&self, after: Duration) -> Result<()> {
        let action = if after.is_zero() {
            NackAction::Redeliver
        } else {
            NackAction::RedeliverAfter(after)
        };
        self.delivery.nack(action).await?;
        self.finish();
        Ok(())
    }
    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.delivery.extend_deadline(by).await
    }
}

#[async_trait]
impl Subscriber for CountingSub {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        let Some(d) = self.inner.next().await? else {
            return Ok(None);
        };
        let now = self.outstanding.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        self.max_outstanding.fetch_max(now, AtomicOrdering::SeqCst);
        let event = d.event().clone();
        Ok(Some(crate::raw::delivery(
            event,
            Box::new(CountingAck {
                delivery: d,
                outstanding: self.outstanding.clone(),
                done: AtomicBool::new(false),
            }),
        )))
    }
    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }
}

#[async_trait]
impl EventBus for CountingBus {
    fn backend(&self) -> &'static str {
        "counting"
    }
    fn capabilities(&self) -> crate::Capabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, m: Message, o: &PublishOptions) -> Result<()> {
        self.inner.publish(topic, m, o).await
    }
    async fn publish_batch(&self, topic: &str, m: Vec<Message>, o: &PublishOptions) -> Result<()> {
        self.inner.publish_batch(topic, m, o).await
    }
    async fn subscribe(&self, topic: &str, o: SubscribeOptions) -> Result<Box<dyn Subscriber>> {
        // The inner subscriber is unbounded: the runner alone must keep the bound.
        let inner = self
            .inner
            .subscribe(topic, o.max_in_flight(1_000_000))
            .await?;
        Ok(Box::new(CountingSub {
            inner,
            outstanding: self.outstanding.clone(),
            max_outstanding: self.max_outstanding.clone(),
        }))
    }
    async fn provision(&self, topic: &str, o: &SubscribeOptions) -> Result<()> {
        self.inner.provision(topic, o).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_holds_more_than_max_in_flight_deliveries() {
    let counting = Arc::new(CountingBus {
        inner: MemoryBus::new(),
        outstanding: Arc::default(),
        max_outstanding: Arc::default(),
    });
    let bus: Arc<dyn EventBus> = counting.clone();
    bus.provision(
        "t",
        &SubscribeOptions::new("g").start(StartPosition::Earliest),
    )
    .await
    .expect("provision");
    // One hot key: everything queues behind one slow message at a time.
    for n in 0..200 {
        publish(&bus, "t", Some("hot"), format!("hot-{n}")).await;
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let done = handled.clone();
    let report = Consumer::new(bus, "t")
        .group("g")
        .max_in_flight(8)
        .run_until(
            move |_e: Event| {
                let h = h.clone();
                async move {
                    tokio::time::sleep(Duration::from_micros(300)).await;
                    h.fetch_add(1, AtomicOrdering::SeqCst);
                    Ok::<(), String>(())
                }
            },
            until(Duration::from_secs(20), move || {
                done.load(AtomicOrdering::SeqCst) >= 200
            }),
        )
        .await
        .expect("run");
    assert_eq!(report.processed, 200);
    let max = counting.max_outstanding.load(AtomicOrdering::SeqCst);
    assert!(max <= 8, "held {max} deliveries at once; the limit is 8");
    assert!(max >= 2, "the runner never pipelined ({max})");
    assert_eq!(counting.outstanding.load(AtomicOrdering::SeqCst), 0);
}

#[tokio::test]
async fn invalid_settings_fail_before_consuming() {
    let bus = setup("t", "g").await;
    let e = Consumer::new(bus.clone(), "t")
        .concurrency(0)
        .run(|_e: Event| async { Ok::<(), String>(()) })
        .await
        .expect_err("zero concurrency");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = Consumer::new(bus, "bad topic")
        .run(|_e: Event| async { Ok::<(), String>(()) })
        .await
        .expect_err("bad topic");
    assert_eq!(e.kind(), ErrorKind::InvalidTopic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_ends_when_the_bus_closes() {
    let bus = setup("t", "g").await;
    publish(&bus, "t", None, "x-0".into()).await;
    let b = bus.clone();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.close().await
    });
    let report = tokio::time::timeout(
        Duration::from_secs(5),
        Consumer::new(bus, "t")
            .group("g")
            .run(|_e: Event| async { Ok::<(), String>(()) }),
    )
    .await
    .expect("stops when the bus closes")
    .expect("run");
    closer.await.expect("join").expect("close");
    assert_eq!(report.processed, 1);
}

/// A store that fails its first `failures` lookups, then answers from a memory store.
#[derive(Debug, Default)]
struct FlakyStore {
    failures: AtomicUsize,
    /// Lookups that found the key (each becomes a skip).
    found: AtomicUsize,
    inner: crate::idempotency::MemoryStore,
}

#[async_trait]
impl IdempotencyStore for FlakyStore {
    async fn contains(&self, key: &str) -> Result<bool> {
        if self
            .failures
            .fetch_update(AtomicOrdering::AcqRel, AtomicOrdering::Acquire, |n| {
                n.checked_sub(1)
            })
            .is_ok()
        {
            return Err(Error::new(ErrorKind::Connection, "store down"));
        }
        let found = self.inner.contains(key).await?;
        if found {
            self.found.fetch_add(1, AtomicOrdering::AcqRel);
        }
        Ok(found)
    }

    async fn record(&self, key: &str, ttl: Duration) -> Result<()> {
        self.inner.record(key, ttl).await
    }
}

/// The same message delivered three times (published again with its id, as a redelivery
/// after a crash arrives) is handled once; a message whose handler failed first is recorded
/// only after it succeeded; a store that fails is asked again, and the delivery is handled
/// once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_consumer_handles_a_message_once() {
    let bus = setup("t", "g").await;
    let once = Message::new("once").with_key("a");
    for _ in 0..3 {
        bus.publish("t", once.clone(), &PublishOptions::default())
            .await
            .expect("publish");
    }
    let flaky = Message::new("flaky").with_key("b");
    bus.publish("t", flaky.clone(), &PublishOptions::default())
        .await
        .expect("publish");
    let store = Arc::new(FlakyStore {
        failures: AtomicUsize::new(1),
        ..FlakyStore::default()
    });
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let c = calls.clone();
    let done = calls.clone();
    let found = store.clone();
    let report = Consumer::new(bus.clone(), "t")
        .group("g")
        .retry(fast_retry(3))
        .idempotent(store.clone(), Duration::from_secs(60))
        .run_until(
            move |e: Event| {
                let c = c.clone();
                async move {
                    let body = String::from_utf8_lossy(e.payload()).into_owned();
                    let first = {
                        let mut calls = c.lock().expect("calls");
                        calls.push(body.clone());
                        calls.iter().filter(|b| **b == body).count() == 1
                    };
                    if body == "flaky" && first {
                        return Err("first try fails");
                    }
                    Ok(())
                }
            },
            // Three handlings and both duplicates found (a stop after the handlings alone
            // raced the second skip under load: CI saw skipped 1, left_unacked 1).
            until(Duration::from_secs(10), move || {
                done.lock().expect("calls").len() >= 3
                    && found.found.load(AtomicOrdering::Acquire) >= 2
            }),
        )
        .await
        .expect("run");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(
        calls.iter().filter(|b| *b == "once").count(),
        1,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|b| *b == "flaky").count(),
        2,
        "{calls:?}"
    );
    assert_eq!(report.skipped, 2, "{report:?}");
    assert_eq!(report.processed, 2, "{report:?}");
    assert!(store
        .inner
        .contains(&crate::idempotency::key("g", "t", &flaky.id))
        .await
        .expect("store"));
}

/// A store that cannot answer for the first message of a key holds the key: the messages
/// behind it wait, so the key's order holds (the first message used to be handed back while
/// the next one of its key was handled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_idempotency_store_keeps_the_key_in_order() {
    let bus = setup("t", "g").await;
    for n in 0..3 {
        publish(&bus, "t", Some("a"), format!("a-{n}")).await;
    }
    let store = Arc::new(FlakyStore {
        failures: AtomicUsize::new(2),
        ..FlakyStore::default()
    });
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let (s, done) = (seen.clone(), seen.clone());
    let report = Consumer::new(bus.clone(), "t")
        .group("g")
        .idempotent(store, Duration::from_secs(60))
        .run_until(
            move |e: Event| {
                let s = s.clone();
                async move {
                    s.lock().expect("seen").push(seq_of(&e).1);
                    Ok::<(), String>(())
                }
            },
            until(Duration::from_secs(10), move || {
                done.lock().expect("seen").len() >= 3
            }),
        )
        .await
        .expect("run");
    assert_eq!(*seen.lock().expect("seen"), vec![0, 1, 2], "{report:?}");
    assert_eq!(report.processed, 3, "{report:?}");
}

/// Batch mode: no batch holds two events of one key, each key's events succeed in order,
/// only what failed is handled again (after its backoff, in a later batch), a permanent
/// failure is dead-lettered at once, and events of several keys share batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_per_key_order_and_retry_only_what_failed() {
    const KEYS: usize = 8;
    const PER_KEY: usize = 20;
    let bus = setup("t", "g").await;
    bus.provision("t.dlq", &SubscribeOptions::new("inspect"))
        .await
        .expect("provision dlq");
    for n in 0..PER_KEY {
        for k in 0..KEYS {
            publish(&bus, "t", Some(&format!("k{k}")), format!("k{k}-{n}")).await;
        }
    }
    // (key, n, attempt) per handling, and the size of every batch.
    let handled: Arc<Mutex<Vec<(String, usize, u32)>>> = Arc::default();
    let succeeded: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let twice_in_a_batch = Arc::new(AtomicUsize::new(0));
    let (h, s, z, t) = (
        handled.clone(),
        succeeded.clone(),
        sizes.clone(),
        twice_in_a_batch.clone(),
    );
    let done = succeeded.clone();
    let total = KEYS * PER_KEY;
    let report = Consumer::new(bus.clone(), "t")
        .group("g")
        .concurrency(2)
        .retry(fast_retry(3))
        .run_batches_until(
            16,
            move |events: Vec<Event>| {
                let (h, s, z, t) = (h.clone(), s.clone(), z.clone(), t.clone());
                async move {
                    z.lock().expect("sizes").push(events.len());
                    let mut keys: Vec<String> = events.iter().map(|e| seq_of(e).0).collect();
                    keys.sort();
                    keys.dedup();
                    if keys.len() != events.len() {
                        t.fetch_add(1, AtomicOrdering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    events
                        .iter()
                        .map(|e| {
                            let (key, n) = seq_of(e);
                            h.lock()
                                .expect("handled")
                                .push((key.clone(), n, e.attempt()));
                            if n == 7 && key == "k3" {
                                return Err(Box::new(Permanent::new("k3-7 is invalid"))
                                    as Box<dyn std::error::Error + Send + Sync>);
                            }
                            if n % 5 == 2 && e.attempt() == 1 {
                                return Err("fails once".into());
                            }
                            s.lock().expect("ok").entry(key).or_default().push(n);
                            Ok(())
                        })
                        .collect::<Vec<_>>()
                }
            },
            until(Duration::from_secs(20), move || {
                done.lock()
                    .expect("ok")
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
                    >= total - 1
            }),
        )
        .await
        .expect("run");
    assert_eq!(
        twice_in_a_batch.load(AtomicOrdering::SeqCst),
        0,
        "a batch held one key twice"
    );
    for k in 0..KEYS {
        let key = format!("k{k}");
        let expected: Vec<usize> = (0..PER_KEY).filter(|n| !(k == 3 && *n == 7)).collect();
        assert_eq!(
            succeeded.lock().expect("ok").get(&key),
            Some(&expected),
            "order of {key}"
        );
    }
    let handled = handled.lock().expect("handled").clone();
    // Per key, the handlings are in order: n never goes back, and a retry of n comes right
    // after its first try (nothing of the key in between).
    for k in 0..KEYS {
        let key = format!("k{k}");
        let mine: Vec<(usize, u32)> = handled
            .iter()
            .filter(|(x, _, _)| *x == key)
            .map(|(_, n, a)| (*n, *a))
            .collect();
        for w in mine.windows(2) {
            let ((n0, a0), (n1, a1)) = (w[0], w[1]);
            assert!(
                n1 == n0 + 1 && a1 == 1 || (n1 == n0 && a1 == a0 + 1),
                "{key}: {:?} then {:?}",
                (n0, a0),
                (n1, a1)
            );
        }
    }
    // k3-7 would fail once too, but it is dead-lettered at its first failure.
    let failing_once = (0..PER_KEY).filter(|n| n % 5 == 2).count() * KEYS - 1;
    assert_eq!(report.retried as usize, failing_once, "{report:?}");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(report.processed as usize, total - 1, "{report:?}");
    assert!(
        sizes.lock().expect("sizes").iter().any(|n| *n > 1),
        "events were never batched: {:?}",
        sizes.lock().expect("sizes")
    );
    let mut dlq = bus
        .subscribe("t.dlq", SubscribeOptions::new("inspect"))
        .await
        .expect("sub");
    let dead = tokio::time::timeout(Duration::from_secs(2), dlq.next())
        .await
        .expect("dead letter arrives")
        .expect("ok")
        .expect("some");
    assert_eq!(&dead.payload()[..], b"k3-7");
}

/// A batch handler that panics fails every event of its batch, one that answers with fewer
/// outcomes than events fails the ones it left out; both are retried, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_that_panics_or_answers_short_fails_its_events() {
    let bus = setup("t", "g").await;
    for k in 0..4 {
        publish(&bus, "t", Some(&format!("k{k}")), format!("k{k}-0")).await;
    }
    // (key, attempt) of each event, per batch.
    type Batch = Vec<(String, u32)>;
    let batches: Arc<Mutex<Vec<Batch>>> = Arc::default();
    let ok: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let (b, o, done) = (batches.clone(), ok.clone(), ok.clone());
    let report = Consumer::new(bus.clone(), "t")
        .group("g")
        .concurrency(1)
        .retry(fast_retry(5))
        .run_batches_until(
            4,
            move |events: Vec<Event>| {
                let (b, o) = (b.clone(), o.clone());
                async move {
                    let seen: Vec<(String, u32)> =
                        events.iter().map(|e| (seq_of(e).0, e.attempt())).collect();
                    let call = {
                        let mut b = b.lock().expect("batches");
                        b.push(seen.clone());
                        b.len()
                    };
                    match call {
                        1 => panic!("the first batch panics"),
                        // The second answers for its first event only.
                        2 => return vec![Ok::<(), String>(())],
                        _ => {}
                    }
                    o.lock().expect("ok").extend(seen);
                    events.iter().map(|_| Ok(())).collect()
                }
            },
            until(Duration::from_secs(10), move || {
                done.lock().expect("ok").len() + 1 >= 4
            }),
        )
        .await
        .expect("run");
    let batches = batches.lock().expect("batches").clone();
    assert_eq!(
        batches[0].len(),
        4,
        "the first batch takes all four: {batches:?}"
    );
    assert!(batches[0].iter().all(|(_, a)| *a == 1), "{batches:?}");
    assert!(batches[1].iter().all(|(_, a)| *a == 2), "{batches:?}");
    // 4 failed by the panic, all but the first of the second batch by the short answer.
    let short = batches[1].len() - 1;
    assert_eq!(report.retried as usize, 4 + short, "{report:?} {batches:?}");
    assert_eq!(report.processed, 4, "{report:?}");
    let ok = ok.lock().expect("ok").clone();
    assert_eq!(ok.len(), 3, "{batches:?}");
    for (key, attempt) in &ok {
        let expected = if batches[1][1..].iter().any(|(k, _)| k == key) {
            3
        } else {
            2
        };
        assert_eq!(*attempt, expected, "{key}: {batches:?}");
    }
}

#[tokio::test]
async fn run_batches_refuses_a_batch_of_zero() {
    let bus = setup("t", "g").await;
    let e = Consumer::new(bus, "t")
        .run_batches(0, |events: Vec<Event>| async move {
            events
                .iter()
                .map(|_| Ok::<(), String>(()))
                .collect::<Vec<_>>()
        })
        .await
        .expect_err("max_batch 0");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}
