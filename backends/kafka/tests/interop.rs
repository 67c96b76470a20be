//! Kafka records read and written by clients no one at busbar wrote, against `BUSBAR_KAFKA_URL`:
//! - confluent-kafka + the CloudEvents Python SDK's Kafka binding read busbar's events as valid
//!   binary-mode CloudEvents, and busbar reads an event the SDK wrote with the same id, type,
//!   source, time, key, extension and data (the clients live in the venv `scripts/brokers.sh up`
//!   installs, `BUSBAR_INTEROP_PYTHON`);
//! - a record with a binary key and a binary header value (a schema-registry key), produced by
//!   the plain librdkafka client, is dead-lettered by busbar with exactly those bytes — so it
//!   lands in the same partition of `<topic>.dlq` (its key was decoded lossily before).

use std::time::{Duration, Instant};

use busbar_conformance::interop;
use busbar_conformance::private_server::{Server, TestResult};
use busbar_core::{EventBus, NackAction, PublishOptions, SubscribeOptions};
use busbar_kafka::KafkaBus;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/interop/cloudevents_kafka.py"
);

async fn cloudevents_sdk_interop(url: String) -> TestResult {
    let python = interop::python().ok_or("BUSBAR_INTEROP_PYTHON is unset")?;
    let bus = KafkaBus::connect(&url).await?;
    let bootstrap = bus.config().bootstrap_servers.clone();
    let topic = interop::fresh_name("interop");
    let opts = SubscribeOptions::new("g");
    bus.provision(&topic, &opts).await?;

    let reader =
        interop::Reader::start(&python, SCRIPT, &["read", &bootstrap, &topic, "2"]).await?;
    let sent = interop::sent();
    for m in &sent {
        bus.publish(&topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    // The Kafka binding carries header values as they are.
    interop::check_read(reader.read(2).await?, &sent, "acme corp")?;

    interop::write(&python, SCRIPT, &["write", &bootstrap, &topic]).await?;
    let mut sub = bus.subscribe(&topic, opts).await?;
    interop::check_received_written(sub.as_mut(), Duration::from_secs(60)).await?;
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

async fn binary_keys_keep_their_bytes_through_a_dead_letter(url: String) -> TestResult {
    const KEY: &[u8] = &[0, 0, 0, 0, 7, 0xff, 0xfe];
    const SCHEMA: &[u8] = &[0xc3, 0x28, 0];
    let bus = KafkaBus::connect(&url).await?;
    let bootstrap = bus.config().bootstrap_servers.clone();
    let topic = interop::fresh_name("binary");
    let opts = SubscribeOptions::new("g");
    bus.provision(&topic, &opts).await?;
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("partitioner", "murmur2_random")
        .create()?;
    let partition = raw
        .send(
            FutureRecord::to(&topic)
                .key(KEY)
                .payload("avro bytes")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "schema",
                    value: Some(SCHEMA),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?
        .partition;
    let mut sub = bus.subscribe(&topic, opts).await?;
    let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .map_err(|_| "the record never arrived")??
        .ok_or("the subscription ended")?;
    d.nack(NackAction::DeadLetter {
        reason: "poison".into(),
    })
    .await?;
    sub.close().await?;

    let dlq = format!("{topic}.dlq");
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", interop::fresh_name("binary-check"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[dlq.as_str()])?;
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        let Some(record) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let record = record?;
        let header = |name: &str| {
            record
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value.map(<[u8]>::to_vec))
        };
        if record.key() != Some(KEY) || header("schema").as_deref() != Some(SCHEMA) {
            return Err(format!(
                "the dead letter has key {:02x?} and schema header {:02x?}, not {KEY:02x?} / {SCHEMA:02x?}",
                record.key(),
                header("schema")
            )
            .into());
        }
        if header("busbar-key-encoding").is_some() || header("busbar-binary-headers").is_some() {
            return Err("the dead letter carries busbar's marker headers".into());
        }
        if record.partition() != partition {
            return Err(format!(
                "the dead letter is in partition {}, the record was in {partition}",
                record.partition()
            )
            .into());
        }
        bus.close().await?;
        return Ok(());
    }
    Err(format!("nothing arrived in {dlq}").into())
}

fn main() {
    let url =
        std::env::var("BUSBAR_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_owned());
    let missing = interop::python().is_none().then(|| {
        "no interop clients (BUSBAR_INTEROP_PYTHON); run scripts/brokers.sh up".to_owned()
    });
    let servers = [Server {
        label: "kafka".to_owned(),
        param: url,
        missing,
    }];
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[
            ("cloudevents_sdk_interop", |url| {
                Box::pin(cloudevents_sdk_interop(url))
            }),
            (
                "binary_keys_keep_their_bytes_through_a_dead_letter",
                |url| Box::pin(binary_keys_keep_their_bytes_through_a_dead_letter(url)),
            ),
        ],
        &[],
    )
}
