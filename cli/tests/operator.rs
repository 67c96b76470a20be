//! The operator's commands end to end, as separate processes against every broker of
//! `BUSBAR_*_URL` (the first server of each list): `busbar tail --json` follows a topic while
//! `busbar publish` sends to it (ids, order, key, type, headers, data as published), and
//! `busbar lag` counts what the group has not received. A backend whose URL is unset, or whose
//! feature this build lacks, is IGNORED (FAILED with `BUSBAR_REQUIRE_BROKERS=1`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use busbar_conformance::interop::fresh_name;
use busbar_conformance::private_server::{Server, TestResult};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BUSBAR: &str = env!("CARGO_BIN_EXE_busbar");

async fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(BUSBAR)
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "busbar {args:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `busbar lag` until it says `want` (brokers count lag asynchronously) or 30 s pass.
async fn lag_reaches(url: &str, topic: &str, group: &str, want: u64) -> TestResult {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(&["lag", url, topic, group, "--json"]).await?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        if v["lag"] == want {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("busbar lag said {v}, expected {want}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn publish_tail_and_lag(url: String) -> TestResult {
    let topic = fresh_name("cli");
    let mut tail = Command::new(BUSBAR)
        .args([
            "tail", &url, &topic, "--group", "ops", "--json", "--count", "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut err = BufReader::new(tail.stderr.take().ok_or("no stderr")?).lines();
    let said = tokio::time::timeout(Duration::from_secs(60), err.next_line())
        .await
        .map_err(|_| "busbar tail never started")??
        .unwrap_or_default();
    if !said.starts_with("tailing") {
        return Err(format!("busbar tail said {said:?}").into());
    }
    let ids = run(&[
        "publish",
        &url,
        &topic,
        "order {seq}",
        "--count",
        "3",
        "--key",
        "k1",
        "--type",
        "order.created",
        "--header",
        "tenant=acme",
    ])
    .await?;
    let ids: Vec<&str> = ids.lines().collect();
    if ids.len() != 3 {
        return Err(format!("busbar publish printed {ids:?}").into());
    }
    let mut out = BufReader::new(tail.stdout.take().ok_or("no stdout")?).lines();
    for (i, id) in ids.iter().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
            .await
            .map_err(|_| format!("busbar tail showed {i} of 3"))??
            .ok_or("busbar tail ended early")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let want = serde_json::json!({
            "id": id, "key": "k1", "type": "order.created", "data": format!("order {}", i + 1),
            "topic": topic,
        });
        for (name, value) in want.as_object().ok_or("object")? {
            if &v[name] != value {
                return Err(
                    format!("event {i}: {name} is {}, expected {value} ({v})", v[name]).into(),
                );
            }
        }
        if v["headers"]["tenant"] != "acme" {
            return Err(format!("event {i} lost its header: {v}").into());
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), tail.wait())
        .await
        .map_err(|_| "busbar tail did not stop after --count 3")??;
    if !status.success() {
        return Err(format!("busbar tail exited with {status}").into());
    }
    lag_reaches(&url, &topic, "ops", 0).await?;
    run(&["publish", &url, &topic, "more", "--count", "4", "-q"]).await?;
    lag_reaches(&url, &topic, "ops", 4).await?;
    Ok(())
}

fn main() {
    let backends = [
        ("redis", "BUSBAR_REDIS_URL", cfg!(feature = "redis")),
        ("nats", "BUSBAR_NATS_URL", cfg!(feature = "nats")),
        ("amqp", "BUSBAR_AMQP_URL", cfg!(feature = "amqp")),
        ("kafka", "BUSBAR_KAFKA_URL", cfg!(feature = "kafka")),
        ("sqs", "BUSBAR_SQS_URL", cfg!(feature = "sqs")),
    ];
    let mut servers = Vec::new();
    for (label, var, built) in backends {
        if !built {
            // Not a missing broker: this build cannot speak to it (cargo test --all-features can).
            eprintln!("skipping {label}: busbar-cli was built without its {label} feature");
            continue;
        }
        let url = std::env::var(var)
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned));
        servers.push(Server {
            label: label.to_owned(),
            missing: url.is_none().then(|| {
                format!("{var} is unset; run scripts/brokers.sh up and eval \"$(scripts/brokers.sh env)\"")
            }),
            param: url.unwrap_or_default(),
        });
    }
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[("publish_tail_and_lag", |url| {
            Box::pin(publish_tail_and_lag(url))
        })],
        &[],
    )
}
