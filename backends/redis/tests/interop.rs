//! busbar's stream entries read by redis-py + the CloudEvents Python SDK as valid CloudEvents
//! (busbar's documented layout: one field per attribute under its CloudEvents name, `data`,
//! `h:<name>` headers), and an entry the SDK's event was written as, read by busbar with the
//! same id, type, source, time, key, extension and data — against `BUSBAR_REDIS_URL`. The
//! clients live in the venv `scripts/brokers.sh up` installs (`BUSBAR_INTEROP_PYTHON`); without
//! it the test is IGNORED, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.

use std::time::Duration;

use busbar_conformance::interop;
use busbar_conformance::private_server::{Server, TestResult};
use busbar_core::{EventBus, PublishOptions, SubscribeOptions};
use busbar_redis::{partition_for, RedisBus};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/interop/cloudevents_redis.py"
);

async fn cloudevents_sdk_interop(url: String) -> TestResult {
    let python = interop::python().ok_or("BUSBAR_INTEROP_PYTHON is unset")?;
    let bus = RedisBus::connect(&url).await?;
    let config = bus.config().clone();
    let topic = interop::fresh_name("interop");
    let opts = SubscribeOptions::new("g");
    bus.provision(&topic, &opts).await?;
    let partitions = config.partitions.to_string();

    let reader = interop::Reader::start(
        &python,
        SCRIPT,
        &[
            "read",
            &config.connection_url,
            &config.stream_prefix(&topic),
            &partitions,
            "2",
        ],
    )
    .await?;
    let sent = interop::sent();
    for m in &sent {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    interop::check_read(reader.read(2).await?, &sent, "acme corp")?;

    // Where busbar puts the key, so per-key order holds with busbar's own publishes.
    let stream = config.stream_key(&topic, partition_for("ключ-1", config.partitions));
    interop::write(&python, SCRIPT, &["write", &config.connection_url, &stream]).await?;
    let mut sub = bus.subscribe(&topic, opts).await?;
    interop::check_received_written(sub.as_mut(), Duration::from_secs(30)).await?;
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

fn main() {
    let url =
        std::env::var("BUSBAR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let missing = interop::python().is_none().then(|| {
        "no interop clients (BUSBAR_INTEROP_PYTHON); run scripts/brokers.sh up".to_owned()
    });
    let servers = [Server {
        label: "redis".to_owned(),
        param: url,
        missing,
    }];
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[("cloudevents_sdk_interop", |url| {
            Box::pin(cloudevents_sdk_interop(url))
        })],
        &[],
    )
}
