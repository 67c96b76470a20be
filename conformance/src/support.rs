//! Helpers the cases share: fresh names, publishing, reading with loss detection, and the
//! per-key order tracker.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use busbar_core::{
    Delivery, EventBus, Message, PublishOptions, StartPosition, SubscribeOptions, Subscriber,
};
use futures::future::BoxFuture;

use crate::Scale;

/// Opens a new connection to the broker under test.
pub type Connect =
    Arc<dyn Fn() -> BoxFuture<'static, busbar_core::Result<Arc<dyn EventBus>>> + Send + Sync>;

/// What a case gets: a connection, a way to open more, fresh names and the scale.
#[derive(Clone)]
pub struct Ctx {
    /// The connection the case runs on.
    pub bus: Arc<dyn EventBus>,
    connect: Connect,
    case: &'static str,
    scale: Scale,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("bus", &self.bus)
            .field("case", &self.case)
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub(crate) fn new(
        bus: Arc<dyn EventBus>,
        connect: Connect,
        case: &'static str,
        scale: Scale,
    ) -> Self {
        Self {
            bus,
            connect,
            case,
            scale,
        }
    }

    /// Opens another connection to the same broker (for competing consumers and crashes).
    pub async fn connect(&self) -> Result<Arc<dyn EventBus>> {
        (self.connect)()
            .await
            .context("opening a second connection")
    }

    /// A fresh topic name: `busbar-test-<case>-<suffix>-<random>`.
    pub fn topic(&self, suffix: &str) -> String {
        let short = self.case.rsplit("::").next().unwrap_or(self.case);
        let short: String = short.chars().take(40).collect::<String>().replace('_', "-");
        format!("busbar-test-{short}-{suffix}-{}", random_suffix())
    }

    /// A fresh consumer group name.
    pub fn group(&self, suffix: &str) -> String {
        format!("g-{suffix}-{}", random_suffix())
    }

    /// `n` scaled by `BUSBAR_CONFORMANCE_SCALE` (at least 1).
    pub fn count(&self, n: usize) -> usize {
        self.scale.apply(n)
    }
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Subscription options for tests: the given group, earliest start, a 30 s ack timeout.
pub fn opts(group: &str) -> SubscribeOptions {
    SubscribeOptions::new(group).ack_timeout(Duration::from_secs(30))
}

/// Options for a group that reads only messages published after it exists (works on every
/// backend, with or without replay).
pub fn latest(group: &str) -> SubscribeOptions {
    opts(group).start(StartPosition::Latest)
}

/// Payload text of a delivery.
pub fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// A keyed message whose payload is `<key>/<n>` (the order tracker parses this).
pub fn keyed(key: &str, n: usize) -> Message {
    Message::new(format!("{key}/{n}")).with_key(key)
}

/// Parses `<key>/<n>` payloads.
pub fn parse_keyed(payload: &[u8]) -> Result<(String, usize)> {
    let s = std::str::from_utf8(payload).context("payload is not UTF-8")?;
    let (k, n) = s
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("payload {s:?} is not <key>/<n>"))?;
    Ok((k.to_owned(), n.parse().context("sequence number")?))
}

/// Publishes `messages` one by one, returning their ids in order.
pub async fn publish_all(
    bus: &dyn EventBus,
    topic: &str,
    messages: Vec<Message>,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(messages.len());
    for m in messages {
        ids.push(m.id.clone());
        bus.publish(topic, m, &PublishOptions::default())
            .await
            .with_context(|| format!("publishing to {topic}"))?;
    }
    Ok(ids)
}

/// What a read collected: the first delivery of every id, in arrival order, and duplicates.
#[derive(Debug, Default)]
pub struct Collected {
    /// Ids in order of first arrival.
    pub order: Vec<String>,
    /// First-arrival message per id (payload, key, ...), with its attempt.
    pub first: HashMap<String, (Message, u32, String)>,
    /// Deliveries of an id that had already arrived.
    pub duplicates: u64,
}

