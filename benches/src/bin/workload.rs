//! `workload URL SUBJECT WORKLOAD [N] [REPEAT]`: runs one workload on one side, for profiling
//! (`perf record -g target/release/workload nats://127.0.0.1:4222 busbar e2e 100000`).
//! SUBJECT is `busbar`, `raw` or a peer; WORKLOAD one of `busbar_benches::WORKLOADS`.
#![allow(clippy::print_stdout)]

use anyhow::{anyhow, Context};
use busbar_benches::{rate, run_workload, subjects_for};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, who, workload, rest @ ..] = args.as_slice() else {
        return Err(anyhow!("usage: workload URL SUBJECT WORKLOAD [N] [REPEAT]"));
    };
    let n: usize = rest
        .first()
        .map_or(Ok(20_000), |v| v.parse())
        .context("N")?;
    let repeat: usize = rest.get(1).map_or(Ok(1), |v| v.parse()).context("REPEAT")?;
    let subject = subjects_for(url)
        .await?
        .into_iter()
        .find(|s| s.label() == who)
        .ok_or_else(|| anyhow!("no subject {who} for {url}"))?;
    for _ in 0..repeat {
        let elapsed = run_workload(&subject, workload, n)
            .await?
            .ok_or_else(|| anyhow!("{who} has no workload {workload}"))?;
        println!(
            "{who} {workload} {n}: {elapsed:?}, {:.0} msgs/s",
            rate(n, elapsed)
        );
    }
    Ok(())
}
