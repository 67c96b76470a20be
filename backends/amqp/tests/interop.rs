//! busbar's events read by pika + the CloudEvents Python SDK's RabbitMQ binding as valid
//! binary-mode CloudEvents, and an event the SDK wrote read by busbar with the same id, type,
//! source, time, data and extensions — on each RabbitMQ of `BUSBAR_AMQP_URL`. The clients live
//! in the venv `scripts/brokers.sh up` installs (`BUSBAR_INTEROP_PYTHON`); without it the tests
//! are IGNORED, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.

use std::process::Stdio;
use std::time::Duration;

use busbar_amqp::AmqpBus;
use busbar_conformance::private_server::{Failed, Server, TestResult};
use busbar_core::{EventBus, Message, PublishOptions, SubscribeOptions};
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/interop/cloudevents_amqp.py"
);

fn python() -> Result<String, Failed> {
    std::env::var("BUSBAR_INTEROP_PYTHON").map_err(|_| "BUSBAR_INTEROP_PYTHON is unset".into())
}

async fn cloudevents_sdk_interop(url: String) -> TestResult {
    let python = python()?;
    let bus = AmqpBus::connect(&url).await?;
    let partitions = bus.config().partitions;
    let topic = format!("interop-{}", &Message::new("").id[..8]);
    // The topic's exchange: `busbar.<topic>` (short names are not shortened).
    let exchange = format!("busbar.{topic}");
    let opts = SubscribeOptions::new("g");
    bus.provision(&topic, &opts).await?;
    let plain_url = url.split('?').next().unwrap_or_default().to_owned();

    let mut reader = Command::new(&python)
        .args([
            SCRIPT,
            "read",
            &plain_url,
            &exchange,
            &partitions.to_string(),
            "2",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = reader.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "the Python reader never got ready")??;
    if ready.as_deref() != Some("ready") {
        return Err(format!("the Python reader said {ready:?}").into());
    }
    let full = Message::new(r#"{"order":42}"#)
        .with_key("ключ-1")
        .with_type("order.created")
        .with_source("/busbar/test")
        .with_content_type("application/json")
        .with_correlation_id("saga 7")
        .with_header("tenant", "acme corp");
    let bare = Message::new("plain bytes");
    for m in [&full, &bare] {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    let mut read = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| "the Python reader printed nothing")??
            .ok_or("the Python reader ended early (an SDK error above?)")?;
        read.push(serde_json::from_str::<serde_json::Value>(&line)?);
    }
    let _ = reader.wait().await;
    read.sort_by_key(|r| r["attributes"]["id"] != full.id.as_str());
    let a = &read[0]["attributes"];
    let want = serde_json::json!({
        "specversion": "1.0", "id": full.id, "type": "order.created", "source": "/busbar/test",
        "datacontenttype": "application/json", "partitionkey": "ключ-1", "correlationid": "saga 7",
    });
    for (name, value) in want.as_object().ok_or("object")? {
        if &a[name] != value {
            return Err(format!("the SDK read {name} = {}, busbar sent {value}", a[name]).into());
        }
    }
    if read[0]["data"] != serde_json::json!({"order": 42})
        || read[0]["headers"]["tenant"] != "acme corp"
    {
        return Err(format!("the SDK read {}", read[0]).into());
    }
    let b = &read[1]["attributes"];
    if b["id"] != bare.id.as_str() || b["type"] != "busbar.message" || b["source"] != "/busbar" {
        return Err(format!("a message without type and source: the SDK read {b}").into());
    }

    let written = Command::new(&python)
        .args([SCRIPT, "write", &plain_url, &exchange, "0"])
        .output()
        .await?;
    if !written.status.success() {
        return Err(format!(
            "the Python writer failed: {}",
            String::from_utf8_lossy(&written.stderr)
        )
        .into());
    }
    let mut sub = bus.subscribe(&topic, opts).await?;
    let mut got = None;
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| "the SDK's event never arrived")??
            .ok_or("the subscription ended")?;
        let done = d.id() == "py-0001";
        if done {
            got = Some(d.message().clone());
        }
        d.ack().await?;
        if done {
            break;
        }
    }
    let m = got.ok_or("the SDK's event never arrived")?;
    let body: serde_json::Value = serde_json::from_slice(&m.payload)?;
    if m.event_type.as_deref() != Some("com.example.order.created")
        || m.source.as_deref() != Some("/python/sdk")
        || m.time.to_rfc3339() != "2026-11-30T12:00:00.500+00:00"
        || m.key.as_deref() != Some("ключ-1")
        || m.correlation_id() != "saga 7"
        || m.content_type.as_deref() != Some("application/json")
        || body != serde_json::json!({"order": 42, "note": "grüße"})
    {
        return Err(format!("busbar read the SDK's event as {m:?}").into());
    }
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

fn main() {
    let urls = std::env::var("BUSBAR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let missing = python().err().map(|_| {
        "no interop clients (BUSBAR_INTEROP_PYTHON); run scripts/brokers.sh up".to_owned()
    });
    let servers: Vec<Server> = urls
        .split_whitespace()
        .enumerate()
        .map(|(i, url)| Server {
            label: format!("server{}", i + 1),
            param: url.to_owned(),
            missing: missing.clone(),
        })
        .collect();
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[("cloudevents_sdk_interop", |url| {
            Box::pin(cloudevents_sdk_interop(url))
        })],
        &[],
    )
}
