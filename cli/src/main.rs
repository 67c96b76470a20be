//! `busbar`: the command line of the busbar event bus.
//!
//! `busbar check [URL]` runs the conformance suite against a live broker (default
//! `memory://`) and prints a pass/fail/ignored table, then `N passed, M failed, K ignored`.
//! `busbar publish`, `tail` and `lag` are the operator's tools (see `--help` of each).
#![allow(clippy::print_stdout)]

mod ops;
#[cfg(feature = "sse")]
mod sse;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_conformance::{Harness, Scale, Verdict};
use clap::{Parser, Subcommand};
use futures::StreamExt;

#[derive(Parser)]
#[command(
    name = "busbar",
    version,
    about = "One event-bus API over many brokers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the conformance suite against a broker and prints a table of the cases.
    #[command(after_help = "Examples:
  busbar check                                   # the embedded in-memory bus
  busbar check redis://127.0.0.1:6379 --filter ordering
  busbar check kafka://127.0.0.1:9092 --json > report.jsonl

Exit status: 0 no case failed, 1 a case failed or the broker did not answer, 2 bad usage.")]
    Check {
        /// Broker URL: memory://, redis://, kafka://, nats://, amqp://, sqs:// (each broker
        /// needs its cargo feature: --features redis, ..., or all-backends).
        #[arg(default_value = "memory://")]
        url: String,
        /// Only run cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// How many cases run at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Message-count multiplier (as BUSBAR_CONFORMANCE_SCALE).
        #[arg(long)]
        scale: Option<f64>,
        /// One JSON object per case (`case`, `result`, `seconds`, `note`), then one with the
        /// totals, instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Lists the conformance cases with what each proves.
    #[command(after_help = "Example:
  busbar cases | grep ordering")]
    Cases,
    /// Publishes messages: a payload, a file, or one per line of stdin; --count/--rate for load.
    Publish(ops::PublishArgs),
    /// Follows a topic: prints its events as they arrive (pretty, or --json lines).
    Tail(ops::TailArgs),
    /// Prints an event chain (correlation id) as a tree, dead letters included.
    Trace(ops::TraceArgs),
    /// Dead letters: list, show, redrive, purge.
    #[command(subcommand)]
    Dlq(ops::Dlq),
    /// Prints how many messages a consumer group has not received yet.
    #[command(after_help = "Examples:
  busbar lag redis://127.0.0.1:6379 orders billing
  busbar lag kafka://127.0.0.1:9092 orders billing --json

What each broker counts is in its README (capability consumer_lag).
Exit status: 0 printed, 1 an error (broker, unknown capability), 2 bad usage.")]
    Lag {
        /// Broker URL.
        url: String,
        /// Topic.
        topic: String,
        /// Consumer group.
        group: String,
        /// {"topic","group","lag"} instead of the bare number.
        #[arg(long)]
        json: bool,
    },
    /// Quick throughput and latency run: busbar vs the raw client and peer crates on one
    /// broker, printed as a table with the ratios busbar/raw and busbar/peer.
    #[command(
        after_help = "Examples (feature bench: cargo run --release -p busbar-cli --features bench -- bench URL):
  busbar bench redis://127.0.0.1:6379
  busbar bench nats://127.0.0.1:4222 --messages 20000 --rate 1000

Exit status: 0 done, 1 an error."
    )]
    #[command(hide = true)]
    Worker(ops::WorkerArgs),
    Bench {
        /// Broker URL (default memory://).
        #[arg(default_value = "memory://")]
        url: String,
        /// Messages per throughput workload.
        #[arg(long, default_value_t = 5000)]
        messages: usize,
        /// Messages per second of the latency workload.
        #[arg(long, default_value_t = 500)]
        rate: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("busbar: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match cli.command {
        Command::Cases => {
            for c in busbar_conformance::all_cases() {
                println!("{:<55} {}", c.name, c.doc);
            }
            ExitCode::SUCCESS
        }
        Command::Check {
            url,
            filter,
            jobs,
            scale,
            json,
        } => runtime.block_on(check(url, filter, jobs.max(1), scale, json)),
        Command::Publish(args) => report("publish", runtime.block_on(ops::publish(args))),
        Command::Tail(args) => report("tail", runtime.block_on(ops::tail(args))),
        Command::Trace(args) => report("trace", runtime.block_on(ops::trace(args))),
        Command::Dlq(command) => report("dlq", runtime.block_on(ops::dlq(command))),
        Command::Lag {
            url,
            topic,
            group,
            json,
        } => report(
            "lag",
            runtime.block_on(ops::lag(&url, &topic, &group, json)),
        ),
        Command::Worker(args) => report("worker", runtime.block_on(ops::worker(args))),
        Command::Bench {
            url,
            messages,
            rate,
        } => match runtime.block_on(bench(&url, messages.max(100), rate.max(1))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("busbar bench: {e:#}");
                ExitCode::FAILURE
            }
        },
    };
    // Broker clients may keep background threads alive; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

