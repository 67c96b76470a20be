//! Real crashes: consumer PROCESSES killed with SIGKILL — no goodbye, the connection cut by
//! the operating system, nothing handed back.
//!
//! [`worker`] is the consumer (run as `busbar worker`, a hidden command of the CLI, so one
//! binary speaks to every broker): it consumes a topic through the runner and appends each
//! handled message to a record file — one `write` per line on an `O_APPEND` file, so lines
//! of several processes never mix — before its handler returns, that is before its ack.
//! [`killed_worker`] publishes `keys × per_key` messages, starts a worker, SIGKILLs it while
//! its handlers are busy, starts a second, lets a third join — or, [`KillAt::DuringHandover`],
//! kills one of two workers while partitions move to a third that joined — and reads the
//! record: every message handled at least once, and (where the backend orders per key) the
//! first handling of each key's message n never before that of n − 1.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use async_trait::async_trait;
use busbar_core::idempotency::IdempotencyStore;
use busbar_core::{Consumer, EventBus, Message, Ordering, PublishOptions, SubscribeOptions};

/// What a worker consumes and where it records.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// The record file (appended to).
    pub record: PathBuf,
    /// How long each handler works before it records and returns.
    pub handle: Duration,
    /// Handlers at once.
    pub concurrency: usize,
    /// The subscription's ack timeout (bounds how long a dead member's deliveries stay out
    /// on brokers that redeliver by timeout).
    pub ack_timeout: Duration,
    /// An idempotent consumer's store and ttl ([`Consumer::idempotent`]).
    pub idempotent: Option<(Arc<dyn IdempotencyStore>, Duration)>,
    /// Dies (abort: no ack, no goodbye) right after the store recorded this many messages —
    /// a crash between the record and the ack, which only idempotency saves from a
    /// duplicate. Needs `idempotent`.
    pub die_after_records: Option<usize>,
    /// Dies (abort) right after handling this many messages, before the last one's ack.
    pub die_after_handled: Option<usize>,
}

/// The worker's store, watched: each message found recorded (so skipped) is appended to
/// `<record>.skipped`, and the process aborts right after its `die_after`th record.
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn IdempotencyStore>,
    die_after: Option<std::sync::atomic::AtomicUsize>,
    skipped: Mutex<std::fs::File>,
}

#[async_trait]
impl IdempotencyStore for Watched {
    async fn contains(&self, key: &str) -> busbar_core::Result<bool> {
        let found = self.inner.contains(key).await?;
        if found {
            let line = format!("{} {key}\n", std::process::id());
            let written = self
                .skipped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(line.as_bytes());
            if let Err(e) = written {
                tracing::error!(error = %e, "worker: cannot note a skipped message");
            }
        }
        Ok(found)
    }

    async fn record(&self, key: &str, ttl: Duration) -> busbar_core::Result<()> {
        self.inner.record(key, ttl).await?;
        let last = self
            .die_after
            .as_ref()
            .is_some_and(|left| left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1);
        if last {
            tracing::warn!(key, "worker: dying between a record and its ack, as asked");
            std::process::abort();
        }
        Ok(())
    }
}

fn append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Where a worker notes the messages its idempotency store made it skip.
fn skipped_file(record: &Path) -> PathBuf {
    let mut name = record.as_os_str().to_owned();
    name.push(".skipped");
    PathBuf::from(name)
}

