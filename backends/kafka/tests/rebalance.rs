//! Group changes against `BUSBAR_KAFKA_URL` that the shared conformance suite cannot stage
//! deterministically because they hinge on librdkafka's fetch state.
//!
//! `paused_partitions_are_fetched_again_after_a_rebalance`: a member whose buffer is full
//! pauses fetching (back-pressure); librdkafka keeps an application's pause on a partition
//! across revoke and re-assignment, so a partition paused before a rebalance and given back
//! afterwards was never fetched again — its records stayed unhandled until the next rebalance
//! moved it (found as a stall of `rebalance_at_scale` in CI).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use busbar_conformance::interop::fresh_name;
use busbar_conformance::private_server::{Server, TestResult};
use busbar_core::{EventBus, Message, PublishOptions, StartPosition, SubscribeOptions};
use busbar_kafka::KafkaBus;

/// More than the member's buffer high-water mark (1024 records at the default in-flight
/// limit), spread over the topic's partitions so that each member's share stays below it.
const RECORDS: usize = 1600;

async fn paused_partitions_are_fetched_again_after_a_rebalance(url: String) -> TestResult {
    let bus = KafkaBus::connect(&url).await?;
    let topic = fresh_name("paused");
    let opts = SubscribeOptions::new(fresh_name("g")).start(StartPosition::Earliest);
    bus.provision(&topic, &opts).await?;
    let batch: Vec<Message> = (0..RECORDS)
        .map(|i| Message::new(format!("{i}")).with_key(format!("k{}", i % 97)))
        .collect();
    for chunk in batch.chunks(200) {
        bus.publish_batch(&topic, chunk.to_vec(), &PublishOptions::default())
            .await?;
    }

    // Member A buffers everything it can without handing anything out: it pauses fetching.
    let mut a = bus.subscribe(&topic, opts.clone()).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Member B joins (A gives up half the partitions) and leaves once it holds some (A gets
    // them back). B handles nothing.
    let mut b = bus.subscribe(&topic, opts.clone()).await?;
    tokio::time::timeout(Duration::from_secs(60), b.next())
        .await
        .map_err(|_| "member B was never given a partition")??
        .ok_or("member B's subscription ended")?;
    b.close().await?;

    // A must now handle every record, including those of the partitions it paused.
    let mut handled = HashSet::new();
    let until = Instant::now() + Duration::from_secs(90);
    while handled.len() < RECORDS && Instant::now() < until {
        let Ok(d) = tokio::time::timeout(Duration::from_secs(1), a.next()).await else {
            continue;
        };
        let d = d?.ok_or("member A's subscription ended")?;
        handled.insert(String::from_utf8_lossy(d.payload()).into_owned());
        d.ack().await?;
    }
    a.close().await?;
    bus.close().await?;
    if handled.len() < RECORDS {
        return Err(format!(
            "member A handled {} of {RECORDS} records in 90 s after the rebalance",
            handled.len()
        )
        .into());
    }
    Ok(())
}

fn main() {
    let url = std::env::var("BUSBAR_KAFKA_URL")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned));
    let servers = [Server {
        label: "kafka".to_owned(),
        missing: url.is_none().then(|| {
            "BUSBAR_KAFKA_URL is unset; run scripts/brokers.sh up and eval \"$(scripts/brokers.sh env)\""
                .to_owned()
        }),
        param: url.unwrap_or_default(),
    }];
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[(
            "paused_partitions_are_fetched_again_after_a_rebalance",
            |url| Box::pin(paused_partitions_are_fetched_again_after_a_rebalance(url)),
        )],
        &[],
    )
}
