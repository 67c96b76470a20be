//! busbar's events read by boto3 + the CloudEvents Python SDK as valid CloudEvents in the SNS
//! binding draft's binary mode (`ce_` message attributes), and an event the SDK made, published
//! to the SNS topic by boto3, read by busbar with the same id, type, source, time, data and
//! extensions — in FIFO and standard mode, against `BUSBAR_SQS_URL`. The clients live in the
//! venv `scripts/brokers.sh up` installs (`BUSBAR_INTEROP_PYTHON`); without it the tests are
//! IGNORED, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.

use std::time::Duration;

use busbar_conformance::interop;
use busbar_conformance::private_server::{Server, TestResult};
use busbar_core::{EventBus, PublishOptions, SubscribeOptions};
use busbar_sqs::SqsBus;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/interop/cloudevents_sqs.py"
);

async fn cloudevents_sdk_interop(url: String) -> TestResult {
    let python = interop::python().ok_or("BUSBAR_INTEROP_PYTHON is unset")?;
    let bus = SqsBus::connect(&url).await?;
    let endpoint = bus
        .config()
        .endpoint
        .clone()
        .ok_or("BUSBAR_SQS_URL names no endpoint")?;
    let topic = interop::fresh_name("interop");
    let opts = SubscribeOptions::new("g");
    bus.provision(&topic, &opts).await?;
    // The Python reader's own queue: a group busbar subscribed to the topic.
    let reader_queue = busbar_sqs::group_queue_url(&bus, &topic, "python").await?;

    let reader =
        interop::Reader::start(&python, SCRIPT, &["read", &endpoint, &reader_queue, "2"]).await?;
    let sent = interop::sent();
    for m in &sent {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    // Attribute values travel as they are.
    interop::check_read(reader.read(2).await?, &sent, "acme corp")?;

    let arn = busbar_sqs::topic_arn(&bus, &topic).await?;
    interop::write(&python, SCRIPT, &["write", &endpoint, &arn]).await?;
    let mut sub = bus.subscribe(&topic, opts).await?;
    interop::check_received_written(sub.as_mut(), Duration::from_secs(30)).await?;
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

fn main() {
    let url = std::env::var("BUSBAR_SQS_URL")
        .unwrap_or_else(|_| "sqs://test:test@127.0.0.1:4566?region=us-east-1&tls=false".to_owned());
    let missing = interop::python().is_none().then(|| {
        "no interop clients (BUSBAR_INTEROP_PYTHON); run scripts/brokers.sh up".to_owned()
    });
    let servers: Vec<Server> = [
        ("fifo", url.clone()),
        ("standard", format!("{url}&fifo=false")),
    ]
    .into_iter()
    .map(|(label, param)| Server {
        label: label.to_owned(),
        param,
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