/// Microseconds since the Unix epoch (the record's clock, shared by every process).
fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Logs at INFO and above to stderr (the worker's log file), once per process.
pub fn init_worker_log() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Consumes until the process is killed, `shutdown` completes (then it leaves gracefully:
/// handlers finish, the rest is handed back) or the subscription ends. Each handled message
/// becomes the line `<pid> <micros> <key> <payload> <id>` of the record.
pub async fn worker(
    bus: Arc<dyn EventBus>,
    options: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let file = Arc::new(Mutex::new(append(&options.record)?));
    let pid = std::process::id();
    let handle = options.handle;
    let left = Arc::new(
        options
            .die_after_handled
            .map(|n| std::sync::atomic::AtomicUsize::new(n.max(1))),
    );
    let mut consumer = Consumer::new(bus, options.topic)
        .group(options.group)
        .concurrency(options.concurrency)
        .ack_timeout(options.ack_timeout);
    if let Some((store, ttl)) = options.idempotent {
        let watched = Watched {
            inner: store,
            die_after: options
                .die_after_records
                .map(|n| std::sync::atomic::AtomicUsize::new(n.max(1))),
            skipped: Mutex::new(append(&skipped_file(&options.record))?),
        };
        consumer = consumer.idempotent(Arc::new(watched), ttl);
    }
    let report = consumer
        .run_until(
            move |event| {
                let (file, left) = (file.clone(), left.clone());
                async move {
                    tokio::time::sleep(handle).await;
                    let line = format!(
                        "{pid} {} {} {} {}\n",
                        now_micros(),
                        event.key().unwrap_or("-"),
                        String::from_utf8_lossy(event.payload()),
                        event.id()
                    );
                    // One write of the whole line: O_APPEND keeps it in one piece.
                    file.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .write_all(line.as_bytes())
                        .map_err(|e| format!("recording {}: {e}", event.id()))?;
                    let last = left
                        .as_ref()
                        .as_ref()
                        .is_some_and(|n| n.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1);
                    if last {
                        tracing::warn!(
                            "worker: dying after a handled message, before its ack, as asked"
                        );
                        std::process::abort();
                    }
                    Ok::<(), String>(())
                }
            },
            shutdown,
        )
        .await?;
    tracing::info!(?report, "worker: left");
    Ok(())
}

/// The shape of a crash run.
#[derive(Debug, Clone)]
pub struct CrashPlan {
    /// Keys.
    pub keys: usize,
    /// Messages per key (payloads `0..per_key`).
    pub per_key: usize,
    /// The first worker is killed once it recorded this many messages.
    pub kill_after: usize,
    /// The third worker joins once this many are recorded in all.
    pub join_after: usize,
    /// Handler time of the workers.
    pub handle: Duration,
    /// Handlers at once per worker.
    pub concurrency: usize,
    /// Everything must be handled within this.
    pub deadline: Duration,
}

impl Default for CrashPlan {
    fn default() -> Self {
        Self {
            keys: 100,
            per_key: 20,
            kill_after: 300,
            join_after: 1000,
            handle: Duration::from_millis(20),
            concurrency: 16,
            deadline: Duration::from_secs(140),
        }
    }
}

/// What a crash run saw.
#[derive(Debug, Clone, Default)]
pub struct CrashReport {
    /// Messages published.
    pub published: usize,
    /// Messages never recorded (must be 0).
    pub lost: usize,
    /// Messages whose first handling came before that of their key's previous one (must be
    /// 0 where the backend orders per key).
    pub order_violations: usize,
    /// Handlings beyond the first.
    pub duplicates: usize,
    /// The longest a key the killed worker was serving waited, from the SIGKILL to its next
    /// handling by a survivor.
    pub recovery: Option<Duration>,
    /// Recorded (by all workers) when the first was killed.
    pub recorded_at_kill: usize,
    /// Keys the killed worker had served last and that had messages left: the work the
    /// survivors had to take over.
    pub left_waiting: usize,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} published, {} lost, {} order violations, {} duplicates, recovery {} ({} keys taken over), killed after {} recorded",
            self.published,
            self.lost,
            self.order_violations,
            self.duplicates,
            self.recovery
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            self.left_waiting,
            self.recorded_at_kill
        )
    }
}

/// One line of the record.
struct Handled {
    pid: u32,
    micros: u128,
    key: String,
    seq: usize,
}

