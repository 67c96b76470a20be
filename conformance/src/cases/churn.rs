//! Consumer churn: the members of one group come and go all the time (deploys, autoscaling,
//! crashes) while messages of many keys flow.
//!
//! What must hold through it, checked delivery by delivery:
//! - nothing is lost;
//! - per-key order (where the backend declares `Ordering::PerKey`): a message is never
//!   delivered for the first time before an earlier message of its key was (each key's first
//!   deliveries come in publish order);
//! - where the backend declares `exact_attempts`: `attempt` never counts more hand-outs than
//!   application code received (a message a closing member had fetched but never handed out
//!   does not count). Messages a dropped member may have read ahead are left out of this
//!   check (a crash says goodbye to nobody) and counted in the note;
//! - a clean close is final: a message whose `ack()` returned Ok before its member closed
//!   cleanly is not delivered to the group again. After a member is dropped without close
//!   (a crash) such redeliveries are allowed and counted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use busbar_core::{
    Consumer, DeadLetterPolicy, Event, EventBus, Message, Ordering, PublishOptions, RetryPolicy,
};

use crate::support::{keyed, latest, parse_keyed, Ctx};
use crate::Outcome;

/// Members in turn, each reading a while before it leaves; every `DROP_EVERY`-th is dropped
/// without close.
const ROUNDS: usize = 12;
const DROP_EVERY: usize = 4;
const KEYS: usize = 100;
/// The ack timeout of the churning group: what a dropped member's deliveries wait.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes `n` messages over [`KEYS`] keys (message `i` is `<key i % KEYS>/<i / KEYS>`) in
/// batches, returning every id.
async fn publish_keys(bus: &dyn EventBus, topic: &str, n: usize) -> Result<Vec<String>> {
    let messages: Vec<Message> = (0..n)
        .map(|i| keyed(&format!("k{:03}", i % KEYS), i / KEYS))
        .collect();
    let ids = messages.iter().map(|m| m.id.clone()).collect();
    let batch = bus
        .capabilities()
        .batch_max_size
        .unwrap_or(100)
        .clamp(1, 100);
    for chunk in messages.chunks(batch) {
        bus.publish_batch(topic, chunk.to_vec(), &PublishOptions::default())
            .await?;
    }
    Ok(ids)
}

/// Everything the checks need to remember across members.
#[derive(Debug, Default)]
struct Ledger {
    /// Whether the backend promises per-key order (`Ordering::PerKey`).
    ordered: bool,
    /// Whether the backend declares `exact_attempts`.
    exact: bool,
    /// Ids not yet acked when a member was dropped: it may have read them ahead.
    exposed: HashSet<String>,
    /// Over-counted attempts not held against the backend (reported): of messages a dropped
    /// member may have read ahead, or anywhere on a backend without `exact_attempts`.
    overcounted_allowed: u64,
    /// Hand-outs to application code, per id.
    seen: HashMap<String, u32>,
    /// Per key, the next sequence number not yet delivered for the first time.
    next_first: HashMap<String, usize>,
    /// Acked (Ok) by a member that then closed cleanly: must never come back.
    final_acks: HashSet<String>,
    /// Acked (Ok) by a member that was then dropped: may come back.
    dropped_acks: HashSet<String>,
    /// Acked (Ok) by the current member, not yet closed.
    round_acks: HashSet<String>,
    violations: Vec<String>,
    duplicates_after_clean: u64,
    duplicates_after_drop: u64,
    overcounted: u64,
    undercounted: u64,
}

