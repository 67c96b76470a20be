//! The shared half of the interop tests (`backends/*/tests`): busbar's events read, and an event
//! written, by clients no one at busbar wrote — the scripts under `scripts/interop/`, run with
//! the Python of the venv `scripts/brokers.sh up` installs (`BUSBAR_INTEROP_PYTHON`).

use std::process::Stdio;
use std::time::Duration;

use busbar_core::Message;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::private_server::{Failed, TestResult};

/// `BUSBAR_INTEROP_PYTHON`, when it exists.
pub fn python() -> Option<String> {
    std::env::var("BUSBAR_INTEROP_PYTHON")
        .ok()
        .filter(|p| std::path::Path::new(p).exists())
}

/// A name no earlier run used: `prefix-` and 12 random hex digits. (The first digits of a
/// message id are its time: two runs within a minute shared a topic and read each other's
/// events.)
pub fn fresh_name(prefix: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &random[..12])
}

/// The two events busbar publishes: every attribute set (a non-ASCII key, an extension, a
/// header with a space), and one with none (the wire must still be a valid CloudEvent).
pub fn sent() -> [Message; 2] {
    [
        Message::new(r#"{"order":42}"#)
            .with_key("ключ-1")
            .with_type("order.created")
            .with_source("/busbar/test")
            .with_content_type("application/json")
            .with_correlation_id("saga 7")
            .with_header("tenant", "acme corp"),
        Message::new("plain bytes"),
    ]
}

/// A script's `read` mode, started: it said "ready".
#[derive(Debug)]
pub struct Reader {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Reader {
    /// Runs `python script args…` and waits for its "ready".
    pub async fn start(python: &str, script: &str, args: &[&str]) -> Result<Self, Failed> {
        let mut child = Command::new(python)
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| "the Python reader never got ready")??;
        if ready.as_deref() != Some("ready") {
            return Err(format!("the Python reader said {ready:?}").into());
        }
        Ok(Self { child, lines })
    }

    /// The next `n` JSON lines the script printed, one per event.
    pub async fn read(mut self, n: usize) -> Result<Vec<serde_json::Value>, Failed> {
        let mut read = Vec::new();
        for _ in 0..n {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .map_err(|_| "the Python reader printed nothing")??
                .ok_or("the Python reader ended early (an SDK error above?)")?;
            read.push(serde_json::from_str::<serde_json::Value>(&line)?);
        }
        let _ = self.child.wait().await;
        Ok(read)
    }
}

/// What the SDK read of the [`sent`] events matches what busbar sent; the header `tenant` reads
/// `tenant_on_wire` (its value as the binding carries it).
pub fn check_read(
    mut read: Vec<serde_json::Value>,
    [full, bare]: &[Message; 2],
    tenant_on_wire: &str,
) -> TestResult {
    read.sort_by_key(|r| r["attributes"]["id"] != full.id.as_str());
    let want = serde_json::json!({
        "specversion": "1.0", "id": full.id, "type": "order.created", "source": "/busbar/test",
        "datacontenttype": "application/json", "partitionkey": "ключ-1", "correlationid": "saga 7",
    });
    let a = &read[0]["attributes"];
    for (name, value) in want.as_object().ok_or("object")? {
        if &a[name] != value {
            return Err(format!("the SDK read {name} = {}, busbar sent {value}", a[name]).into());
        }
    }
    if read[0]["data"] != serde_json::json!({"order": 42})
        || read[0]["headers"]["tenant"] != tenant_on_wire
    {
        return Err(format!("the SDK read {}", read[0]).into());
    }
    let b = &read[1]["attributes"];
    if b["id"] != bare.id.as_str() || b["type"] != "busbar.message" || b["source"] != "/busbar" {
        return Err(format!("a message without type and source: the SDK read {b}").into());
    }
    Ok(())
}

/// Runs a script's `write` mode.
pub async fn write(python: &str, script: &str, args: &[&str]) -> TestResult {
    let written = Command::new(python).arg(script).args(args).output().await?;
    if !written.status.success() {
        return Err(format!(
            "the Python writer failed: {}",
            String::from_utf8_lossy(&written.stderr)
        )
        .into());
    }
    Ok(())
}

/// The id of the event the scripts' `write` mode sends.
pub const WRITTEN_ID: &str = "py-0001";

/// Reads `sub` (acking what it reads, at most 3 deliveries, each within `wait`) until the event
/// the scripts' `write` mode sent arrives, and checks it with [`check_written`].
pub async fn check_received_written(
    sub: &mut dyn busbar_core::Subscriber,
    wait: Duration,
) -> TestResult {
    let mut got = None;
    for _ in 0..3 {
        let d = tokio::time::timeout(wait, sub.next())
            .await
            .map_err(|_| "the SDK's event never arrived")??
            .ok_or("the subscription ended")?;
        let done = d.id() == WRITTEN_ID;
        if done {
            got = Some(d.message().clone());
        }
        d.ack().await?;
        if done {
            break;
        }
    }
    check_written(&got.ok_or("the SDK's event never arrived")?)
}

/// busbar read the event the SDK wrote with its id, type, source, time, key, extension, content
/// type and data.
pub fn check_written(m: &Message) -> TestResult {
    let body: serde_json::Value = serde_json::from_slice(&m.payload)?;
    if m.id != WRITTEN_ID
        || m.event_type.as_deref() != Some("com.example.order.created")
        || m.source.as_deref() != Some("/python/sdk")
        || m.time.to_rfc3339() != "2026-11-30T12:00:00.500+00:00"
        || m.key.as_deref() != Some("ключ-1")
        || m.correlation_id() != "saga 7"
        || m.content_type.as_deref() != Some("application/json")
        || body != serde_json::json!({"order": 42, "note": "grüße"})
    {
        return Err(format!("busbar read the SDK's event as {m:?}").into());
    }
    Ok(())
}
