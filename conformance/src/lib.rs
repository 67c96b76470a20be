//! The busbar conformance suite: one set of cases every backend runs against a real broker.
//!
//! Each case is an `async fn(Ctx) -> anyhow::Result<Outcome>` with a one-line doc of the
//! behaviour it proves and the capabilities it needs. A backend runs the whole suite from its
//! `tests/conformance.rs` (with `harness = false`) in a few lines:
//!
//! ```no_run
//! // backends/<name>/tests/conformance.rs
//! // (a whitespace-separated list of URLs runs the suite against each server)
//! busbar_conformance::main(busbar_conformance::Harness::matrix_from_env(
//!     "memory",
//!     "BUSBAR_MEMORY_URL",
//!     "memory://conformance",
//!     "nothing to start: the memory backend is embedded",
//!     busbar_core::memory::connect_boxed,
//! ));
//! ```
//!
//! Cases a backend declares unsupported (through its [`busbar_core::Capabilities`]) are
//! reported IGNORED with the reason printed, never passed. A missing broker makes every case
//! IGNORED with a hint on how to start one — or FAILED when `BUSBAR_REQUIRE_BROKERS=1`.
//! Reads tolerate duplicates (at-least-once) and fail on any loss; duplicates are printed.
//! `BUSBAR_CONFORMANCE_SCALE` (a positive number, default 1) scales the message counts.

mod capture;
pub mod cases;
pub mod containers;
pub mod crash;
pub mod interop;
pub mod private_server;
mod report;
pub mod support;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_core::Capabilities;
use futures::future::BoxFuture;

pub use support::{Connect, Ctx};

/// What a passing case reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Deliveries of messages that had already arrived (at-least-once duplicates).
    pub duplicates: u64,
    /// Anything worth printing (what was measured).
    pub note: Option<String>,
}

impl Outcome {
    /// A pass with no duplicates and no note.
    pub fn ok() -> Self {
        Self::default()
    }

    /// A pass with `duplicates` duplicates.
    pub fn with_duplicates(duplicates: u64) -> Self {
        Self {
            duplicates,
            note: None,
        }
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// The body of a case.
pub type CaseFn = fn(Ctx) -> BoxFuture<'static, anyhow::Result<Outcome>>;

/// One conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// `module::case`, e.g. `ordering::per_key_order_competing_consumers`.
    pub name: &'static str,
    /// The behaviour it proves, in one line.
    pub doc: &'static str,
    /// Returns why the case does not apply to a backend with these capabilities, if it doesn't.
    pub needs: fn(&Capabilities) -> Option<&'static str>,
    /// Runs the case.
    pub run: CaseFn,
    /// How long the case may take at scale 1 before it fails.
    pub timeout: Duration,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Message-count multiplier from `BUSBAR_CONFORMANCE_SCALE`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale(f64);

impl Scale {
    /// Reads `BUSBAR_CONFORMANCE_SCALE` (default 1; invalid or non-positive values fall back
    /// to 1 with a warning).
    pub fn from_env() -> Self {
        match std::env::var("BUSBAR_CONFORMANCE_SCALE") {
            Err(_) => Self(1.0),
            Ok(v) => match v.parse::<f64>() {
                Ok(f) if f.is_finite() && f > 0.0 => Self(f),
                _ => {
                    eprintln!("BUSBAR_CONFORMANCE_SCALE={v:?} is not a positive number; using 1");
                    Self(1.0)
                }
            },
        }
    }

    /// A fixed scale.
    pub fn new(factor: f64) -> Self {
        Self(if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        })
    }

    /// `n` scaled, at least 1.
    pub fn apply(self, n: usize) -> usize {
        ((n as f64 * self.0).round() as usize).max(1)
    }

    /// Scales a case timeout (never below the scale-1 value).
    pub fn timeout(self, base: Duration) -> Duration {
        base.mul_f64(self.0.max(1.0))
    }
}

/// How a case ended.
#[derive(Debug)]
pub enum Verdict {
    /// Passed.
    Passed(Outcome),
    /// Failed, with the reason.
    Failed(String),
    /// Not run, with the reason.
    Ignored(String),
}

/// One case's result with its duration.
#[derive(Debug)]
pub struct CaseResult {
    /// The case.
    pub case: &'static str,
    /// How it ended.
    pub verdict: Verdict,
    /// How long it ran.
    pub elapsed: Duration,
}

/// The backend under test: how to connect, and what to say when its broker is missing.
#[derive(Clone)]
pub struct Harness {
    /// Backend name, e.g. `redis`.
    pub backend: &'static str,
    /// The URL used (secrets are redacted when printed).
    pub url: String,
    /// How to start a broker, printed when it is unreachable.
    pub start_hint: &'static str,
    /// Opens a connection.
    pub connect: Connect,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("backend", &self.backend)
            .field("url", &busbar_core::raw::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// What a successful probe learnt about the server.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The capabilities the backend declares on this server.
    pub capabilities: Capabilities,
    /// The version the server reported, where the protocol says.
    pub server_version: Option<String>,
}

/// The URLs of an environment variable: one or more, separated by whitespace (a matrix of
/// servers, e.g. `BUSBAR_NATS_URL="nats://127.0.0.1:14222 nats://127.0.0.1:4222"`), or
/// `default_url` when it is unset or blank.
pub fn urls_from_env(env_var: &str, default_url: &str) -> Vec<String> {
    let urls: Vec<String> = std::env::var(env_var)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        vec![default_url.to_owned()]
    } else {
        urls
    }
}

impl Harness {
    /// A harness for `url`, connecting with `connect_url`.
    pub fn new(
        backend: &'static str,
        url: impl Into<String>,
        start_hint: &'static str,
        connect_url: busbar_core::raw::ConnectFn,
    ) -> Self {
        let url = url.into();
        let u = url.clone();
        Self {
            backend,
            url,
            start_hint,
            connect: Arc::new(move || connect_url(u.clone())),
        }
    }

