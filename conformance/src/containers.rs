//! Where a test's broker comes from, in this order:
//!
//! 1. `BUSBAR_<BACKEND>_URL` (one URL, or a whitespace-separated matrix of servers): brokers
//!    someone started — `scripts/brokers.sh up` on CI and on machines without Docker;
//! 2. a Docker daemon that answers (`DOCKER_HOST`, else `/var/run/docker.sock`): the broker is
//!    started in a container with testcontainers (feature `docker`, on by default) and removed
//!    when the test binary ends, so `cargo test` on a laptop with Docker needs no script;
//! 3. the backend's default URL on 127.0.0.1: reachable, it is used; not reachable, the
//!    backend's cases are IGNORED with a hint, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.
//!
//! [`choose`] is that decision, kept free of I/O so a test proves the order; the container
//! images are the broker's official ones (`redis`, `nats` with JetStream, `apache/kafka`,
//! `rabbitmq`, `postgres`, `localstack/localstack` for SQS + SNS).

use std::io::{Read as _, Write as _};
use std::sync::Mutex;
use std::time::Duration;

/// Where the broker of a backend comes from (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The URLs of the environment variable.
    Env(Vec<String>),
    /// A container to start.
    Docker,
    /// The default URL (a broker started by hand, or none).
    Default(String),
}

/// The decision: `env` is the variable's value, `docker` whether a daemon answers.
pub fn choose(env: Option<&str>, docker: bool, default_url: &str) -> Choice {
    let urls: Vec<String> = env
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !urls.is_empty() {
        Choice::Env(urls)
    } else if docker {
        Choice::Docker
    } else {
        Choice::Default(default_url.to_owned())
    }
}

/// Whether a Docker daemon answers `GET /_ping` at `DOCKER_HOST` (a `unix://` socket or
/// `tcp://host:port`), else at `/var/run/docker.sock`, within a second.
pub fn docker_reachable() -> bool {
    let host = std::env::var("DOCKER_HOST").unwrap_or_default();
    let host = if host.is_empty() {
        "unix:///var/run/docker.sock".to_owned()
    } else {
        host
    };
    let limit = Some(Duration::from_secs(1));
    let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    let mut reply = String::new();
    let answered = if let Some(path) = host.strip_prefix("unix://") {
        std::os::unix::net::UnixStream::connect(path).and_then(|mut s| {
            s.set_read_timeout(limit)?;
            s.set_write_timeout(limit)?;
            s.write_all(request)?;
            s.read_to_string(&mut reply)
        })
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        std::net::TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(limit)?;
            s.set_write_timeout(limit)?;
            s.write_all(request)?;
            s.read_to_string(&mut reply)
        })
    } else {
        return false;
    };
    answered.is_ok() && reply.starts_with("HTTP/1.") && reply.contains(" 200 ")
}

/// The URLs for `backend`'s tests, following the order of the module docs: `var`'s URLs, a
/// container's, or `default_url`. A container that fails to start falls back to the default
/// URL (whose probe then says why nothing answers).
pub fn urls_for(backend: &str, var: &str, default_url: &str) -> Vec<String> {
    let env = std::env::var(var).ok();
    let docker = IMAGES.contains(&backend)
        && env.as_deref().is_none_or(|v| v.trim().is_empty())
        && docker_reachable();
    match choose(env.as_deref(), docker, default_url) {
        Choice::Env(urls) => urls,
        Choice::Docker => match start(backend) {
            Ok(url) => {
                eprintln!("{backend}: no {var}; started a container: {url}");
                vec![url]
            }
            Err(why) => {
                eprintln!("{backend}: no {var}; Docker answers but no container started ({why}); trying {default_url}");
                vec![default_url.to_owned()]
            }
        },
        Choice::Default(url) => vec![url],
    }
}

/// The backends a container can be started for.
pub const IMAGES: &[&str] = &[
    "redis",
    "nats",
    "kafka",
    "amqp",
    "sqs",
    "sqs-standard",
    "postgres",
];

type Stopper = Box<dyn FnOnce() + Send>;

/// Containers started by this process, removed by [`remove_all`].
static STARTED: Mutex<Vec<Stopper>> = Mutex::new(Vec::new());