fn read_record(path: &Path) -> Result<Vec<Handled>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    // A line still being written (no newline yet) is left for the next read.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| {
            let mut f = line.split(' ');
            let mut next = || {
                f.next()
                    .ok_or_else(|| anyhow!("short record line {line:?}"))
            };
            Ok(Handled {
                pid: next()?.parse()?,
                micros: next()?.parse()?,
                key: next()?.to_owned(),
                seq: next()?.parse()?,
            })
        })
        .collect()
}

/// A worker process: `command` with the worker's options appended, its output in `log`.
fn spawn(
    command: &[String],
    o: &WorkerOptions,
    extra: &[String],
    log: &Path,
) -> Result<tokio::process::Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("no worker command"))?;
    let log = std::fs::File::create(log)?;
    tokio::process::Command::new(program)
        .args(args)
        .args(["--topic", &o.topic, "--group", &o.group, "--record"])
        .arg(&o.record)
        .args([
            "--handle-ms",
            &o.handle.as_millis().to_string(),
            "--concurrency",
            &o.concurrency.to_string(),
            "--ack-timeout-secs",
            &o.ack_timeout.as_secs().max(1).to_string(),
        ])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the worker {program}"))
}

/// Waits until the record holds `n` lines (or the deadline, or a worker exits).
async fn wait_for(
    record: &Path,
    n: usize,
    until: Instant,
    workers: &mut [&mut tokio::process::Child],
) -> Result<Vec<Handled>> {
    loop {
        let lines = read_record(record)?;
        if lines.len() >= n {
            return Ok(lines);
        }
        for w in workers.iter_mut() {
            if let Some(status) = w.try_wait()? {
                bail!("a worker exited ({status}) with {} recorded", lines.len());
            }
        }
        if Instant::now() >= until {
            return Ok(lines);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When [`killed_worker`] SIGKILLs its first worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillAt {
    /// Worker A runs alone and is killed once it recorded `plan.kill_after` (its handlers
    /// busy); B starts at once, C joins once `plan.join_after` are recorded.
    MidBatch,
    /// Workers A and B share the group; once `plan.kill_after` are recorded C joins, and A is
    /// killed as soon as C handled its first message — a partition has moved to C and A may
    /// still be draining or handing over others.
    DuringHandover,
}

/// Publishes `plan.keys × plan.per_key` messages to a fresh topic whose group exists, runs
/// workers (`worker_command` + options) and SIGKILLs the first as `at` says, waits until
/// every message is recorded, and checks: none lost, per-key order (where the backend orders
/// per key).
pub async fn killed_worker(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    plan: &CrashPlan,
    at: KillAt,
) -> Result<CrashReport> {
    let dir = std::env::temp_dir().join(crate::interop::fresh_name("busbar-crash"));
    std::fs::create_dir_all(&dir)?;
    let result = run_plan(bus, worker_command, plan, at, &dir).await;
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => {
            for who in ["a", "b", "c"] {
                let log = std::fs::read_to_string(dir.join(format!("worker-{who}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                tracing::error!(worker = who, log = %tail.into_iter().rev().collect::<Vec<_>>().join("\n"), "crash case failed; the worker's last log lines");
            }
        }
    }
    result
}

/// A fresh topic with the group made (at the workers' ack timeout: on NATS it is the
/// partition consumers' ack wait, fixed when the group is made) and `plan`'s messages
/// published: the workers' options and the published count.
async fn prepare(
    bus: &Arc<dyn EventBus>,
    plan: &CrashPlan,
    dir: &Path,
) -> Result<(WorkerOptions, usize)> {
    let options = WorkerOptions {
        topic: crate::interop::fresh_name("crash"),
        // Fresh: on Kafka a group id is global, and the killed members of an earlier run stay
        // in a group of that name (on any topic) until their session times out.
        group: crate::interop::fresh_name("crash"),
        record: dir.join("record"),
        handle: plan.handle,
        concurrency: plan.concurrency,
        ack_timeout: Duration::from_secs(10),
        idempotent: None,
        die_after_records: None,
        die_after_handled: None,
    };
    let group = SubscribeOptions::new(options.group.clone()).ack_timeout(options.ack_timeout);
    bus.provision(&options.topic, &group).await?;
    let batch = bus
        .capabilities()
        .batch_max_size
        .unwrap_or(100)
        .clamp(1, 100);
    let mut all = Vec::new();
    for seq in 0..plan.per_key {
        for k in 0..plan.keys {
            all.push(Message::new(seq.to_string()).with_key(format!("k{k}")));
        }
    }
    for chunk in all.chunks(batch) {
        bus.publish_batch(&options.topic, chunk.to_vec(), &PublishOptions::default())
            .await?;
    }
    Ok((options, all.len()))
}

/// Every (key, seq) of `plan`.
fn expected(plan: &CrashPlan) -> HashSet<(String, usize)> {
    (0..plan.keys)
        .flat_map(|k| (0..plan.per_key).map(move |s| (format!("k{k}"), s)))
        .collect()
}

async fn run_plan(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    plan: &CrashPlan,
    at: KillAt,
    dir: &Path,
) -> Result<CrashReport> {
    let (options, published) = prepare(&bus, plan, dir).await?;
    let until = Instant::now() + plan.deadline;
    let start = |who: &str| {
        spawn(
            worker_command,
            &options,
            &[],
            &dir.join(format!("worker-{who}.log")),
        )
    };
    let mut a = start("a")?;
    let a_pid = a.id().unwrap_or(0);
    let (killed_at, recorded_at_kill, mut b, mut c) = match at {
        KillAt::MidBatch => {
            let at_kill = wait_for(&options.record, plan.kill_after, until, &mut [&mut a]).await?;
            ensure!(
                at_kill.len() >= plan.kill_after,
                "the first worker recorded {} of {} before the deadline",
                at_kill.len(),
                plan.kill_after
            );
            let (killed_at, recorded) = sigkill(&mut a, &options.record).await?;
            let mut b = start("b")?;
            wait_for(&options.record, plan.join_after, until, &mut [&mut b]).await?;
            let c = start("c")?;
            (killed_at, recorded, b, c)
        }
        KillAt::DuringHandover => {
            let mut b = start("b")?;
            wait_for(
                &options.record,
                plan.kill_after,
                until,
                &mut [&mut a, &mut b],
            )
            .await?;
            let mut c = start("c")?;
            let c_pid = c.id().unwrap_or(0);
            loop {
                let lines = read_record(&options.record)?;
                if lines.iter().any(|h| h.pid == c_pid) {
                    break;
                }
                ensure!(
                    Instant::now() < until,
                    "the joining worker handled nothing before the deadline"
                );
                for w in [&mut a, &mut b, &mut c] {
                    if let Some(status) = w.try_wait()? {
                        bail!("a worker exited ({status}) with {} recorded", lines.len());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (killed_at, recorded) = sigkill(&mut a, &options.record).await?;
            (killed_at, recorded, b, c)
        }
    };
    let expected = expected(plan);
    let lines = loop {
        let lines = read_record(&options.record)?;
        let seen: HashSet<(&str, usize)> = lines.iter().map(|h| (h.key.as_str(), h.seq)).collect();
        if seen.len() >= expected.len() || Instant::now() >= until {
            break lines;
        }
        for w in [&mut b, &mut c] {
            if let Some(status) = w.try_wait()? {
                bail!("a worker exited ({status}) with {} recorded", lines.len());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Late duplicates (deliveries of the killed worker coming back) show within a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = if lines.len() < expected.len() {
        lines
    } else {
        read_record(&options.record)?
    };
    for w in [&mut b, &mut c] {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    let report = analyse(
        &lines,
        &expected,
        bus.capabilities().ordering,
        published,
        (a_pid, killed_at),
        recorded_at_kill,
    );
    ensure!(report.lost == 0, "{report}");
    ensure!(report.order_violations == 0, "{report}");
    Ok(report)
}

/// SIGKILLs `worker` (no handler finishes, nothing is acked or handed back) and waits for
/// it to be gone: when it was killed, and how many lines the record held then.
async fn sigkill(worker: &mut tokio::process::Child, record: &Path) -> Result<(u128, usize)> {
    worker.start_kill()?;
    let killed_at = now_micros();
    worker.wait().await?;
    Ok((killed_at, read_record(record)?.len()))
}

/// The run's report; `killed` is the SIGKILLed worker's pid and when it died (pid 0: none).
fn analyse(
    lines: &[Handled],
    expected: &HashSet<(String, usize)>,
    ordering: Ordering,
    published: usize,
    killed: (u32, u128),
    recorded_at_kill: usize,
) -> CrashReport {
    let mut first: HashMap<(&str, usize), usize> = HashMap::new();
    for (i, h) in lines.iter().enumerate() {
        first.entry((h.key.as_str(), h.seq)).or_insert(i);
    }
    let lost = expected
        .iter()
        .filter(|(k, s)| !first.contains_key(&(k.as_str(), *s)))
        .count();
    let order_violations = if ordering == Ordering::PerKey {
        first
            .iter()
            .filter(|((k, s), i)| *s > 0 && first.get(&(*k, s - 1)).is_some_and(|prev| prev > *i))
            .count()
    } else {
        0
    };
    CrashReport {
        published,
        lost,
        order_violations,
        duplicates: lines.len().saturating_sub(first.len()),
        recovery: recovery(lines, killed),
        recorded_at_kill,
        left_waiting: recovery_stalls(lines, killed).len(),
    }
}

/// The longest stall the kill caused: over the keys whose last handling before the kill was
/// the killed worker's and that had messages left, the longest time from the kill to the
/// key's next handling by a survivor. `None` when no key was left waiting.
fn recovery(lines: &[Handled], killed: (u32, u128)) -> Option<Duration> {
    recovery_stalls(lines, killed).into_iter().max()
}

/// For each key whose last handling before the kill was the killed worker's and that was
/// handled again afterwards: the time from the kill to that next handling.
fn recovery_stalls(lines: &[Handled], (pid, killed_at): (u32, u128)) -> Vec<Duration> {
    if pid == 0 {
        return Vec::new();
    }
    let mut last_before: HashMap<&str, u32> = HashMap::new();
    let mut next_after: HashMap<&str, u128> = HashMap::new();
    for h in lines {
        if h.micros <= killed_at {
            last_before.insert(h.key.as_str(), h.pid);
        } else if h.pid != pid {
            next_after.entry(h.key.as_str()).or_insert(h.micros);
        }
    }
    last_before
        .iter()
        .filter(|(_, p)| **p == pid)
        .filter_map(|(key, _)| next_after.get(key))
        .map(|at| {
            Duration::from_micros(u64::try_from(at.saturating_sub(killed_at)).unwrap_or(u64::MAX))
        })
        .collect()
}

/// What an idempotent redelivery run saw.
#[derive(Debug, Clone, Default)]
pub struct RedeliveryReport {
    /// Messages published.
    pub published: usize,
    /// Messages never handled (must be 0).
    pub lost: usize,
    /// Messages handled more than once (must be 0 with an idempotency store).
    pub handled_twice: usize,
    /// Redeliveries the second worker acked without handling them.
    pub skipped: usize,
}

impl std::fmt::Display for RedeliveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} published, {} lost, {} handled twice, {} redeliveries skipped",
            self.published, self.lost, self.handled_twice, self.skipped
        )
    }
}

/// The kill -9 redelivery of an idempotent consumer: one handler at a time, worker A records
/// its 20th message in the store (given to the workers as `store_args`, e.g. `--idempotent
/// URL`) and aborts before the ack; worker B gets that message again. It passes when B skips
/// it (noted by the worker) and every message was handled exactly once. With `store_args`
/// empty the same run shows what the store prevents: the message A died on handled twice.
pub async fn idempotent_redelivery(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    store_args: &[String],
) -> Result<RedeliveryReport> {
    let dir = std::env::temp_dir().join(crate::interop::fresh_name("busbar-idem"));
    std::fs::create_dir_all(&dir)?;
    let result = redeliver(bus, worker_command, store_args, &dir).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn redeliver(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    store_args: &[String],
    dir: &Path,
) -> Result<RedeliveryReport> {
    let plan = CrashPlan {
        keys: 10,
        per_key: 6,
        handle: Duration::from_millis(5),
        concurrency: 1,
        deadline: Duration::from_secs(120),
        ..CrashPlan::default()
    };
    let (options, published) = prepare(&bus, &plan, dir).await?;
    let until = Instant::now() + plan.deadline;
    let mut dying = store_args.to_vec();
    dying.extend(["--die-after-records".to_owned(), "20".to_owned()]);
    if store_args.is_empty() {
        // Without a store the worker cannot count records: it dies after 20 handled.
        dying = vec!["--die-after-handled".to_owned(), "20".to_owned()];
    }
    let mut a = spawn(worker_command, &options, &dying, &dir.join("worker-a.log"))?;
    let status = tokio::time::timeout_at(until.into(), a.wait())
        .await
        .map_err(|_| anyhow!("worker A did not die after 20 records"))??;
    ensure!(!status.success(), "worker A ended by itself: {status}");
    let mut b = spawn(
        worker_command,
        &options,
        store_args,
        &dir.join("worker-b.log"),
    )?;
    let expected = expected(&plan);
    let skipped_path = skipped_file(&options.record);
    let (lines, skipped) = loop {
        let lines = read_record(&options.record)?;
        let skipped = std::fs::read_to_string(&skipped_path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        let seen: HashSet<(&str, usize)> = lines.iter().map(|h| (h.key.as_str(), h.seq)).collect();
        // Done when everything was handled and the message A died on came back (skipped, or
        // handled a second time).
        if seen.len() >= expected.len() && (skipped > 0 || lines.len() > seen.len())
            || Instant::now() >= until
        {
            break (lines, skipped);
        }
        if let Some(status) = b.try_wait()? {
            bail!("worker B exited ({status}) with {} recorded", lines.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = b.start_kill();
    let _ = b.wait().await;
    let mut count: HashMap<(&str, usize), usize> = HashMap::new();
    for h in &lines {
        *count.entry((h.key.as_str(), h.seq)).or_default() += 1;
    }
    let report = RedeliveryReport {
        published,
        lost: expected
            .iter()
            .filter(|(k, s)| !count.contains_key(&(k.as_str(), *s)))
            .count(),
        handled_twice: count.values().filter(|n| **n > 1).count(),
        skipped,
    };
    ensure!(report.lost == 0, "{report}");
    ensure!(report.handled_twice == 0, "{report}");
    ensure!(
        report.skipped > 0,
        "the message worker A died on never came back within the deadline: {report}"
    );
    Ok(report)
}

/// What a rebalance-under-churn run saw.
#[derive(Debug, Clone, Default)]
pub struct ChurnReport {
    /// Messages published.
    pub published: usize,
    /// Messages never handled (must be 0).
    pub lost: usize,
    /// Messages first handled before their key's previous one (must be 0 where the backend
    /// orders per key).
    pub order_violations: usize,
    /// Handlings beyond the first.
    pub duplicates: usize,
    /// Members that joined (the first two included) and that left gracefully.
    pub joined: usize,
    /// Members that left gracefully (SIGTERM: handlers finish, the rest is handed back).
    pub left: usize,
    /// Handled when the last change was made.
    pub handled_during_churn: usize,
    /// From the first publish to the last message's first handling.
    pub took: Duration,
}

impl std::fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} published, {} lost, {} order violations, {} duplicates; {} joined, {} left, {} handled during the changes; {:.1} s",
            self.published,
            self.lost,
            self.order_violations,
            self.duplicates,
            self.joined,
            self.left,
            self.handled_during_churn,
            self.took.as_secs_f64()
        )
    }
}

/// Asks a worker to leave (SIGTERM) and waits up to 30 s for it; SIGKILL after that.
async fn leave(worker: &mut tokio::process::Child) -> Result<()> {
    if let Some(pid) = worker.id() {
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
    }
    match tokio::time::timeout(Duration::from_secs(30), worker.wait()).await {
        Ok(status) => {
            let status = status?;
            ensure!(status.success(), "a worker left with {status}");
        }
        Err(_) => {
            worker.start_kill()?;
            bail!("a worker did not leave within 30 s of SIGTERM");
        }
    }
    Ok(())
}

/// Rebalances under load: `plan.keys × plan.per_key` messages, two workers, then every
/// `every` a member joins or the oldest leaves gracefully (never fewer than two), `changes`
/// times (or until everything is handled), then the members left finish. None lost, per-key
/// order kept where the backend orders per key.
pub async fn rebalance_under_churn(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    plan: &CrashPlan,
    every: Duration,
    changes: usize,
) -> Result<ChurnReport> {
    let dir = std::env::temp_dir().join(crate::interop::fresh_name("busbar-churn"));
    std::fs::create_dir_all(&dir)?;
    let result = churn(bus, worker_command, plan, every, changes, &dir).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn churn(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    plan: &CrashPlan,
    every: Duration,
    changes: usize,
    dir: &Path,
) -> Result<ChurnReport> {
    let started = Instant::now();
    let (options, published) = prepare(&bus, plan, dir).await?;
    let until = started + plan.deadline;
    let expected = expected(plan);
    let mut workers = std::collections::VecDeque::new();
    let mut report = ChurnReport {
        published,
        ..ChurnReport::default()
    };
    let join = |workers: &mut std::collections::VecDeque<tokio::process::Child>,
                report: &mut ChurnReport|
     -> Result<()> {
        let log = dir.join(format!("worker-{}.log", report.joined));
        workers.push_back(spawn(worker_command, &options, &[], &log)?);
        report.joined += 1;
        Ok(())
    };
    join(&mut workers, &mut report)?;
    join(&mut workers, &mut report)?;
    let mut step = 0usize;
    let mut next_change = Instant::now() + every;
    let lines = loop {
        let lines = read_record(&options.record)?;
        let seen: HashSet<(&str, usize)> = lines.iter().map(|h| (h.key.as_str(), h.seq)).collect();
        if seen.len() >= expected.len() || Instant::now() >= until {
            break lines;
        }
        for w in workers.iter_mut() {
            if let Some(status) = w.try_wait()? {
                bail!("a worker exited ({status}) with {} recorded", lines.len());
            }
        }
        if step < changes && Instant::now() >= next_change {
            if step % 2 == 0 || workers.len() <= 2 {
                join(&mut workers, &mut report)?;
            } else if let Some(mut oldest) = workers.pop_front() {
                leave(&mut oldest).await?;
                report.left += 1;
            }
            step += 1;
            next_change = Instant::now() + every;
            if step == changes {
                report.handled_during_churn = seen.len();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    report.took = started.elapsed();
    if step < changes {
        // Done before the last change: everything was handled while members came and went.
        report.handled_during_churn = lines
            .iter()
            .map(|h| (h.key.as_str(), h.seq))
            .collect::<HashSet<_>>()
            .len();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = if lines.len() < expected.len() {
        lines
    } else {
        read_record(&options.record)?
    };
    for mut w in workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    let seen = analyse(
        &lines,
        &expected,
        bus.capabilities().ordering,
        published,
        (0, 0),
        0,
    );
    report.lost = seen.lost;
    report.order_violations = seen.order_violations;
    report.duplicates = seen.duplicates;
    ensure!(report.lost == 0, "{report}");
    ensure!(report.order_violations == 0, "{report}");
    Ok(report)
}