    /// A harness whose URL is the first of `env_var` (see [`urls_from_env`]).
    pub fn from_env(
        backend: &'static str,
        env_var: &str,
        default_url: &str,
        start_hint: &'static str,
        connect_url: busbar_core::raw::ConnectFn,
    ) -> Self {
        let url = urls_from_env(env_var, default_url).swap_remove(0);
        Self::new(backend, url, start_hint, connect_url)
    }

    /// One harness per URL of `env_var`: the suite runs against every server of the matrix.
    /// Where `env_var` is unset, the broker comes from a container when a Docker daemon
    /// answers, else from `default_url` (see [`containers`]).
    pub fn matrix_from_env(
        backend: &'static str,
        env_var: &str,
        default_url: &str,
        start_hint: &'static str,
        connect_url: busbar_core::raw::ConnectFn,
    ) -> Vec<Self> {
        containers::urls_for(backend, env_var, default_url)
            .into_iter()
            .map(|url| Self::new(backend, url, start_hint, connect_url))
            .collect()
    }

    /// Whether `BUSBAR_REQUIRE_BROKERS=1` is set: a missing broker then fails every case.
    pub fn brokers_required() -> bool {
        std::env::var("BUSBAR_REQUIRE_BROKERS").is_ok_and(|v| v == "1" || v == "true")
    }

    /// Connects once to learn the capabilities and the server version; `Err` carries a
    /// message saying how to start the broker.
    pub async fn probe(&self) -> Result<Probe, String> {
        let attempt = tokio::time::timeout(Duration::from_secs(20), (self.connect)()).await;
        let failure = match attempt {
            Ok(Ok(bus)) => {
                let probe = Probe {
                    capabilities: bus.capabilities(),
                    server_version: bus.server_version(),
                };
                let _ = bus.close().await;
                return Ok(probe);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 20 s".to_owned(),
        };
        Err(format!(
            "{} broker not reachable at {}: {failure}. Start one with `{}`",
            self.backend,
            busbar_core::raw::redact_url(&self.url),
            self.start_hint
        ))
    }

    /// Runs one case on a fresh connection, with its timeout.
    pub async fn run_case(&self, case: &Case, scale: Scale) -> CaseResult {
        let started = Instant::now();
        let verdict = self.run_case_inner(case, scale).await;
        CaseResult {
            case: case.name,
            verdict,
            elapsed: started.elapsed(),
        }
    }

    async fn run_case_inner(&self, case: &Case, scale: Scale) -> Verdict {
        let bus = match (self.connect)().await {
            Ok(bus) => bus,
            Err(e) => return Verdict::Failed(format!("connect failed: {e}")),
        };
        if let Some(reason) = (case.needs)(&bus.capabilities()) {
            let _ = bus.close().await;
            return Verdict::Ignored(reason.to_owned());
        }
        let ctx = Ctx::new(bus.clone(), self.connect.clone(), case.name, scale);
        let limit = scale.timeout(case.timeout);
        let result = tokio::time::timeout(limit, (case.run)(ctx)).await;
        let _ = tokio::time::timeout(Duration::from_secs(20), bus.close()).await;
        match result {
            Ok(Ok(outcome)) => Verdict::Passed(outcome),
            Ok(Err(e)) => Verdict::Failed(format!("{e:#}")),
            Err(_) => Verdict::Failed(format!("timed out after {limit:?}")),
        }
    }
}

/// Every case of the suite, in a stable order.
pub fn all_cases() -> Vec<Case> {
    cases::all()
}

/// The two-worker runtime the test binaries run their cases on; exits the binary (status
/// 101, as a failed test run) when it cannot be started.
pub fn test_runtime() -> Arc<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            eprintln!("cannot start a tokio runtime: {e}");
            std::process::exit(101);
        }
    }
}