/// Removes every container this process started (the test binaries call it before exiting).
pub fn remove_all() {
    let stoppers: Vec<Stopper> = match STARTED.lock() {
        Ok(mut s) => s.drain(..).collect(),
        Err(_) => return,
    };
    for stop in stoppers {
        stop();
    }
}

#[cfg(feature = "docker")]
fn start(backend: &str) -> Result<String, String> {
    use testcontainers_modules::testcontainers::runners::AsyncRunner as _;
    use testcontainers_modules::testcontainers::{ContainerAsync, Image, ImageExt as _};
    use testcontainers_modules::{kafka, localstack, nats, postgres, rabbitmq, redis};

    // The runtime lives as long as the containers: their removal runs on it too.
    let rt = std::sync::Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?,
    );
    fn keep<I: Image + 'static>(
        rt: std::sync::Arc<tokio::runtime::Runtime>,
        c: ContainerAsync<I>,
        port: u16,
    ) -> Result<u16, String> {
        let mapped = rt
            .block_on(c.get_host_port_ipv4(port))
            .map_err(|e| e.to_string())?;
        let stop: Stopper = Box::new(move || {
            let _ = rt.block_on(c.rm());
        });
        STARTED.lock().map_err(|e| e.to_string())?.push(stop);
        Ok(mapped)
    }
    let err = |e: testcontainers_modules::testcontainers::TestcontainersError| e.to_string();
    match backend {
        "redis" => {
            let c = rt.block_on(redis::Redis::default().start()).map_err(err)?;
            let p = keep(rt, c, redis::REDIS_PORT)?;
            Ok(format!("redis://127.0.0.1:{p}"))
        }
        "nats" => {
            let cmd = nats::NatsServerCmd::default().with_jetstream();
            let c = rt
                .block_on(nats::Nats::default().with_cmd(&cmd).start())
                .map_err(err)?;
            let p = keep(rt, c, 4222)?;
            Ok(format!("nats://127.0.0.1:{p}"))
        }
        "kafka" => {
            let c = rt
                .block_on(kafka::apache::Kafka::default().start())
                .map_err(err)?;
            let p = keep(rt, c, 9092)?;
            Ok(format!("kafka://127.0.0.1:{p}"))
        }
        "amqp" => {
            let c = rt
                .block_on(rabbitmq::RabbitMq::default().start())
                .map_err(err)?;
            let p = keep(rt, c, 5672)?;
            Ok(format!(
                "amqp://guest:guest@127.0.0.1:{p}/%2f?partitions=4&queue_expires_ms=60000"
            ))
        }
        "sqs" | "sqs-standard" => {
            let c = rt
                .block_on(localstack::LocalStack::default().start())
                .map_err(err)?;
            let p = keep(rt, c, 4566)?;
            Ok(format!(
                "sqs://test:test@127.0.0.1:{p}?region=us-east-1&tls=false"
            ))
        }
        "postgres" => {
            let c = rt
                .block_on(postgres::Postgres::default().start())
                .map_err(err)?;
            let p = keep(rt, c, 5432)?;
            Ok(format!(
                "postgres://postgres:postgres@127.0.0.1:{p}/postgres"
            ))
        }
        other => Err(format!("no container image known for {other}")),
    }
}

#[cfg(not(feature = "docker"))]
fn start(_backend: &str) -> Result<String, String> {
    Err("busbar-conformance was built without its `docker` feature".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_first_then_docker_then_the_default() {
        let d = "nats://127.0.0.1:4222";
        let both = "nats://127.0.0.1:14222 nats://127.0.0.1:4222";
        assert_eq!(
            choose(Some(both), true, d),
            Choice::Env(vec![
                "nats://127.0.0.1:14222".into(),
                "nats://127.0.0.1:4222".into()
            ]),
            "a URL in the environment wins, even with Docker"
        );
        assert_eq!(choose(None, true, d), Choice::Docker);
        assert_eq!(choose(Some("  "), true, d), Choice::Docker, "blank = unset");
        assert_eq!(choose(None, false, d), Choice::Default(d.into()));
    }

    #[test]
    fn this_machine_has_no_docker_daemon_unless_it_says_so() {
        // Whatever the machine: the probe answers within its limits and never panics.
        let started = std::time::Instant::now();
        let reachable = docker_reachable();
        assert!(started.elapsed() < Duration::from_secs(5));
        eprintln!("docker reachable: {reachable}");
    }
}
