//! Coalescing settlements: many concurrent acks become one broker call per group.
//!
//! Handlers finish concurrently and each acks its own delivery. A broker that settles many
//! messages in one command (Redis `XACK key group id...`, SQS `DeleteMessageBatch`) needs far
//! fewer round trips — and far less CPU on a small machine — when those acks travel together.
//! A [`Coalescer`] runs one task per subscriber: it takes every ack waiting in its queue (up to
//! `max_batch` per group), flushes each group with one call, and answers every waiting
//! [`Coalescer::submit`] with that call's result. Nothing waits for a timer: an ack that finds
//! the queue idle goes out at once, and acks arriving while a flush is in flight form the next
//! batch. `submit` returns only after the broker answered, so an acked message is settled.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::{Error, ErrorKind, Result};

type Waiter = oneshot::Sender<Result<()>>;
/// Items of one flush call and who waits for each.
type Batch<T> = (Vec<T>, Vec<Waiter>);

/// Batches concurrent settlements of items `T` per group `K` (a partition, a queue) into one
/// flush call per group. Cloning gives another handle to the same task; the task ends when
/// every handle is dropped.
pub struct Coalescer<K, T> {
    tx: mpsc::UnboundedSender<(K, T, Waiter)>,
}

impl<K, T> Clone for Coalescer<K, T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K, T> std::fmt::Debug for Coalescer<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl<K, T> Coalescer<K, T>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Send + 'static,
{
    /// Starts the task (on the current tokio runtime). `flush(group, items)` settles at most
    /// `max_batch` items of one group with one result for all; flushes of different groups run
    /// concurrently.
    pub fn spawn<F, Fut>(max_batch: usize, flush: F) -> Self
    where
        F: Fn(K, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self::spawn_per_entry(max_batch, 1, move |k, items: Vec<T>| {
            let n = items.len();
            let call = flush(k, items);
            async move {
                match call.await {
                    Ok(()) => (0..n).map(|_| Ok(())).collect(),
                    Err(e) => (0..n).map(|_| Err(shared_error(&e))).collect(),
                }
            }
        })
    }

    /// Starts the task for a broker that answers each entry of a batch (SQS
    /// `DeleteMessageBatch`): `flush(group, items)` settles at most `max_batch` items and
    /// returns one result per item, in order (a missing one fails its waiter). Up to
    /// `calls_per_group` flushes of one group run at once.
    pub fn spawn_per_entry<F, Fut>(max_batch: usize, calls_per_group: usize, flush: F) -> Self
    where
        F: Fn(K, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<()>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let limits = Limits {
            max_batch: max_batch.max(1),
            calls_per_group: calls_per_group.max(1),
        };
        tokio::spawn(run(rx, limits, flush));
        Self { tx }
    }

    /// Queues `item` of `group` and waits until the flush that carried it answered.
    pub async fn submit(&self, group: K, item: T) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((group, item, tx))
            .map_err(|_| Error::closed("settlement queue"))?;
        rx.await
            .map_err(|_| Error::closed("settlement queue"))
            .and_then(|r| r)
    }
}

#[derive(Clone, Copy)]
struct Limits {
    max_batch: usize,
    calls_per_group: usize,
}

async fn run<K, T, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<(K, T, Waiter)>,
    limits: Limits,
    flush: F,
) where
    K: Eq + Hash + Clone,
    F: Fn(K, Vec<T>) -> Fut,
    Fut: Future<Output = Vec<Result<()>>>,
{
    let mut queued: Vec<(K, T, Waiter)> = Vec::new();
    loop {
        if queued.is_empty() {
            match rx.recv().await {
                Some(first) => queued.push(first),
                None => return,
            }
        }
        while let Ok(more) = rx.try_recv() {
            queued.push(more);
        }
        // Group in arrival order; at most `calls_per_group` batches of `max_batch` per group
        // per round (the rest waits for the next round).
        let mut groups: HashMap<K, Vec<Batch<T>>> = HashMap::new();
        let mut left = Vec::new();
        for (k, item, waiter) in queued.drain(..) {
            let batches = groups.entry(k.clone()).or_default();
            let open = batches
                .last()
                .is_some_and(|(items, _)| items.len() < limits.max_batch);
            if !open && batches.len() == limits.calls_per_group {
                left.push((k, item, waiter));
                continue;
            }
            if !open {
                batches.push((Vec::new(), Vec::new()));
            }
            if let Some((items, waiters)) = batches.last_mut() {
                items.push(item);
                waiters.push(waiter);
            }
        }
        queued = left;
        let mut calls = Vec::new();
        for (k, batches) in groups {
            for (items, waiters) in batches {
                let call = flush(k.clone(), items);
                calls.push(async move { answer(waiters, call.await) });
            }
        }
        join_all(calls).await;
    }
}

