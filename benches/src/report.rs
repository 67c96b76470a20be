//! Turns criterion's saved estimates and measured latencies into BENCHMARKS.md and an SVG
//! chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::Latency;

/// One measured throughput: `backend/workload`, subject, messages per second.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// e.g. `memory`.
    pub backend: String,
    /// `publish`, `publish_batch100` or `e2e`.
    pub workload: String,
    /// `busbar`, `raw` or a peer (see [`PEERS`]).
    pub subject: String,
    /// Mean messages per second.
    pub msgs_per_s: f64,
}

/// The peer crates compared, in column order.
pub const PEERS: [&str; 3] = ["omniqueue", "ruststream", "watermill"];

/// Reads every `<group>/<function>/new/{benchmark,estimates}.json` under criterion's output
/// directory (normally `target/criterion`).
pub fn read_criterion(dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for group in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let group = group?.path();
        if !group.is_dir() {
            continue;
        }
        for function in std::fs::read_dir(&group)? {
            let new = function?.path().join("new");
            let (Ok(bench), Ok(est)) = (
                std::fs::read_to_string(new.join("benchmark.json")),
                std::fs::read_to_string(new.join("estimates.json")),
            ) else {
                continue;
            };
            let bench: serde_json::Value = serde_json::from_str(&bench)?;
            let est: serde_json::Value = serde_json::from_str(&est)?;
            let group_id = bench["group_id"].as_str().unwrap_or_default();
            let Some((backend, workload)) = group_id.split_once('/') else {
                continue;
            };
            let elements = bench["throughput"]["Elements"].as_f64().unwrap_or(0.0);
            let mean_ns = est["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
            if elements <= 0.0 || mean_ns <= 0.0 {
                continue;
            }
            rows.push(Row {
                backend: backend.to_owned(),
                workload: workload.to_owned(),
                subject: bench["function_id"].as_str().unwrap_or_default().to_owned(),
                msgs_per_s: elements / (mean_ns / 1e9),
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.backend, &a.workload, &a.subject).cmp(&(&b.backend, &b.workload, &b.subject))
    });
    Ok(rows)
}

fn fmt_rate(r: Option<f64>) -> String {
    match r {
        None => "–".into(),
        Some(r) if r >= 1e6 => format!("{:.2} M", r / 1e6),
        Some(r) if r >= 1e3 => format!("{:.1} k", r / 1e3),
        Some(r) => format!("{r:.0}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

/// Facts about the machine, for the report header.
pub fn machine_info() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or("?".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let rustc = std::process::Command::new("rustc")
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} RAM; {rustc}; brokers and benchmark on the same machine, loopback")
}

/// The latencies measured on one backend: busbar through its runner, and the raw client.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latencies {
    /// busbar, publish to handler through the consumer runner.
    pub busbar: Option<Latency>,
    /// The raw client, publish to its own consumer.
    pub raw: Option<Latency>,
}

/// Writes the markdown report.
pub fn markdown(
    rows: &[Row],
    latencies: &BTreeMap<String, Latencies>,
    date: &str,
    chart: &str,
) -> String {
    let mut by: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.backend != OUTBOX) {
        by.entry((r.backend.clone(), r.workload.clone()))
            .or_default()
            .insert(r.subject.clone(), r.msgs_per_s);
    }
    let mut out = String::new();
    let _ = writeln!(out, "# busbar benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `scripts/bench-report` on {date}. Machine: {}.\n\nEvery figure is from one run \
         on a shared 2-core machine where the broker competes with the benchmark for the cores: \
         compare the ratios measured side by side, not the absolute numbers. 100-byte payloads, \
         fresh topic per run, consumer attached before publishing, criterion's warm-up discarded. \
         `e2e` publishes N messages over 64 keys (batches of 100) and consumes + acks them: \
         busbar through its consumer runner (concurrency 16, per-key order kept, every message \
         acked: Redis XACK coalesced per partition, NATS confirmed double ack, Kafka offsets \
         committed periodically, RabbitMQ basic.ack, SQS batched deletes), raw = the client crate \
         with its best settings (Redis: XREADGROUP COUNT 100 and one XACK per read; NATS: pull \
         consumer, one ack per message), omniqueue = its own \
         consumer, one ack per message; ruststream = an app with one `#[subscriber]` on 16 lanes \
         keyed by the partition key (`workers(16, by_key)`), its publisher in rounds of 100 \
         concurrent publishes; watermill = the Go library's pub/sub for the broker \
         (redisstream, the JetStream pub/sub of watermill-nats, watermill-kafka over sarama, \
         watermill-amqp with publisher confirms), its subscription's messages acked as they \
         come, `Publish` with 100 messages per call for batches. `publish_concurrent16`: 16 \
         tasks (goroutines) each awaiting its own publishes, one message at a time. \
         `e2e_batches100`: `e2e` through busbar's batch handler API (`Consumer::run_batches`, \
         up to 100 events per call, at most one per key).\n",
        machine_info()
    );
    let _ = writeln!(out, "![msgs/s per backend]({chart})\n");
    let _ = writeln!(out, "## Throughput (messages/s, mean)\n");
    let mut header = String::from("| backend | workload | busbar | raw client |");
    let mut rule = String::from("|---|---|---|---|");
    for peer in PEERS {
        let _ = write!(header, " {peer} |");
        rule.push_str("---|");
    }
    header.push_str(" busbar/raw |");
    rule.push_str("---|");
    for peer in PEERS {
        let _ = write!(header, " busbar/{peer} |");
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for ((backend, workload), m) in &by {
        let (b, r) = (m.get("busbar").copied(), m.get("raw").copied());
        let mut line = format!(
            "| {backend} | {workload} | {} | {} |",
            fmt_rate(b),
            fmt_rate(r)
        );
        for peer in PEERS {
            let _ = write!(line, " {} |", fmt_rate(m.get(peer).copied()));
        }
        let _ = write!(line, " {} |", ratio(b, r));
        for peer in PEERS {
            let _ = write!(line, " {} |", ratio(b, m.get(peer).copied()));
        }
        let _ = writeln!(out, "{line}");
    }
    if !latencies.is_empty() {
        let _ = writeln!(
            out,
            "\n## Latency at 500 msgs/s, publish to handler (µs)\n\nbusbar: through the consumer \
             runner; raw: the raw client's own consumer (as in `e2e`). One message at a time, \
             3,000 messages after an unmeasured probe.\n"
        );
        let _ = writeln!(
            out,
            "| backend | busbar p50 | busbar p99 | busbar p99.9 | raw p50 | raw p99 | raw p99.9 | busbar p99 − raw p99 | messages |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        let us = |l: Option<Latency>, f: fn(&Latency) -> u64| {
            l.map_or("–".to_owned(), |l| f(&l).to_string())
        };
        for (backend, l) in latencies {
            let gap = match (l.busbar, l.raw) {
                (Some(b), Some(r)) => format!("{:+}", b.p99_us as i64 - r.p99_us as i64),
                _ => "–".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {backend} | {} | {} | {} | {} | {} | {} | {gap} | {} |",
                us(l.busbar, |l| l.p50_us),
                us(l.busbar, |l| l.p99_us),
                us(l.busbar, |l| l.p999_us),
                us(l.raw, |l| l.p50_us),
                us(l.raw, |l| l.p99_us),
                us(l.raw, |l| l.p999_us),
                l.busbar.map_or(0, |l| l.count),
            );
        }
    }
    // `outbox/<bus>/<n>_relay[s]`: rows/s drained from PostgreSQL.
    let outbox: Vec<&Row> = rows.iter().filter(|r| r.backend == OUTBOX).collect();
    if !outbox.is_empty() {
        let _ = writeln!(
            out,
            "\n## Outbox relay (rows/s drained from PostgreSQL into the bus, mean)\n"
        );
        let _ = writeln!(out, "| into | relays | rows/s |");
        let _ = writeln!(out, "|---|---|---|");
        for r in outbox {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                r.workload,
                r.subject.replace('_', " "),
                fmt_rate(Some(r.msgs_per_s))
            );
        }
    }
    out
}

/// The criterion group prefix of the outbox relay benches (reported in a table of their own).
pub const OUTBOX: &str = "outbox";

/// Draws grouped bars (log scale) of messages/s per backend and workload.
pub fn chart(rows: &[Row], path: &Path) -> Result<()> {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.backend != OUTBOX).collect();
    let mut groups: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.backend.clone(), r.workload.clone()))
        .collect();
    groups.dedup();
    let subjects = ["busbar", "raw", PEERS[0], PEERS[1], PEERS[2]];
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    let bar = 0.8 / subjects.len() as f64;
    let max = rows.iter().map(|r| r.msgs_per_s).fold(10.0, f64::max);
    let width = (160 * groups.len().max(1)) as u32 + 120;
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = groups.iter().map(|(b, w)| format!("{b}/{w}")).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "busbar vs raw client vs peers (msgs/s, log scale)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..groups.len() as f64, (10f64..max * 3.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("messages per second")
        .draw()?;
    for (j, subject) in subjects.iter().enumerate() {
        let color = colors[j];
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(i, (b, w))| {
                rows.iter()
                    .find(|r| &r.backend == b && &r.workload == w && r.subject == *subject)
                    .map(|r| {
                        let x0 = i as f64 + 0.1 + j as f64 * bar;
                        Rectangle::new(
                            [(x0, 10.0), (x0 + bar * 0.9, r.msgs_per_s.max(10.0))],
                            color.filled(),
                        )
                    })
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(*subject)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(backend: &str, workload: &str, subject: &str, rate: f64) -> Row {
        Row {
            backend: backend.into(),
            workload: workload.into(),
            subject: subject.into(),
            msgs_per_s: rate,
        }
    }

    #[test]
    fn outbox_rows_get_their_own_table() {
        let rows = vec![
            row("redis", "e2e", "busbar", 40_000.0),
            row("redis", "e2e", "raw", 80_000.0),
            row("redis", "e2e", "ruststream", 20_000.0),
            row("outbox", "memory", "2_relays", 47_200.0),
        ];
        let md = markdown(&rows, &BTreeMap::new(), "today", "chart.svg");
        assert!(
            md.contains("| redis | e2e | 40.0 k | 80.0 k | – | 20.0 k | – | 0.50 | – | 2.00 | – |"),
            "{md}"
        );
        assert!(md.contains("| memory | 2 relays | 47.2 k |"), "{md}");
        assert!(!md.contains("| outbox |"), "{md}");
    }
}