/// Installs the process's `tracing` subscriber: with `BUSBAR_TEST_LOG` set (a `tracing`
/// filter such as `busbar_amqp=debug,lapin=trace`), logs go to stderr (for chasing a failing
/// case; off by default); with the `otel` feature, the spans of the trace case are captured.
pub fn init_test_log() {
    let _ = capture::install();
}

/// Runs the suite as a libtest-style test binary (`harness = false`) against every harness
/// given (one per server of a matrix, see [`Harness::matrix_from_env`]): honours the usual
/// filter and `--list` / `--ignored` arguments, prints why cases are ignored, and exits with
/// the test status. With several harnesses a case is named `backend@server::module::case`,
/// the server being the version it reported (or its address).
///
/// With `BUSBAR_CONFORMANCE_REPORT=<file>`, one JSON line per case is appended to the file
/// (`backend`, `server`, `url`, `case`, `result`, `seconds`, `note`): what
/// `scripts/compat-table` turns into the README's compatibility table.
pub fn main(harnesses: impl IntoIterator<Item = Harness>) -> ! {
    init_test_log();
    let args = libtest_mimic::Arguments::from_args();
    let runtime = test_runtime();
    let required = Harness::brokers_required();
    let scale = Scale::from_env();
    let report = report::Report::from_env();
    let harnesses: Vec<Harness> = harnesses.into_iter().collect();
    let several = harnesses.len() > 1;
    let mut trials = Vec::new();
    for harness in harnesses {
        let probe = runtime.block_on(harness.probe());
        let server = match &probe {
            Ok(Probe {
                server_version: Some(v),
                ..
            }) => v.clone(),
            _ => report::address(&harness.url),
        };
        let prefix = if several {
            format!("{}@{server}", harness.backend)
        } else {
            harness.backend.to_owned()
        };
        for case in all_cases() {
            let name = format!("{prefix}::{}", case.name);
            let record = report.entry(&harness, &server, case.name);
            let ignored_reason = match &probe {
                Err(why) if !required => Some(why.clone()),
                Ok(p) => (case.needs)(&p.capabilities).map(str::to_owned),
                Err(_) => None,
            };
            if let Some(reason) = ignored_reason {
                eprintln!("IGNORED {name}: {reason}");
                if selected(&args, &name) {
                    record.write("ignored", Duration::ZERO, &reason);
                }
                trials.push(libtest_mimic::Trial::test(name, || Ok(())).with_ignored_flag(true));
                continue;
            }
            let (h, rt, probe_err) = (harness.clone(), runtime.clone(), probe.clone().err());
            trials.push(libtest_mimic::Trial::test(name.clone(), move || {
                if let Some(why) = probe_err {
                    record.write("failed", Duration::ZERO, &why);
                    return Err(format!("BUSBAR_REQUIRE_BROKERS=1 and {why}").into());
                }
                let result = rt.block_on(h.run_case(&case, scale));
                match result.verdict {
                    Verdict::Passed(o) => {
                        let note = format!(
                            "{} duplicate(s){}",
                            o.duplicates,
                            o.note.map(|n| format!("; {n}")).unwrap_or_default()
                        );
                        if o.duplicates > 0 || note.contains(';') {
                            eprintln!("  {name}: {note}");
                        }
                        record.write("passed", result.elapsed, &note);
                        Ok(())
                    }
                    Verdict::Failed(why) => {
                        record.write("failed", result.elapsed, &why);
                        Err(why.into())
                    }
                    Verdict::Ignored(why) => {
                        record.write("failed", result.elapsed, &why);
                        Err(format!(
                            "the capabilities changed between connections; the case now says: {why}"
                        )
                        .into())
                    }
                }
            }));
        }
    }
    let conclusion = libtest_mimic::run(&args, trials);
    containers::remove_all();
    // Some client libraries keep background threads that would block a normal exit.
    let code = if conclusion.has_failed() { 101 } else { 0 };
    std::process::exit(code)
}

/// Whether a libtest run with `args` runs (or reports) the trial `name`.
fn selected(args: &libtest_mimic::Arguments, name: &str) -> bool {
    if args.list || args.skip.iter().any(|s| name.contains(s.as_str())) {
        return false;
    }
    match &args.filter {
        None => true,
        Some(f) if args.exact => name == f,
        Some(f) => name.contains(f.as_str()),
    }
}