impl Ledger {
    /// Records a hand-out of `(id, key/seq payload, attempt)`; returns whether it is the id's
    /// first.
    fn handed(&mut self, id: &str, payload: &[u8], attempt: u32, round: usize) -> Result<bool> {
        let (key, seq) = parse_keyed(payload)?;
        let n = self.seen.entry(id.to_owned()).or_default();
        *n += 1;
        let times = *n;
        if attempt > times && (!self.exact || self.exposed.contains(id)) {
            self.overcounted_allowed += 1;
        } else if attempt > times {
            self.overcounted += 1;
            if self.overcounted <= 5 {
                self.violations.push(format!(
                    "{key}/{seq} handed out with attempt {attempt}, but application code received it {times} time(s) (round {round})"
                ));
            }
        } else if attempt < times {
            self.undercounted += 1;
        }
        if self.final_acks.contains(id) {
            self.duplicates_after_clean += 1;
            if self.duplicates_after_clean <= 5 {
                self.violations.push(format!(
                    "{key}/{seq} came back (round {round}) though its ack returned Ok before a clean close"
                ));
            }
        } else if self.dropped_acks.contains(id) {
            self.duplicates_after_drop += 1;
        }
        if times > 1 {
            return Ok(false);
        }
        let next = self.next_first.entry(key.clone()).or_default();
        if self.ordered && seq > *next {
            self.violations.push(format!(
                "key {key}: seq {seq} delivered for the first time (round {round}, attempt {attempt}) while seq {next} had never been delivered"
            ));
        } else if self.ordered && seq < *next {
            self.violations.push(format!(
                "key {key}: seq {seq} delivered for the first time (round {round}, attempt {attempt}) after seq {} was",
                *next - 1
            ));
        }
        *next = (*next).max(seq + 1);
        Ok(true)
    }

    fn end_round(&mut self, clean: bool, ids: &[String]) {
        let acks = std::mem::take(&mut self.round_acks);
        if clean {
            self.final_acks.extend(acks);
        } else {
            self.dropped_acks.extend(acks);
            let acked =
                |id: &String| self.final_acks.contains(id) || self.dropped_acks.contains(id);
            let exposed: Vec<String> = ids.iter().filter(|id| !acked(id)).cloned().collect();
            self.exposed.extend(exposed);
        }
    }

    fn verdict(&self, ids: &[String], what: &str) -> Result<Outcome> {
        let lost = ids.iter().filter(|id| !self.seen.contains_key(*id)).count();
        ensure!(
            lost == 0,
            "lost messages: {lost} of {} never delivered",
            ids.len()
        );
        ensure!(
            self.violations.is_empty(),
            "{} violation(s) under churn ({} per-key order, {} redelivered after a clean close, {} attempts over-counted): {}",
            self.violations.len(),
            self.violations.len() as u64
                - self.duplicates_after_clean.min(5)
                - self.overcounted.min(5),
            self.duplicates_after_clean,
            self.overcounted,
            self.violations.join("; ")
        );
        let redelivered: u64 = self.seen.values().map(|n| u64::from(n - 1)).sum();
        Ok(Outcome::with_duplicates(redelivered).note(format!(
            "{what}: {} messages, {KEYS} keys, {ROUNDS} members in turn: 0 order violations, 0 redelivered after a clean close, {} redelivered after a drop; attempts over-counted: {} ({}), under-counted {}",
            ids.len(),
            self.duplicates_after_drop,
            self.overcounted_allowed,
            if self.exact {
                "all of messages a dropped member may have read ahead"
            } else {
                "exact_attempts off"
            },
            self.undercounted
        )))
    }
}

/// Raw subscribers: member after member reads and acks a share of the messages, then closes
/// (or is dropped); a last member drains the rest.
pub async fn churn_raw_subscribers(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let o = latest(&group).ack_timeout(ACK_TIMEOUT);
    ctx.bus.provision(&topic, &o).await?;
    let n = ctx.count(2000);
    let ids = publish_keys(ctx.bus.as_ref(), &topic, n).await?;
    let caps = ctx.bus.capabilities();
    let mut ledger = Ledger {
        ordered: caps.ordering == Ordering::PerKey,
        exact: caps.exact_attempts,
        ..Ledger::default()
    };
    let share = (n / (ROUNDS + 2)).max(1);
    for round in 0..=ROUNDS {
        let last = round == ROUNDS;
        let bus = ctx.connect().await?;
        let mut sub = bus.subscribe(&topic, o.clone()).await?;
        // A member reads between half and one and a half shares; the last one reads the rest.
        let want = if last {
            usize::MAX
        } else {
            share / 2 + fastrand::usize(0..=share)
        };
        let idle = if last {
            ACK_TIMEOUT * 4 + Duration::from_secs(30)
        } else {
            Duration::from_secs(3)
        };
        let mut read = 0;
        while read < want && ledger.seen.len() < ids.len() {
            let Ok(next) = tokio::time::timeout(idle, sub.next()).await else {
                break;
            };
            let d = next?.ok_or_else(|| anyhow!("the subscription ended early"))?;
            ledger.handed(d.id(), d.payload(), d.attempt(), round)?;
            read += 1;
            if d.ack().await.is_ok() {
                ledger.round_acks.insert(d.id().to_owned());
            }
        }
        let clean = last || round % DROP_EVERY != DROP_EVERY - 1;
        if clean {
            sub.close().await?;
            bus.close().await?;
        } else {
            drop(sub);
            drop(bus);
        }
        ledger.end_round(clean, &ids);
    }
    ledger.verdict(&ids, "raw subscribers")
}

