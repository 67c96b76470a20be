//! Real crashes: consumer PROCESSES killed with SIGKILL — no goodbye, the connection cut by
//! the operating system, nothing handed back.
//!
//! [`worker`] is the consumer (run as `busbar worker`, a hidden command of the CLI, so one
//! binary speaks to every broker): it consumes a topic through the runner and appends each
//! handled message to a record file — one `write` per line on an `O_APPEND` file, so lines
//! of several processes never mix — before its handler returns, that is before its ack.
//! [`killed_worker`] publishes `keys × per_key` messages, starts a worker, SIGKILLs it while
//! its handlers are busy, starts a second, lets a third join, and reads the record: every
//! message handled at least once, and (where the backend orders per key) the first handling
//! of each key's message n never before that of n − 1.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
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
}

/// Microseconds since the Unix epoch (the record's clock, shared by every process).
fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Consumes until the process is killed (or the subscription ends). Each handled message
/// becomes the line `<pid> <micros> <key> <payload> <id>` of the record.
pub async fn worker(bus: Arc<dyn EventBus>, options: WorkerOptions) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&options.record)
        .with_context(|| format!("opening the record {}", options.record.display()))?;
    let file = Arc::new(Mutex::new(file));
    let pid = std::process::id();
    let handle = options.handle;
    Consumer::new(bus, options.topic)
        .group(options.group)
        .concurrency(options.concurrency)
        .ack_timeout(options.ack_timeout)
        .run(move |event| {
            let file = file.clone();
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
                    .map_err(|e| format!("recording {}: {e}", event.id()))
            }
        })
        .await?;
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
    /// From the SIGKILL to the second worker's first recorded message.
    pub recovery: Option<Duration>,
    /// Recorded by the first worker when it was killed.
    pub recorded_at_kill: usize,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} published, {} lost, {} order violations, {} duplicates, recovery {}, killed after {} recorded",
            self.published,
            self.lost,
            self.order_violations,
            self.duplicates,
            self.recovery
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
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
fn spawn(command: &[String], o: &WorkerOptions, log: &Path) -> Result<tokio::process::Child> {
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

/// Publishes `plan.keys × plan.per_key` messages to a fresh topic whose group exists, runs
/// worker A (`worker_command` + options), SIGKILLs it once it recorded `plan.kill_after`,
/// starts B at once, starts C once `plan.join_after` are recorded, waits until every message
/// is recorded, and checks: none lost, per-key order (where the backend orders per key).
pub async fn killed_worker(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    plan: &CrashPlan,
) -> Result<CrashReport> {
    let dir = std::env::temp_dir().join(crate::interop::fresh_name("busbar-crash"));
    std::fs::create_dir_all(&dir)?;
    let result = run_plan(bus, worker_command, plan, &dir).await;
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

async fn run_plan(
    bus: Arc<dyn EventBus>,
    worker_command: &[String],
    plan: &CrashPlan,
    dir: &Path,
) -> Result<CrashReport> {
    let options = WorkerOptions {
        topic: crate::interop::fresh_name("crash"),
        group: "crash".to_owned(),
        record: dir.join("record"),
        handle: plan.handle,
        concurrency: plan.concurrency,
        ack_timeout: Duration::from_secs(10),
    };
    // The workers' ack timeout from the start (on NATS it is the partition consumers' ack
    // wait, fixed when the group is made).
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
    let published = all.len();
    for chunk in all.chunks(batch) {
        bus.publish_batch(&options.topic, chunk.to_vec(), &PublishOptions::default())
            .await?;
    }
    let until = Instant::now() + plan.deadline;
    let mut a = spawn(worker_command, &options, &dir.join("worker-a.log"))?;
    let at_kill = wait_for(&options.record, plan.kill_after, until, &mut [&mut a]).await?;
    ensure!(
        at_kill.len() >= plan.kill_after,
        "the first worker recorded {} of {} before the deadline",
        at_kill.len(),
        plan.kill_after
    );
    // SIGKILL: no handler finishes, nothing is acked or handed back.
    a.start_kill()?;
    let killed_at = now_micros();
    a.wait().await?;
    let recorded_at_kill = read_record(&options.record)?.len();
    let mut b = spawn(worker_command, &options, &dir.join("worker-b.log"))?;
    let b_pid = b.id().unwrap_or(0);
    wait_for(&options.record, plan.join_after, until, &mut [&mut b]).await?;
    let mut c = spawn(worker_command, &options, &dir.join("worker-c.log"))?;
    let expected: HashSet<(String, usize)> = (0..plan.keys)
        .flat_map(|k| (0..plan.per_key).map(move |s| (format!("k{k}"), s)))
        .collect();
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
        b_pid,
        killed_at,
        recorded_at_kill,
    );
    ensure!(report.lost == 0, "{report}");
    ensure!(report.order_violations == 0, "{report}");
    Ok(report)
}

fn analyse(
    lines: &[Handled],
    expected: &HashSet<(String, usize)>,
    ordering: Ordering,
    published: usize,
    b_pid: u32,
    killed_at: u128,
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
    let recovery = lines.iter().find(|h| h.pid == b_pid).map(|h| {
        Duration::from_micros(u64::try_from(h.micros.saturating_sub(killed_at)).unwrap_or(u64::MAX))
    });
    CrashReport {
        published,
        lost,
        order_violations,
        duplicates: lines.len().saturating_sub(first.len()),
        recovery,
        recorded_at_kill,
    }
}
