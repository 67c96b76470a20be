//! busbar's events read by pika + the CloudEvents Python SDK's RabbitMQ binding as valid
//! binary-mode CloudEvents, and an event the SDK wrote read by busbar with the same id, type,
//! source, time, data and extensions — on each RabbitMQ of `BUSBAR_AMQP_URL`. The clients live
//! in the venv `scripts/brokers.sh up` installs (`BUSBAR_INTEROP_PYTHON`); without it the tests
//! are IGNORED, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.

use std::time::Duration;

use busbar_amqp::AmqpBus;
use busbar_conformance::interop;
use busbar_conformance::private_server::{Server, TestResult};
use busbar_core::{EventBus, PublishOptions, SubscribeOptions};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/interop/cloudevents_amqp.py"
);

async fn cloudevents_sdk_interop(url: String) -> TestResult {
    let python = interop::python().ok_or("BUSBAR_INTEROP_PYTHON is unset")?;
    let bus = AmqpBus::connect(&url).await?;
    let partitions = bus.config().partitions.to_string();
    let topic = interop::fresh_name("interop");
    // The topic's exchange: `busbar.<topic>` (short names are not shortened).
    let exchange = format!("busbar.{topic}");
    let opts = SubscribeOptions::new("g");
    bus.provision(&topic, &opts).await?;
    let plain_url = url.split('?').next().unwrap_or_default().to_owned();

    let reader = interop::Reader::start(
        &python,
        SCRIPT,
        &["read", &plain_url, &exchange, &partitions, "2"],
    )
    .await?;
    let sent = interop::sent();
    for m in &sent {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    // The RabbitMQ binding carries header values as they are.
    interop::check_read(reader.read(2).await?, &sent, "acme corp")?;

    interop::write(&python, SCRIPT, &["write", &plain_url, &exchange, "0"]).await?;
    let mut sub = bus.subscribe(&topic, opts).await?;
    interop::check_received_written(sub.as_mut(), Duration::from_secs(30)).await?;
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

fn main() {
    let urls = std::env::var("BUSBAR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let missing = interop::python().is_none().then(|| {
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