/// The consumer runner, with a handler that fails every message the first time it sees it:
/// member after member runs a while and shuts down cleanly (a rolling deploy); every message
/// must end handled successfully on its retry — none may be dead-lettered because hand-backs
/// no handler saw (read ahead, queued behind their key at shutdown) were counted as attempts.
pub async fn churn_runner_retries_once(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let group = ctx.group("g");
    let o = latest(&group).ack_timeout(ACK_TIMEOUT);
    ctx.bus.provision(&topic, &o).await?;
    let n = ctx.count(2000);
    let ids = publish_keys(ctx.bus.as_ref(), &topic, n).await?;
    let caps = ctx.bus.capabilities();
    let ledger = Arc::new(Mutex::new(Ledger {
        ordered: caps.ordering == Ordering::PerKey,
        exact: caps.exact_attempts,
        ..Ledger::default()
    }));
    // Ids a handler failed once, and ids handled successfully.
    let failed_once: Arc<Mutex<HashSet<String>>> = Arc::default();
    let succeeded: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut dead_lettered = 0;
    let share = (n / (ROUNDS + 2)).max(1);
    for round in 0..=ROUNDS {
        let last = round == ROUNDS;
        let bus = ctx.connect().await?;
        let target = if last {
            ids.len()
        } else {
            let done = lock(&succeeded)?.len();
            (done + share / 2 + fastrand::usize(0..=share)).min(ids.len())
        };
        let (l, f, s) = (ledger.clone(), failed_once.clone(), succeeded.clone());
        let handler = move |e: Event| {
            let (l, f, s) = (l.clone(), f.clone(), s.clone());
            async move {
                let id = e.id().to_owned();
                let first_failure = {
                    let mut l = l.lock().map_err(|_| "lock".to_owned())?;
                    l.handed(&id, e.payload(), e.attempt(), round)
                        .map_err(|e| e.to_string())?;
                    f.lock().map_err(|_| "lock".to_owned())?.insert(id.clone())
                };
                if first_failure {
                    return Err("fails the first time it sees a message".to_owned());
                }
                s.lock().map_err(|_| "lock".to_owned())?.insert(id);
                Ok(())
            }
        };
        let consumer = Consumer::new(bus.clone(), &topic)
            .group(&group)
            .ack_timeout(ACK_TIMEOUT)
            .concurrency(8)
            .retry(
                RetryPolicy::builder()
                    .max_attempts(2)
                    .initial_delay(Duration::from_millis(10))
                    .build()?,
            )
            .dead_letter(DeadLetterPolicy::new());
        let s = succeeded.clone();
        let limit = if last {
            ACK_TIMEOUT * 4 + Duration::from_secs(60)
        } else {
            Duration::from_secs(5)
        };
        let stop = async move {
            let deadline = tokio::time::Instant::now() + limit;
            while tokio::time::Instant::now() < deadline {
                if s.lock().map(|s| s.len() >= target).unwrap_or(true) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let report = consumer.run_until(handler, stop).await?;
        dead_lettered += report.dead_lettered;
        bus.close().await?;
    }
    let missing = ids
        .iter()
        .filter(|id| !lock(&succeeded).is_ok_and(|s| s.contains(*id)))
        .count();
    let l = lock(&ledger)?;
    let verdict = l.verdict(&ids, "runner, clean shutdowns, each message failing once");
    let mut problems = Vec::new();
    if dead_lettered > 0 {
        problems.push(format!(
            "{dead_lettered} message(s) dead-lettered though their retry would have succeeded (hand-backs no handler saw counted as attempts)"
        ));
    }
    if missing > 0 {
        problems.push(format!(
            "{missing} of {} messages never handled successfully",
            ids.len()
        ));
    }
    if let Err(e) = &verdict {
        problems.push(e.to_string());
    }
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    let mut outcome = verdict?;
    outcome.note = outcome.note.map(|n| format!("{n}; 0 dead-lettered"));
    Ok(outcome)
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| anyhow!("a lock was poisoned"))
}
