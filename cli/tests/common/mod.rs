//! What the CLI's process tests share: the servers of the backends this build speaks to.

use busbar_conformance::private_server::Server;

/// A server per URL of each `BUSBAR_*_URL` list (`all`), or of its first URL only, for every
/// backend whose feature this build has (named `<backend>-<n>` when a list has several). An
/// unset variable gives one server marked missing: its tests are IGNORED, or FAILED with
/// `BUSBAR_REQUIRE_BROKERS=1`.
pub(crate) fn servers(all: bool) -> Vec<Server> {
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
            // Not a missing broker: this build cannot speak to it (cargo test --all-features can).
            eprintln!("skipping {label}: busbar-cli was built without its {label} feature");
            continue;
        }
        let mut urls: Vec<String> = std::env::var(var)
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        if !all {
            urls.truncate(1);
        }
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
    }
    servers
}
