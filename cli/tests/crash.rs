//! Real crashes (issue 22): a consumer PROCESS (`busbar worker`) SIGKILLed while 16 handlers
//! are busy, a second started at once, a third joining under load; one of two workers
//! SIGKILLed while partitions move to a third that joined — against every server of
//! every `BUSBAR_*_URL` list. Nothing may be lost and, where the backend orders per key, no
//! message may be first handled before its key's previous one; duplicates and the recovery
//! time (the longest a key the killed worker served waited for its next handling) are printed. A backend whose
//! URL is unset, or whose feature this build lacks, is IGNORED (FAILED with
//! `BUSBAR_REQUIRE_BROKERS=1`).

mod common;

use busbar_conformance::crash::{
    idempotent_redelivery, killed_worker, rebalance_under_churn, CrashPlan, KillAt,
};
use busbar_conformance::private_server::{Server, TestResult};

const BUSBAR: &str = env!("CARGO_BIN_EXE_busbar");

async fn sigkill_mid_batch(url: String) -> TestResult {
    let bus = busbar::connect(&url).await?;
    let command = vec![BUSBAR.to_owned(), "worker".to_owned(), url.clone()];
    let report = killed_worker(
        bus.clone(),
        &command,
        &CrashPlan::default(),
        KillAt::MidBatch,
    )
    .await?;
    eprintln!(
        "  sigkill_mid_batch {}: {report}",
        without_credentials(&url)
    );
    bus.close().await?;
    Ok(())
}

/// Two workers share the group; a third joins and, as soon as it handled its first message
/// (partitions are moving), one of the two is SIGKILLed.
async fn sigkill_during_handover(url: String) -> TestResult {
    let bus = busbar::connect(&url).await?;
    let command = vec![BUSBAR.to_owned(), "worker".to_owned(), url.clone()];
    let plan = CrashPlan {
        kill_after: 400,
        ..CrashPlan::default()
    };
    let report = killed_worker(bus.clone(), &command, &plan, KillAt::DuringHandover).await?;
    eprintln!(
        "  sigkill_during_handover {}: {report}",
        without_credentials(&url)
    );
    bus.close().await?;
    Ok(())
}

/// 1,000 keys × 20 messages while a member joins or leaves (SIGTERM) every 2 s, twelve
/// times; then the members left finish the work.
async fn rebalance_at_scale(url: String) -> TestResult {
    let bus = busbar::connect(&url).await?;
    let command = vec![BUSBAR.to_owned(), "worker".to_owned(), url.clone()];
    let plan = CrashPlan {
        keys: 1000,
        per_key: 20,
        // ~400 messages/s per member: the twelve changes happen under load.
        handle: std::time::Duration::from_millis(20),
        concurrency: 8,
        deadline: std::time::Duration::from_secs(170),
        ..CrashPlan::default()
    };
    let report = rebalance_under_churn(
        bus.clone(),
        &command,
        &plan,
        std::time::Duration::from_secs(2),
        12,
    )
    .await?;
    eprintln!(
        "  rebalance_at_scale {}: {report}",
        without_credentials(&url)
    );
    bus.close().await?;
    Ok(())
}

/// An idempotent worker (`--idempotent STORE`) aborts between its 20th record and that
/// message's ack; the next worker gets the message again and must skip it.
async fn idempotent_redelivery_with(url: String, store: String) -> TestResult {
    let bus = busbar::connect(&url).await?;
    let command = vec![BUSBAR.to_owned(), "worker".to_owned(), url.clone()];
    let store_args = vec!["--idempotent".to_owned(), store.clone()];
    let report = idempotent_redelivery(bus.clone(), &command, &store_args).await?;
    eprintln!(
        "  idempotent_redelivery {} ({} store): {report}",
        without_credentials(&url),
        store.split(':').next().unwrap_or_default()
    );
    bus.close().await?;
    Ok(())
}

fn first_url(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
}

/// The URL without its credentials, for the report line.
fn without_credentials(url: &str) -> String {
    url.split('@').next_back().unwrap_or(url).to_owned()
}

fn main() {
    let mut servers = common::servers(true);
    let fifo = servers
        .iter()
        .find(|s| s.label == "sqs" && s.missing.is_none())
        .map(|s| s.param.clone());
    if let Some(url) = fifo {
        let separator = if url.contains('?') { '&' } else { '?' };
        servers.push(Server {
            label: "sqs-standard".to_owned(),
            missing: None,
            param: format!("{url}{separator}fifo=false"),
        });
    }
    // The PostgreSQL store once, behind Kafka (the broker that redelivers the most after a
    // crash) where Kafka is built, else Redis.
    #[cfg(all(feature = "postgres", feature = "kafka"))]
    let once: Vec<(&'static str, busbar_conformance::private_server::TestFn)> =
        vec![("idempotent_redelivery_postgres_store@kafka", || {
            let url = first_url("BUSBAR_KAFKA_URL")
                .unwrap_or_else(|| "kafka://127.0.0.1:9092".to_owned());
            let store = first_url("BUSBAR_POSTGRES_URL")
                .unwrap_or_else(|| "postgres://busbar@127.0.0.1:5432/busbar".to_owned());
            Box::pin(idempotent_redelivery_with(url, store))
        })];
    #[cfg(not(all(feature = "postgres", feature = "kafka")))]
    let once: Vec<(&'static str, busbar_conformance::private_server::TestFn)> = Vec::new();
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[
            ("sigkill_mid_batch", |url| Box::pin(sigkill_mid_batch(url))),
            ("sigkill_during_handover", |url| {
                Box::pin(sigkill_during_handover(url))
            }),
            ("rebalance_at_scale", |url| {
                Box::pin(rebalance_at_scale(url))
            }),
            ("idempotent_redelivery_redis_store", |url| {
                let store = first_url("BUSBAR_REDIS_URL")
                    .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
                Box::pin(idempotent_redelivery_with(url, store))
            }),
        ],
        &once,
    )
}
