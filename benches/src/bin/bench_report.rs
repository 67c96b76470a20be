//! `bench-report [CRITERION_DIR] [OUT_MD] [OUT_SVG]`: reads criterion's results, measures
//! publish-to-handler latency on every reachable backend (busbar through its runner, and the
//! raw client's own consumer), and writes BENCHMARKS.md and the
//! chart (plus `docs/benchmarks-notes.md`, the hand-written reading notes, at the end). Run by
//! `scripts/bench-report` after `cargo bench -p busbar-benches`.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use busbar_benches::{latency, raw_latency, report, subjects_for, Subject, BACKENDS};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let criterion = PathBuf::from(args.next().unwrap_or_else(|| "target/criterion".into()));
    let md = PathBuf::from(args.next().unwrap_or_else(|| "BENCHMARKS.md".into()));
    let svg = PathBuf::from(args.next().unwrap_or_else(|| "docs/benchmarks.svg".into()));
    let rows = report::read_criterion(&criterion)?;
    anyhow::ensure!(
        !rows.is_empty(),
        "no criterion results under {}",
        criterion.display()
    );
    let mut latencies = BTreeMap::new();
    for (backend, var, default) in BACKENDS {
        let url = busbar_benches::url_from_env(var, default);
        let subjects = match subjects_for(&url).await {
            Ok(s) => s,
            Err(e) => {
                println!("{backend}: skipped ({e:#})");
                continue;
            }
        };
        let mut row = report::Latencies::default();
        for subject in &subjects {
            let l = match subject {
                Subject::Busbar(bus) => Some(latency(bus, 500, 3000).await?),
                other => raw_latency(other, 500, 3000).await?,
            };
            let Some(l) = l else { continue };
            println!(
                "{backend} {}: latency p50 {} µs, p99 {} µs, p99.9 {} µs",
                subject.label(),
                l.p50_us,
                l.p99_us,
                l.p999_us
            );
            match subject {
                Subject::Busbar(_) => row.busbar = Some(l),
                _ => row.raw = Some(l),
            }
        }
        latencies.insert((*backend).to_owned(), row);
    }
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if let Some(dir) = svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report::chart(&rows, &svg)?;
    let rel = svg
        .strip_prefix(md.parent().unwrap_or(std::path::Path::new("")))
        .unwrap_or(&svg)
        .display()
        .to_string();
    let mut text = report::markdown(&rows, &latencies, &date, &rel);
    // Which server each backend ran against (`scripts/brokers.sh versions`, passed by
    // scripts/bench-report).
    if let Ok(servers) = std::env::var("BUSBAR_BENCH_SERVERS") {
        let list: Vec<String> = servers
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                let (name, _addr, version) = (parts.next()?, parts.next()?, parts.next()?);
                Some(format!("{name} {}", version.trim()))
            })
            .collect();
        if !list.is_empty() {
            text = text.replacen(
                "\n\nEvery figure",
                &format!(
                    "\n\nServers (the first of each `BUSBAR_*_URL`): {}.\n\nEvery figure",
                    list.join(", ")
                ),
                1,
            );
        }
    }
    // Hand-written reading notes (what is unfair or unexplained), kept across regenerations.
    let notes = svg.with_file_name("benchmarks-notes.md");
    if let Ok(extra) = std::fs::read_to_string(&notes) {
        text.push('\n');
        text.push_str(&extra);
    }
    std::fs::write(&md, text)?;
    println!("wrote {} and {}", md.display(), svg.display());
    Ok(())
}