/// Reads from `sub`, acking each delivery, until every id in `expected` arrived. Fails when
/// `timeout` passes first (naming how many are missing) or when an unexpected id arrives and
/// `strict` is set.
pub async fn collect(
    sub: &mut Box<dyn Subscriber>,
    expected: &HashSet<String>,
    timeout: Duration,
    strict: bool,
) -> Result<Collected> {
    let mut c = Collected::default();
    let deadline = tokio::time::Instant::now() + timeout;
    while c.first.len() < expected.len() {
        let next = tokio::time::timeout_at(deadline, sub.next()).await;
        let d = match next {
            Err(_) => bail!(
                "lost messages: {} of {} never arrived within {timeout:?}",
                expected.len() - c.first.len(),
                expected.len()
            ),
            Ok(r) => r
                .context("subscriber.next() failed")?
                .ok_or_else(|| anyhow!("the subscription ended early"))?,
        };
        let id = d.id().to_owned();
        if !expected.contains(&id) {
            ensure!(!strict, "unexpected message {id} ({:?}) arrived", body(&d));
            d.ack().await.context("ack")?;
            continue;
        }
        if c.first.contains_key(&id) {
            c.duplicates += 1;
        } else {
            c.order.push(id.clone());
            c.first
                .insert(id, (d.message().clone(), d.attempt(), d.topic().to_owned()));
        }
        d.ack().await.context("ack")?;
    }
    Ok(c)
}

/// Fails if anything (other than ids in `allowed`) arrives on `sub` within `window`.
pub async fn expect_silence(
    sub: &mut Box<dyn Subscriber>,
    window: Duration,
    allowed: &HashSet<String>,
) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + window;
    let mut dups = 0;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return Ok(dups),
            Ok(r) => {
                let d = r?.ok_or_else(|| anyhow!("the subscription ended early"))?;
                ensure!(
                    allowed.contains(d.id()),
                    "unexpected message {} ({:?}) arrived",
                    d.id(),
                    body(&d)
                );
                dups += 1;
                d.ack().await?;
            }
        }
    }
}

/// Checks the per-key order rule on a stream of handler starts and successes, across any
/// number of consumers: whenever a handler *starts* message `n` of a key, every message before
/// `n` of that key has already been handled successfully at least once. Duplicates are
/// allowed; going back is not.
#[derive(Debug, Default)]
pub struct OrderTracker {
    inner: Mutex<TrackerState>,
}

#[derive(Debug, Default)]
struct TrackerState {
    /// Per key: the set of sequence numbers handled successfully.
    done: HashMap<String, BTreeMap<usize, u32>>,
    /// Per key: the lowest sequence not yet handled successfully.
    low: HashMap<String, usize>,
    violations: Vec<String>,
    starts: u64,
    /// Per key: what happened, in order (who, message, attempt, event), for failure reports.
    history: HashMap<String, Vec<String>>,
    /// The first violation: key and position in that key's history.
    first_violating_key: Option<(String, usize)>,
    /// Consumers whose run ended while the case still needed them: who, and how.
    ended: Vec<String>,
    /// Successful handlings per consumer.
    by_consumer: HashMap<String, usize>,
}

