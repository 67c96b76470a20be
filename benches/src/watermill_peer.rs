//! The watermill peer (Go; watermill 1.5 with watermill-redisstream, watermill-nats's
//! JetStream pub/sub, watermill-kafka over sarama and watermill-amqp): the program under
//! `benches/watermill`, built by `scripts/bench-report` (and CI's smoke run) with the machine's
//! Go, and found through `BUSBAR_WATERMILL_BENCH`. Each measured run starts it once; it times
//! only the workload itself (after its setup and an unmeasured probe) and prints the time, so
//! the Go process's start is not counted.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

/// Where the built program is (set by the scripts that build it).
pub(crate) const BINARY_VAR: &str = "BUSBAR_WATERMILL_BENCH";

/// watermill on one broker.
#[derive(Debug, Clone)]
pub struct WatermillPeer {
    binary: PathBuf,
    backend: &'static str,
    url: String,
}

impl WatermillPeer {
    /// The peer for `url`'s broker, if watermill has a pub/sub for it and the program was
    /// built (`Err` says why not).
    pub fn for_url(url: &str) -> Result<Self> {
        let backend = match url.split("://").next().unwrap_or_default() {
            "redis" => "redis",
            "nats" => "nats",
            "kafka" => "kafka",
            "amqp" => "amqp",
            other => bail!("watermill is not compared on {other}://"),
        };
        let binary = std::env::var_os(BINARY_VAR)
            .map(PathBuf::from)
            .ok_or_else(|| {
                anyhow!("{BINARY_VAR} is not set (scripts/bench-report builds benches/watermill)")
            })?;
        anyhow::ensure!(
            binary.is_file(),
            "{BINARY_VAR}={} is not a file",
            binary.display()
        );
        Ok(Self {
            binary,
            backend,
            url: url.to_owned(),
        })
    }

    /// Runs `workload` (`publish`, `publish_batch100` or `e2e`) on `n` messages; the time it
    /// measured.
    pub async fn run(&self, workload: &str, n: usize) -> Result<Duration> {
        let out = tokio::process::Command::new(&self.binary)
            .args([self.backend, &self.url, workload, &n.to_string()])
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "watermill {} {workload}: {} {}",
                self.backend,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ns: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("elapsed_ns="))
            .ok_or_else(|| anyhow!("watermill printed no elapsed_ns: {stdout:?}"))?
            .trim()
            .parse()
            .context("elapsed_ns")?;
        Ok(Duration::from_nanos(ns))
    }
}
