//! What the NATS test binaries share.

/// The servers of the matrix: each binary of `BUSBAR_NATS_SERVERS`, labelled by the version
/// it reports.
pub(crate) fn servers() -> Vec<busbar_conformance::private_server::Server> {
    let bins: Vec<String> = std::env::var("BUSBAR_NATS_SERVERS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let bins = if bins.is_empty() {
        vec!["nats-server".to_owned()]
    } else {
        bins
    };
    bins.into_iter()
        .map(|bin| {
            let version = std::process::Command::new(&bin)
                .arg("--version")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
            busbar_conformance::private_server::Server {
                label: version
                    .as_deref()
                    .and_then(|v| v.rsplit('v').next())
                    .unwrap_or(&bin)
                    .to_owned(),
                missing: version
                    .is_none()
                    .then(|| format!("{bin} is not installed; run scripts/brokers.sh up")),
                param: bin,
            }
        })
        .collect()
}
