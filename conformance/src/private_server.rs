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

/// How a private broker goes down in a fault test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL: no goodbye, nothing flushed that was not flushed already.
    Kill,
    /// SIGTERM: the broker's own controlled shutdown.
    Clean,
}

impl Stop {
    /// `"killed"` or `"stopped"`, for test names and messages.
    pub fn word(self) -> &'static str {
        match self {
            Stop::Kill => "killed",
            Stop::Clean => "stopped",
        }
    }
}

/// Stops a private broker process as `how` says — with `group`, its whole process group (a
/// wrapper script and the VM it starts) — and waits until it exited; a clean stop that takes
/// longer than `grace` is an error (the process is then killed).
pub async fn stop_process(
    child: &mut tokio::process::Child,
    how: Stop,
    group: bool,
    grace: Duration,
) -> TestResult {
    let signal = match how {
        Stop::Kill => "KILL",
        Stop::Clean => "TERM",
    };
    if let Some(pid) = child.id() {
        let target = if group {
            format!("-{pid}")
        } else {
            pid.to_string()
        };
        let _ = std::process::Command::new("kill")
            .args(["-s", signal, "--", &target])
            .status();
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
        return Err(format!("the private broker ignored SIG{signal} for {grace:?}").into());
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts connections on 127.0.0.1:`port` (a private server just
/// started), polling every 50 ms; fails with "`what` did not listen within `limit`".
pub async fn wait_until_listening(port: u16, limit: Duration, what: &str) -> TestResult {
    let deadline = Instant::now() + limit;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not listen within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
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
    main_with_known_issues(have_binary, hint, tests, &[])
}

/// Like [`main_when`], plus `known` tests (name, the open defect, body) that show a known,
/// not yet fixed defect intermittently: IGNORED in every run (with the defect printed, even
/// with `BUSBAR_REQUIRE_BROKERS=1`) and run by `-- --ignored`, so the defect stays visible
/// and reproducible without failing CI at random.
pub fn main_with_known_issues(
    have_binary: bool,
    hint: &str,
    tests: &[(&'static str, bool, TestFn)],
    known: &[(&'static str, &'static str, TestFn)],
) -> ! {
    let mut trials: Vec<Planned> = tests
        .iter()
        .map(|&(name, needs_binary, test)| {
            let missing = (needs_binary && !have_binary).then(|| hint.to_owned());
            (name.to_owned(), missing, None, Box::new(test) as Body)
        })
        .collect();
    trials.extend(known.iter().map(|&(name, defect, test)| {
        let missing = (!have_binary).then(|| hint.to_owned());
        (
            name.to_owned(),
            missing,
            Some(defect),
            Box::new(test) as Body,
        )
    }));
    run_trials(trials)
}

/// A private-server test run once per server of a matrix; its argument says which server
/// (a binary's path, an installation's root, a URL: whatever the test file chose).
pub type MatrixFn = fn(String) -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// One server of a matrix of private-server tests.
#[derive(Debug, Clone)]
pub struct Server {
    /// Its name in test names (`test@label`), e.g. the version.
    pub label: String,
    /// What the tests get as their argument.
    pub param: String,
    /// Why it cannot be used (not installed, say), if it cannot.
    pub missing: Option<String>,
}

/// Runs every test of `matrix` once per server of `servers` (named `test@label` when there is
/// more than one server), then the tests of `once`, as a libtest-style binary: a missing
/// server's tests are IGNORED with its reason, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.
pub fn main_matrix(
    servers: &[Server],
    matrix: &[(&'static str, MatrixFn)],
    once: &[(&'static str, TestFn)],
) -> ! {
    let several = servers.len() > 1;
    let mut trials: Vec<Planned> = Vec::new();
    for &(name, test) in matrix {
        for server in servers {
            let full = if several {
                format!("{name}@{}", server.label)
            } else {
                name.to_owned()
            };
            let param = server.param.clone();
            trials.push((
                full,
                server.missing.clone(),
                None,
                Box::new(move || test(param.clone())),
            ));
        }
    }
    for &(name, test) in once {
        trials.push((name.to_owned(), None, None, Box::new(test)));
    }
    run_trials(trials)
}

type Body = Box<dyn Fn() -> Pin<Box<dyn Future<Output = TestResult> + Send>> + Send + Sync>;

/// A test to run: its name, why it cannot run (if so), the known defect it shows (if so).
type Planned = (String, Option<String>, Option<&'static str>, Body);

/// Runs named test bodies (each with a 180 s limit; `Some(why)` = cannot run) and exits.
fn run_trials(tests: Vec<Planned>) -> ! {
    crate::init_test_log();
    let args = libtest_mimic::Arguments::from_args();
    let required = crate::Harness::brokers_required();
    let runtime = crate::test_runtime();
    let trials = tests
        .into_iter()
        .map(|(name, missing, known, test)| {
            let rt = runtime.clone();
            let ignore = (missing.is_some() && !required) || known.is_some();
            if let (true, Some(why)) = (ignore, &missing) {
                eprintln!("IGNORED {name}: {why}");
            } else if let Some(defect) = known {
                eprintln!("IGNORED {name} (known defect, run it with -- --ignored): {defect}");
            }
            let trial = libtest_mimic::Trial::test(name, move || {
                if let Some(why) = &missing {
                    return Err(why.clone().into());
                }
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(180), test()).await })
                    .map_err(|_| Failed::from("timed out after 180 s"))?
            });
            trial.with_ignored_flag(ignore)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    crate::containers::remove_all();
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
#[derive(Debug)]
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

/// A private broker a restart test takes down and brings back on its data.
#[async_trait::async_trait]
pub trait Restartable: Send {
    /// Takes the broker down (`how`) and waits until its process is gone.
    async fn take_down(&mut self, how: Stop) -> TestResult;
    /// Starts it again on the same port and data; returns once it accepts clients.
    async fn bring_back(&mut self) -> TestResult;
}

/// The shape of a [`restart_mid_stream`] run.
#[derive(Debug, Clone)]
pub struct RestartPlan {
    /// Messages published before the restart is over (10 keys, round robin).
    pub before: usize,
    /// The broker goes down right after this publish.
    pub at: usize,
    /// Publishes tried while it is down (each must fail retryably, or succeed).
    pub while_down: usize,
    /// How long one publish while down may take.
    pub down_wait: Duration,
    /// Messages published after the loop.
    pub after: usize,
    /// How long each publish may be retried ([`publish_retrying`]).
    pub publish_limit: Duration,
    /// The recorder's ack timeout.
    pub ack_timeout: Duration,
    /// Every acked publish must be handled within this, after the last publish.
    pub handled_within: Duration,
}

impl Default for RestartPlan {
    fn default() -> Self {
        Self {
            before: 300,
            at: 150,
            while_down: 1,
            down_wait: Duration::from_secs(60),
            after: 100,
            publish_limit: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(5),
            handled_within: Duration::from_secs(120),
        }
    }
}

/// The broker goes down (`how`) mid-stream and comes back on its data, while a consumer of
/// the group `"g"` (made already) reads `topic` and publishes go on: every publish that
/// returned Ok is handled, each key's messages are first handled in publish order, a publish
/// while the broker is down fails retryably (or succeeds), never hangs or fails for good, and
/// publisher and consumer recover by themselves. Prints duplicates and the recovery.
pub async fn restart_mid_stream(
    bus: Arc<dyn EventBus>,
    topic: &str,
    broker: &mut dyn Restartable,
    how: Stop,
    plan: &RestartPlan,
) -> TestResult {
    let recorder = Recorder::start(bus.clone(), topic, "g", plan.ack_timeout);
    let mut acked = Vec::new();
    for i in 0..plan.before {
        let m = Message::new(format!("before-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(bus.as_ref(), topic, m, plan.publish_limit).await?;
        if i != plan.at {
            continue;
        }
        broker.take_down(how).await?;
        for j in 0..plan.while_down {
            let m = Message::new(format!("down-{j}")).with_key("k0");
            let id = m.id.clone();
            let options = PublishOptions::default();
            let publish = bus.publish(topic, m, &options);
            match tokio::time::timeout(plan.down_wait, publish).await {
                Ok(Ok(())) => acked.push(id),
                Ok(Err(e)) if e.is_retryable() => {}
                Ok(Err(e)) => return Err(format!("publish while down: {e}").into()),
                Err(_) => {
                    return Err(format!(
                        "a publish while the broker was down hung for {:?}",
                        plan.down_wait
                    )
                    .into())
                }
            }
        }
        broker.bring_back().await?;
        recorder.broker_back();
    }
    for i in 0..plan.after {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(bus.as_ref(), topic, m, plan.publish_limit).await?;
    }
    recorder
        .expect_all_in_key_order(
            &acked,
            plan.handled_within,
            &format!("{} restart", how.word()),
        )
        .await
}

/// A consumer runner that records the ids it handled (and, per key, the order in which each
/// was first handled), for tests that disrupt the broker while it consumes.
#[derive(Debug)]
pub struct Recorder {
    handled: Arc<Mutex<HashSet<String>>>,
    /// When each handling happened (duplicates included).
    times: Arc<Mutex<Vec<Instant>>>,
    /// When the test said the broker was back ([`Recorder::broker_back`]).
    back: Mutex<Option<Instant>>,
    /// Per key, ids in the order they were first handled.
    first_by_key: Arc<Mutex<std::collections::HashMap<String, Vec<String>>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<busbar_core::Result<ConsumerReport>>,
}

impl Recorder {
    /// Starts a runner of `group` on `topic` (the group should exist already).
    pub fn start(bus: Arc<dyn EventBus>, topic: &str, group: &str, ack_timeout: Duration) -> Self {
        let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
        let first_by_key: Arc<Mutex<std::collections::HashMap<String, Vec<String>>>> =
            Arc::default();
        let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (h, f, t) = (handled.clone(), first_by_key.clone(), times.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            Consumer::new(bus, topic)
                .group(group)
                .ack_timeout(ack_timeout)
                .run_until(
                    move |e: Event| {
                        let (h, f, t) = (h.clone(), f.clone(), t.clone());
                        async move {
                            t.lock().map_err(|_| "lock")?.push(Instant::now());
                            let first = h.lock().map_err(|_| "lock")?.insert(e.id().to_owned());
                            if let (true, Some(k)) = (first, e.key()) {
                                f.lock()
                                    .map_err(|_| "lock")?
                                    .entry(k.to_owned())
                                    .or_default()
                                    .push(e.id().to_owned());
                            }
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
            times,
            back: Mutex::new(None),
            first_by_key,
            stop: Some(stop),
            task,
        }
    }

    /// Notes that the broker is back up now: the report says how long after this the
    /// consumer handled its next message (its recovery).
    pub fn broker_back(&self) {
        if let Ok(mut back) = self.back.lock() {
            *back = Some(Instant::now());
        }
    }

    /// Duplicates, the recovery after [`Recorder::broker_back`] and the longest pause
    /// between two handlings, for the report line.
    fn summary(&self) -> String {
        let times = self.times.lock().map(|t| t.clone()).unwrap_or_default();
        let unique = self.handled.lock().map(|h| h.len()).unwrap_or_default();
        let back = self.back.lock().ok().and_then(|b| *b);
        let resumed = back
            .and_then(|b| times.iter().find(|t| **t >= b).map(|t| t.duration_since(b)))
            .map_or_else(String::new, |d| {
                format!(
                    ", first handling {:.1} s after the broker was back",
                    d.as_secs_f64()
                )
            });
        let pause = times
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or_default();
        format!(
            "{} duplicates{resumed}, longest pause between handlings {:.1} s",
            times.len().saturating_sub(unique),
            pause.as_secs_f64()
        )
    }

    /// As [`Recorder::expect_all`], and also fails when a keyed message of `acked` (given in
    /// publish order, one publisher per key) was first handled before an earlier acked
    /// message of its key.
    pub async fn expect_all_in_key_order(
        self,
        acked: &[String],
        limit: Duration,
        after: &str,
    ) -> TestResult {
        let first_by_key = self.first_by_key.clone();
        self.expect_all(acked, limit, after).await?;
        let position: std::collections::HashMap<&str, usize> = acked
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let by_key = first_by_key.lock().map_err(|_| "lock")?;
        let mut violations = Vec::new();
        for (key, ids) in by_key.iter() {
            let order: Vec<usize> = ids
                .iter()
                .filter_map(|id| position.get(id.as_str()).copied())
                .collect();
            if let Some(w) = order.windows(2).find(|w| w[0] > w[1]) {
                violations.push(format!(
                    "key {key}: publish #{} first handled after publish #{}",
                    w[1], w[0]
                ));
            }
        }
        if violations.is_empty() {
            eprintln!("  {after}: per-key order kept over {} keys", by_key.len());
            Ok(())
        } else {
            violations.sort();
            Err(format!(
                "per-key order broken after the {after} on {} key(s): {}",
                violations.len(),
                violations.join("; ")
            )
            .into())
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
                let h = self.handled.lock().map_err(|_| "lock")?;
                let positions: Vec<usize> = (0..acked.len())
                    .filter(|i| !h.contains(&acked[*i]))
                    .take(20)
                    .collect();
                return Err(format!(
                    "{missing} of {} acked messages never arrived after the {after} (publishes #{positions:?}…)",
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
            "  {after}: {} acked publishes all handled, {}; runner report {report:?}",
            acked.len(),
            self.summary()
        );
        Ok(())
    }
}
