//! RabbitMQ unreachable mid-stream: every connection of the bus and of its consumers is cut
//! through a TCP proxy in front of the shared server (`BUSBAR_AMQP_URL`'s host:port) and
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

fn url() -> String {
    std::env::var("BUSBAR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn outage_mid_stream_loses_nothing_acked() -> TestResult {
    let target = url::Url::parse(&url())?;
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
        .expect_all(&acked, Duration::from_secs(60), "outage")
        .await?;
    let _ = bus.close().await;
    Ok(())
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let runtime = busbar_conformance::test_runtime();
    let reachable = runtime.block_on(async {
        match tokio::time::timeout(Duration::from_secs(20), AmqpBus::connect(&url())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 20 s".to_owned()),
        }
    });
    let required = busbar_conformance::Harness::brokers_required();
    let rt = runtime.clone();
    let why = reachable.clone().err();
    let trial = libtest_mimic::Trial::test("outage_mid_stream_loses_nothing_acked", move || {
        if let Some(why) = &why {
            return Err(format!("no RabbitMQ: {why}; run scripts/brokers.sh up").into());
        }
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(150),
                outage_mid_stream_loses_nothing_acked(),
            )
            .await
        })
        .map_err(|_| libtest_mimic::Failed::from("timed out after 150 s"))?
    });
    let trial = match &reachable {
        Err(why) if !required => {
            eprintln!("IGNORED outage_mid_stream_loses_nothing_acked: no RabbitMQ ({why}); run scripts/brokers.sh up");
            trial.with_ignored_flag(true)
        }
        _ => trial,
    };
    let conclusion = libtest_mimic::run(&args, vec![trial]);
    std::process::exit(if conclusion.has_failed() { 101 } else { 0 })
}
