//! RabbitMQ unreachable mid-stream: every connection of the bus and of its consumers is cut
//! through a TCP proxy in front of each shared server of `BUSBAR_AMQP_URL` (a matrix) and
//! restored 3 s later. Publishes during the outage fail with retryable errors or succeed;
//! every publish that returned Ok is handled afterwards, the consumer reconnecting by itself.
//!
//! Without a reachable RabbitMQ the test is reported ignored, or fails with
//! `BUSBAR_REQUIRE_BROKERS=1`.

#![allow(clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use busbar_amqp::AmqpBus;
use busbar_conformance::private_server::{publish_retrying, Proxy, Recorder, TestResult};
use busbar_core::{EventBus, Message, PublishOptions, SubscribeOptions};

/// The shared servers: every URL of `BUSBAR_AMQP_URL`.
fn urls() -> Vec<String> {
    busbar_conformance::urls_from_env("BUSBAR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

async fn outage_mid_stream_loses_nothing_acked(url: String) -> TestResult {
    let target = url::Url::parse(&url)?;
    let port = target.port().unwrap_or(5672);
    let proxy = Proxy::start(port).await?;
    let mut via = target.clone();
    via.set_port(Some(proxy.port()))
        .map_err(|_| "cannot set the port")?;
    let bus = AmqpBus::connect(via.as_str()).await?;
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let topic = format!("busbar-test-outage-{suffix}");
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared
        .provision(&topic, &SubscribeOptions::new("g"))
        .await?;
    let recorder = Recorder::start(shared, &topic, "g", Duration::from_secs(5));
    let mut acked = Vec::new();
    for i in 0..300 {
        let m = Message::new(format!("before-{i}")).with_key(format!("k{}", i % 10));
        let id = m.id.clone();
        match bus.publish(&topic, m, &PublishOptions::default()).await {
            Ok(()) => acked.push(id),
            Err(e) if e.is_retryable() => {}
            Err(e) => return Err(format!("publish {i}: {e}").into()),
        }
        if i == 150 {
            proxy.cut();
            // A publish while RabbitMQ is unreachable: a retryable error (or Ok once it is
            // back), never a hang and never a silent loss.
            let m = Message::new("during").with_key("k0");
            let id = m.id.clone();
            match tokio::time::timeout(
                Duration::from_secs(20),
                bus.publish(&topic, m, &PublishOptions::default()),
            )
            .await
            {
                Ok(Ok(())) => acked.push(id),
                Ok(Err(e)) if e.is_retryable() => eprintln!("  during the outage: {e}"),
                Ok(Err(e)) => return Err(format!("publish during the outage: {e}").into()),
                Err(_) => return Err("a publish during the outage hung for 20 s".into()),
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            proxy.restore();
        }
    }
    for i in 0..200 {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(&bus, &topic, m, Duration::from_secs(30)).await?;
    }
    recorder
        .expect_all_in_key_order(&acked, Duration::from_secs(60), "outage")
        .await?;
    let _ = bus.close().await;
    Ok(())
}

fn main() {
    let runtime = busbar_conformance::test_runtime();
    let servers: Vec<_> = urls()
        .into_iter()
        .map(|url| {
            let probe = runtime.block_on(async {
                match tokio::time::timeout(Duration::from_secs(20), AmqpBus::connect(&url)).await {
                    Ok(Ok(bus)) => Ok(bus.server_version()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer within 20 s".to_owned()),
                }
            });
            busbar_conformance::private_server::Server {
                label: match &probe {
                    Ok(Some(v)) => v.clone(),
                    _ => busbar_core::raw::redact_url(&url),
                },
                missing: probe
                    .err()
                    .map(|why| format!("no RabbitMQ: {why}; run scripts/brokers.sh up")),
                param: url,
            }
        })
        .collect();
    drop(runtime);
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[("outage_mid_stream_loses_nothing_acked", |url| {
            Box::pin(outage_mid_stream_loses_nothing_acked(url))
        })],
        &[],
    )
}