/// Answers each waiter with its entry's result.
fn answer(waiters: Vec<Waiter>, results: Vec<Result<()>>) {
    let mut results = results.into_iter();
    for w in waiters {
        let r = results.next().unwrap_or_else(|| {
            Err(Error::new(
                ErrorKind::Broker,
                "the broker's answer to a batch left this entry out",
            ))
        });
        let _ = w.send(r);
    }
}

/// The same failure for every waiter of a failed flush.
fn shared_error(e: &Error) -> Error {
    let copy = Error::new(e.kind(), e.message().to_owned());
    match e.backend() {
        Some(b) => copy.with_backend(b),
        None => copy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submits_share_flushes_per_group() {
        type Calls = Arc<Mutex<Vec<(u32, Vec<u32>)>>>;
        let calls: Calls = Arc::default();
        let c = calls.clone();
        let coalescer = Coalescer::spawn(50, move |group: u32, items: Vec<u32>| {
            let c = c.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                c.lock().expect("calls").push((group, items));
                Ok(())
            }
        });
        let submits = (0..400u32).map(|i| {
            let co = coalescer.clone();
            async move { co.submit(i % 2, i).await }
        });
        for r in join_all(submits).await {
            r.expect("settled");
        }
        let calls = calls.lock().expect("calls");
        let mut seen: Vec<u32> = calls.iter().flat_map(|(_, items)| items.clone()).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..400).collect::<Vec<_>>(),
            "every item flushed once"
        );
        assert!(
            calls
                .iter()
                .all(|(g, items)| items.len() <= 50 && items.iter().all(|i| i % 2 == *g)),
            "batches respect the group and the limit"
        );
        assert!(
            calls.len() < 100,
            "400 concurrent acks coalesced into {} calls",
            calls.len()
        );
    }

    #[tokio::test]
    async fn a_failed_flush_fails_each_of_its_waiters() {
        let coalescer = Coalescer::spawn(10, |_: u8, items: Vec<u8>| async move {
            if items.contains(&7) {
                Err(Error::new(ErrorKind::Broker, "refused").with_backend("test"))
            } else {
                Ok(())
            }
        });
        assert!(coalescer.submit(0, 1).await.is_ok());
        let e = coalescer.submit(1, 7).await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::Broker);
        assert_eq!(e.backend(), Some("test"));
    }

    #[tokio::test]
    async fn submit_after_the_task_ended_is_closed() {
        let coalescer: Coalescer<u8, u8> = Coalescer::spawn(10, |_, _| async { Ok(()) });
        // A task that died (its runtime shut down) answers nothing.
        let (tx, _) = mpsc::unbounded_channel();
        let dead = Coalescer::<u8, u8> { tx };
        assert_eq!(
            dead.submit(0, 0).await.expect_err("closed").kind(),
            ErrorKind::Closed
        );
        assert!(coalescer.submit(0, 0).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_entry_results_reach_their_own_waiters_with_parallel_calls_per_group() {
        let calls: Arc<Mutex<Vec<usize>>> = Arc::default();
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, f, m) = (calls.clone(), in_flight.clone(), most.clone());
        let coalescer = Coalescer::spawn_per_entry(10, 4, move |_: u8, items: Vec<u32>| {
            let (c, f, m) = (c.clone(), f.clone(), m.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = f.fetch_add(1, SeqCst) + 1;
                m.fetch_max(now, SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                f.fetch_sub(1, SeqCst);
                c.lock().expect("calls").push(items.len());
                // Odd items are refused, even ones settled; the last entry gets no answer.
                let mut results: Vec<Result<()>> = items
                    .iter()
                    .map(|i| match i % 2 {
                        0 => Ok(()),
                        _ => Err(Error::new(ErrorKind::Broker, format!("refused {i}"))),
                    })
                    .collect();
                if items.contains(&999) {
                    results.pop();
                }
                results
            }
        });
        let submits = (0..200u32).map(|i| {
            let co = coalescer.clone();
            async move { (i, co.submit(0, i).await) }
        });
        for (i, r) in join_all(submits).await {
            match (i % 2, r) {
                (0, Ok(())) => {}
                (1, Err(e)) => assert_eq!(e.message(), format!("refused {i}")),
                (_, r) => panic!("item {i} got {r:?}"),
            }
        }
        let calls = calls.lock().expect("calls").clone();
        assert!(
            calls.iter().all(|n| *n <= 10),
            "batches of at most 10: {calls:?}"
        );
        assert!(
            calls.len() < 200,
            "200 acks coalesced into {} calls",
            calls.len()
        );
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=4).contains(&most), "{most} calls of one group at once");
        let e = coalescer.submit(0, 999).await.expect_err("left out");
        assert!(e.message().contains("left this entry out"), "{e}");
    }
}
