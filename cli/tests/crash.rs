//! Real crashes (issue 22): a consumer PROCESS (`busbar worker`) SIGKILLed while 16 handlers
//! are busy, a second started at once, a third joining under load — against every server of
//! every `BUSBAR_*_URL` list. Nothing may be lost and, where the backend orders per key, no
//! message may be first handled before its key's previous one; duplicates and the recovery
//! time (SIGKILL → the second worker's first handled message) are printed. A backend whose
//! URL is unset, or whose feature this build lacks, is IGNORED (FAILED with
//! `BUSBAR_REQUIRE_BROKERS=1`).

use busbar_conformance::crash::{killed_worker, CrashPlan};
use busbar_conformance::private_server::{Server, TestResult};

const BUSBAR: &str = env!("CARGO_BIN_EXE_busbar");

async fn sigkill_mid_batch(url: String) -> TestResult {
    let bus = busbar::connect(&url).await?;
    let command = vec![BUSBAR.to_owned(), "worker".to_owned(), url.clone()];
    let report = killed_worker(bus.clone(), &command, &CrashPlan::default()).await?;
    eprintln!(
        "  sigkill_mid_batch {}: {report}",
        without_credentials(&url)
    );
    bus.close().await?;
    Ok(())
}

/// The URL without its credentials, for the report line.
fn without_credentials(url: &str) -> String {
    url.split('@').next_back().unwrap_or(url).to_owned()
}

fn main() {
    let backends = [
        ("redis", "BUSBAR_REDIS_URL", cfg!(feature = "redis")),
        ("nats", "BUSBAR_NATS_URL", cfg!(feature = "nats")),
        ("amqp", "BUSBAR_AMQP_URL", cfg!(feature = "amqp")),
        ("kafka", "BUSBAR_KAFKA_URL", cfg!(feature = "kafka")),
        ("sqs", "BUSBAR_SQS_URL", cfg!(feature = "sqs")),
    ];
    let mut servers = Vec::new();
    for (label, var, built) in backends {
        if !built {
            eprintln!("skipping {label}: busbar-cli was built without its {label} feature");
            continue;
        }
        let urls: Vec<String> = std::env::var(var)
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if urls.is_empty() {
            servers.push(Server {
                label: label.to_owned(),
                missing: Some(format!(
                    "{var} is unset; run scripts/brokers.sh up and eval \"$(scripts/brokers.sh env)\""
                )),
                param: String::new(),
            });
        }
        for (i, url) in urls.iter().enumerate() {
            let name = if urls.len() > 1 {
                format!("{label}-{}", i + 1)
            } else {
                label.to_owned()
            };
            servers.push(Server {
                label: name,
                missing: None,
                param: url.clone(),
            });
        }
        if label == "sqs" {
            if let Some(url) = urls.first() {
                let separator = if url.contains('?') { '&' } else { '?' };
                servers.push(Server {
                    label: "sqs-standard".to_owned(),
                    missing: None,
                    param: format!("{url}{separator}fifo=false"),
                });
            }
        }
    }
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[("sigkill_mid_batch", |url| Box::pin(sigkill_mid_batch(url)))],
        &[],
    )
}
