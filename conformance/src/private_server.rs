//! A runner for backend tests that start a broker process of their own (restart, wrong
//! password, unreachable server): cases that need the broker binary are IGNORED with a hint
//! when it is missing, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busbar_core::{Consumer, ConsumerReport, Event, EventBus, Message, PublishOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub use libtest_mimic::Failed;

/// What a private-server test returns.
pub type TestResult = Result<(), Failed>;

/// A private-server test.
pub type TestFn = fn() -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `tests` (name, whether it needs `binary`, body) as a libtest-style binary, each with
/// a 180 s limit, and exits with the result.
pub fn main(binary: &str, tests: &[(&'static str, bool, TestFn)]) -> ! {
    let have_binary = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .is_ok();
    main_when(
        have_binary,
        &format!("{binary} is not installed; run scripts/brokers.sh up"),
        tests,
    )
}

/// Like [`main`], for a broker whose binary cannot be probed with `--version` (it would start
/// a server): `have_binary` says whether it is there, `hint` how to get it.
pub fn main_when(have_binary: bool, hint: &str, tests: &[(&'static str, bool, TestFn)]) -> ! {
    crate::init_test_log();
    let args = libtest_mimic::Arguments::from_args();
    let required = crate::Harness::brokers_required();
    let runtime = crate::test_runtime();
    let hint = hint.to_owned();
    let trials = tests
        .iter()
        .map(|&(name, needs_binary, test)| {
            let (rt, why) = (runtime.clone(), hint.clone());
            let missing = needs_binary && !have_binary;
            let trial = libtest_mimic::Trial::test(name, move || {
                if missing {
                    return Err(why.into());
                }
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(180), test()).await })
                    .map_err(|_| Failed::from("timed out after 180 s"))?
            });
            if missing && !required {
                eprintln!("IGNORED {name}: {hint}");
                trial.with_ignored_flag(true)
            } else {
                trial
            }
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    std::process::exit(if conclusion.has_failed() { 101 } else { 0 })
}

/// Fails unless `attempt` (connecting to a closed port) fails within `limit` with a retryable
/// `Connection` (or `Timeout`) error.
pub async fn expect_connection_error<T: std::fmt::Debug>(
    attempt: impl Future<Output = busbar_core::Result<T>>,
    limit: Duration,
) -> TestResult {
    let started = Instant::now();
    let e = attempt.await.err().ok_or("connected to a closed port")?;
    let kind_ok = matches!(
        e.kind(),
        busbar_core::ErrorKind::Connection | busbar_core::ErrorKind::Timeout
    );
    if !kind_ok || !e.is_retryable() {
        return Err(format!(
            "expected a retryable Connection error, got {:?}: {e}",
            e.kind()
        )
        .into());
    }
    if started.elapsed() > limit {
        return Err(format!("took {:?} to fail", started.elapsed()).into());
    }
    Ok(())
}

/// Fails unless `connect` refuses every URL of `urls` with a `Config` error.
pub async fn expect_config_errors<T, F, Fut>(urls: &[&str], connect: F) -> TestResult
where
    T: std::fmt::Debug,
    F: Fn(String) -> Fut,
    Fut: Future<Output = busbar_core::Result<T>>,
{
    for url in urls {
        match connect((*url).to_owned()).await {
            Err(e) if e.kind() == busbar_core::ErrorKind::Config => {}
            other => return Err(format!("{url}: expected Config, got {other:?}").into()),
        }
    }
    Ok(())
}

/// A TCP proxy on 127.0.0.1 that can cut all its connections and refuse new ones: a broker
/// outage as clients see it, for tests that cannot restart the broker itself.
pub struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding a free port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::Acquire) {
                    drop(client);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                if let Ok(mut c) = conns2.lock() {
                    c.push(task);
                }
            }
        });
        Ok(Self {
            port,
            up,
            conns,
            accept,
        })
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::Release);
        if let Ok(mut c) = self.conns.lock() {
            for t in c.drain(..) {
                t.abort();
            }
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Publishes `m` until it succeeds (the broker may be restarting or unreachable), giving up
/// after `limit` or at the first error that is not retryable.
pub async fn publish_retrying(
    bus: &dyn EventBus,
    topic: &str,
    m: Message,
    limit: Duration,
) -> TestResult {
    let deadline = Instant::now() + limit;
    loop {
        match bus
            .publish(topic, m.clone(), &PublishOptions::default())
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("publish failed for good: {e}").into()),
        }
    }
}

/// A consumer runner that records the ids it handled, for tests that disrupt the broker
/// while it consumes.
pub struct Recorder {
    handled: Arc<Mutex<HashSet<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<busbar_core::Result<ConsumerReport>>,
}

impl Recorder {
    /// Starts a runner of `group` on `topic` (the group should exist already).
    pub fn start(bus: Arc<dyn EventBus>, topic: &str, group: &str, ack_timeout: Duration) -> Self {
        let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
        let h = handled.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            Consumer::new(bus, topic)
                .group(group)
                .ack_timeout(ack_timeout)
                .run_until(
                    move |e: Event| {
                        let h = h.clone();
                        async move {
                            h.lock().map_err(|_| "lock")?.insert(e.id().to_owned());
                            Ok::<(), &str>(())
                        }
                    },
                    async move {
                        let _ = stopped.await;
                    },
                ),
        );
        Self {
            handled,
            stop: Some(stop),
            task,
        }
    }

    /// Waits until every id of `acked` was handled (at most `limit`), then stops the runner
    /// and prints a line; `after` names the disruption in the messages.
    pub async fn expect_all(
        mut self,
        acked: &[String],
        limit: Duration,
        after: &str,
    ) -> TestResult {
        let deadline = Instant::now() + limit;
        loop {
            let missing = {
                let h = self.handled.lock().map_err(|_| "lock")?;
                acked.iter().filter(|id| !h.contains(*id)).count()
            };
            if missing == 0 {
                break;
            }
            if self.task.is_finished() {
                let ended = (&mut self.task).await;
                return Err(format!(
                    "the consumer ended with {missing} of {} acked messages unhandled: {ended:?}",
                    acked.len()
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{missing} of {} acked messages never arrived after the {after}",
                    acked.len()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let report = (&mut self.task).await??;
        eprintln!(
            "  {after}: {} acked publishes all handled; runner report {report:?}",
            acked.len()
        );
        Ok(())
    }
}