impl OrderTracker {
    fn state(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that a handler started `n` of `key`; records a violation if an earlier message
    /// of the key has not been handled yet.
    pub fn start(&self, key: &str, n: usize) {
        self.start_by(key, n, "", 0);
    }

    /// As [`OrderTracker::start`], naming the consumer and the attempt for failure reports.
    pub fn start_by(&self, key: &str, n: usize, who: &str, attempt: u32) {
        let mut s = self.state();
        s.starts += 1;
        let low = s.low.get(key).copied().unwrap_or(0);
        s.history
            .entry(key.to_owned())
            .or_default()
            .push(format!("{who} start {n} (attempt {attempt})"));
        if n > low {
            let at = s.history.get(key).map_or(0, Vec::len);
            s.first_violating_key
                .get_or_insert_with(|| (key.to_owned(), at));
            if s.violations.len() < 20 {
                s.violations.push(format!(
                    "key {key}: message {n} started before message {low} was handled"
                ));
            }
        }
    }

    /// Records that a handler of `who` failed `n` of `key` (for failure reports).
    pub fn failed_by(&self, key: &str, n: usize, who: &str) {
        self.state()
            .history
            .entry(key.to_owned())
            .or_default()
            .push(format!("{who} failed {n}"));
    }

    /// Adds a marker to every key's history (for failure reports).
    pub fn note_all(&self, what: &str) {
        for h in self.state().history.values_mut() {
            h.push(what.to_owned());
        }
    }

    /// Records that `n` of `key` was handled successfully.
    pub fn done(&self, key: &str, n: usize) {
        self.done_by(key, n, "");
    }

    /// As [`OrderTracker::done`], naming the consumer.
    pub fn done_by(&self, key: &str, n: usize, who: &str) {
        let mut s = self.state();
        *s.by_consumer.entry(who.to_owned()).or_default() += 1;
        s.history
            .entry(key.to_owned())
            .or_default()
            .push(format!("{who} done {n}"));
        *s.done
            .entry(key.to_owned())
            .or_default()
            .entry(n)
            .or_default() += 1;
        let done = s.done.get(key).cloned().unwrap_or_default();
        let low = s.low.entry(key.to_owned()).or_default();
        while done.contains_key(low) {
            *low += 1;
        }
    }

    /// Successful handlings by consumer `who`.
    pub fn handled_by(&self, who: &str) -> usize {
        self.state().by_consumer.get(who).copied().unwrap_or(0)
    }

    /// Records that consumer `who` stopped by itself (its run returned), with how it ended.
    pub fn consumer_ended(&self, who: &str, how: &str) {
        self.state().ended.push(format!("{who}: {how}"));
    }

    /// The consumers that stopped by themselves, with how they ended.
    pub fn ended_consumers(&self) -> Vec<String> {
        self.state().ended.clone()
    }

    /// For a case that timed out: how many keys are incomplete, and for a few of them how
    /// far they got and the last thing that happened to them.
    pub fn progress(&self, keys: &[String], per_key: usize) -> String {
        let s = self.state();
        let stuck: Vec<&String> = keys
            .iter()
            .filter(|k| s.low.get(*k).copied().unwrap_or(0) < per_key)
            .collect();
        let examples: Vec<String> = stuck
            .iter()
            .take(6)
            .map(|k| {
                let low = s.low.get(*k).copied().unwrap_or(0);
                let last = s
                    .history
                    .get(*k)
                    .and_then(|h| h.last())
                    .map_or("nothing", String::as_str);
                format!("{k}: {low}/{per_key} in order, last: {last}")
            })
            .collect();
        format!(
            "{} of {} keys incomplete; {}",
            stuck.len(),
            keys.len(),
            examples.join("; ")
        )
    }

    /// Number of distinct messages handled successfully.
    pub fn handled(&self) -> usize {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.done.values().map(BTreeMap::len).sum()
    }

    /// Successful handlings beyond the first of each message.
    pub fn duplicates(&self) -> u64 {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.done
            .values()
            .flat_map(|m| m.values())
            .map(|c| u64::from(c.saturating_sub(1)))
            .sum()
    }

    /// Fails with the recorded violations, or if some of `keys × per_key` were never handled.
    pub fn verify(&self, keys: &[String], per_key: usize) -> Result<()> {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !s.violations.is_empty() {
            let (key, at) = s.first_violating_key.clone().unwrap_or_default();
            let history = s.history.get(&key).cloned().unwrap_or_default();
            let tail: Vec<&String> = history
                .iter()
                .skip(at.saturating_sub(30))
                .take(36)
                .collect();
            bail!(
                "per-key order violated:\n  {}\nhistory of key {key} up to the first violation:\n  {}",
                s.violations.join("\n  "),
                tail.iter().map(|x| x.as_str()).collect::<Vec<_>>().join("\n  ")
            );
        }
        let mut missing = 0;
        let mut example = None;
        for k in keys {
            let done = s.done.get(k);
            for n in 0..per_key {
                if !done.is_some_and(|d| d.contains_key(&n)) {
                    missing += 1;
                    example.get_or_insert_with(|| format!("{k}/{n}"));
                }
            }
        }
        ensure!(
            missing == 0,
            "lost messages: {missing} of {} never handled (e.g. {})",
            keys.len() * per_key,
            example.unwrap_or_default()
        );
        Ok(())
    }
}

/// Waits until `cond` holds, polling every 20 ms, or fails after `timeout` with `what`.
pub async fn wait_for(timeout: Duration, what: &str, cond: impl Fn() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