/// Exit status 0, or 1 with the error on stderr.
fn report(command: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("busbar {command}: {e:#}");
            if e.downcast_ref::<ops::Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `memory://` gives a private bus per connection; the suite needs its connections to share
/// one, so an unnamed memory URL becomes a uniquely named one.
fn shared_url(url: &str) -> String {
    match url.strip_prefix("memory://") {
        Some(rest) if rest.is_empty() || rest.starts_with('?') => {
            format!(
                "memory://busbar-check-{}{rest}",
                uuid::Uuid::new_v4().simple()
            )
        }
        _ => url.to_owned(),
    }
}

async fn check(
    url: String,
    filter: Option<String>,
    jobs: usize,
    scale: Option<f64>,
    json: bool,
) -> ExitCode {
    let url = shared_url(&url);
    let shown = busbar_core::raw::redact_url(&url);
    let backend = url.split("://").next().unwrap_or("?").to_owned();
    let u = url.clone();
    let harness = Harness {
        backend: "check",
        url: url.clone(),
        start_hint: "scripts/brokers.sh up",
        connect: Arc::new(move || {
            let u = u.clone();
            Box::pin(async move { busbar::connect(&u).await })
        }),
    };
    if let Err(why) = harness.probe().await {
        eprintln!("busbar check: {why}");
        if json {
            println!(
                "{}",
                serde_json::json!({"passed": 0, "failed": 1, "ignored": 0, "error": why.to_string()})
            );
        } else {
            println!("0 passed, 1 failed, 0 ignored");
        }
        return ExitCode::FAILURE;
    }
    let scale = scale.map(Scale::new).unwrap_or_else(Scale::from_env);
    let cases: Vec<_> = busbar_conformance::all_cases()
        .into_iter()
        .filter(|c| filter.as_deref().is_none_or(|f| c.name.contains(f)))
        .collect();
    // Lines go to stdout around a progress bar on stderr (drawn only on a terminal).
    let bar = indicatif::ProgressBar::new(cases.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cases [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let say = |line: String| bar.suspend(|| println!("{line}"));
    if !json {
        say(format!(
            "busbar check {shown} ({backend}): {} cases\n",
            cases.len()
        ));
        say(format!(
            "{:<52} {:<8} {:>9}  notes",
            "case", "result", "time"
        ));
        say("-".repeat(100));
    }
    let started = Instant::now();
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let h = &harness;
    let mut results = futures::stream::iter(
        cases
            .iter()
            .map(|c| async move { h.run_case(c, scale).await }),
    )
    .buffered(jobs);
    while let Some(r) = results.next().await {
        let (word, note) = match r.verdict {
            Verdict::Passed(o) => {
                passed += 1;
                let mut note = String::new();
                if o.duplicates > 0 {
                    note.push_str(&format!("{} duplicate(s)", o.duplicates));
                }
                if let Some(n) = o.note {
                    if !note.is_empty() {
                        note.push_str("; ");
                    }
                    note.push_str(&n);
                }
                ("pass", note)
            }
            Verdict::Failed(why) => {
                failed += 1;
                ("FAIL", why.replace('\n', " "))
            }
            Verdict::Ignored(why) => {
                ignored += 1;
                ("ignored", why)
            }
        };
        bar.inc(1);
        if json {
            let result = match word {
                "pass" => "passed",
                "FAIL" => "failed",
                other => other,
            };
            say(serde_json::json!({
                "case": r.case, "result": result, "seconds": r.elapsed.as_secs_f64(), "note": note,
            })
            .to_string());
        } else {
            say(format!(
                "{:<52} {:<8} {:>8.2}s  {}",
                r.case,
                word,
                r.elapsed.as_secs_f64(),
                note
            ));
        }
    }
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "url": shown, "passed": passed, "failed": failed, "ignored": ignored,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!("{}", "-".repeat(100));
        println!("total time {:.1}s", started.elapsed().as_secs_f64());
        println!("{passed} passed, {failed} failed, {ignored} ignored");
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(not(feature = "bench"))]
async fn bench(_url: &str, _n: usize, _rate: u32) -> anyhow::Result<()> {
    anyhow::bail!(
        "this busbar was built without its `bench` feature (it pulls the raw clients and peer \
         crates): cargo run --release -p busbar-cli --features bench -- bench URL"
    )
}

#[cfg(feature = "bench")]
async fn bench(url: &str, n: usize, rate: u32) -> anyhow::Result<()> {
    use busbar_benches::{latency, rate as per_second, run_workload, subjects_for, Subject};
    let subjects = subjects_for(url).await?;
    let workloads = busbar_benches::WORKLOADS;
    let bar = indicatif::ProgressBar::new((subjects.len() * workloads.len() + 1) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut table: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for w in workloads {
        let mut row = Vec::new();
        for s in &subjects {
            bar.set_message(format!("{w} / {}", s.label()));
            bar.inc(1);
            if !s.runs(w) {
                continue;
            }
            // A discarded warm-up round, then the measured one.
            let mut elapsed = None;
            for _ in 0..2 {
                elapsed = run_workload(s, w, n).await?;
            }
            if let Some(elapsed) = elapsed {
                row.push((s.label().to_owned(), per_second(n, elapsed)));
            }
        }
        table.push((w.to_owned(), row));
    }
    bar.set_message("latency");
    let lat = match subjects.first() {
        Some(Subject::Busbar(bus)) => Some(latency(bus, rate, (rate as usize) * 4).await?),
        _ => None,
    };
    bar.finish_and_clear();
    let get = |row: &[(String, f64)], who: &str| row.iter().find(|(l, _)| l == who).map(|x| x.1);
    println!(
        "busbar bench {} ({n} messages of 100 bytes per workload)\n",
        busbar_core::raw::redact_url(url)
    );
    // Only the peers that support this broker get columns.
    let peers: Vec<&str> = busbar_benches::report::PEERS
        .into_iter()
        .filter(|p| table.iter().any(|(_, row)| get(row, p).is_some()))
        .collect();
    let mut header = format!(
        "{:<22} {:>14} {:>14}",
        "workload", "busbar msg/s", "raw msg/s"
    );
    for p in &peers {
        header.push_str(&format!(" {p:>14}"));
    }
    header.push_str(&format!(" {:>11}", "busbar/raw"));
    for p in &peers {
        header.push_str(&format!(" {:>18}", format!("busbar/{p}")));
    }
    println!("{header}");
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let q = |a: Option<f64>, c: Option<f64>| match (a, c) {
        (Some(a), Some(c)) if c > 0.0 => format!("{:.2}", a / c),
        _ => "-".to_owned(),
    };
    for (w, row) in &table {
        let b = get(row, "busbar");
        let r = get(row, "raw");
        let mut line = format!("{w:<22} {:>14} {:>14}", f(b), f(r));
        for p in &peers {
            line.push_str(&format!(" {:>14}", f(get(row, p))));
        }
        line.push_str(&format!(" {:>11}", q(b, r)));
        for p in &peers {
            line.push_str(&format!(" {:>18}", q(b, get(row, p))));
        }
        println!("{line}");
    }
    if let Some(l) = lat {
        println!(
            "\nlatency publish -> handler at {rate}/s: p50 {} us, p99 {} us, p99.9 {} us ({} messages)",
            l.p50_us, l.p99_us, l.p999_us, l.count
        );
    }
    println!("\nOne run on this machine; compare ratios, not absolute numbers.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shared_url;

    #[test]
    fn unnamed_memory_urls_become_shared() {
        let u = shared_url("memory://");
        assert!(u.starts_with("memory://busbar-check-"), "{u}");
        let u = shared_url("memory://?retention=5");
        assert!(u.ends_with("?retention=5"), "{u}");
        assert_eq!(shared_url("memory://mine"), "memory://mine");
        assert_eq!(shared_url("redis://h"), "redis://h");
    }
}
