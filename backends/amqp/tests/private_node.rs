//! A private RabbitMQ node (own ports, own data directory, no plugins) stopped cleanly or killed
//! mid-stream: no confirmed message is lost and consuming resumes by itself.
//!
//! The tests run once per RabbitMQ installation of `BUSBAR_RABBITMQ_ROOTS` (whitespace-separated
//! root directories: `/` for the machine's own, Debian's 3.10; the Debian trixie chroot that
//! `scripts/brokers.sh up` builds for 4.x), named `test@<version>`; unset, the machine's own.
//! A node is that installation's `rabbitmq-server` (`usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin`
//! under the root; run through `chroot` for another root, which needs root privileges and the
//! root's `/proc` mounted, as brokers.sh leaves it) started as the current user with everything
//! under a temporary directory inside the root: node name `busbar-<port>@localhost`, AMQP on a
//! spare 127.0.0.1 port, distribution on another, a private Erlang cookie (`HOME`). Without the
//! installation the tests are reported ignored, or fail with `BUSBAR_REQUIRE_BROKERS=1`.

#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_amqp::AmqpBus;
use busbar_conformance::private_server::{
    free_port, restart_mid_stream as restart, stop_process, Failed, RestartPlan, Restartable, Stop,
    TestResult,
};
use busbar_conformance::tls::{
    capture_logs, expect_no_secret, expect_refusals, round_trip, TestCerts,
};
use busbar_core::{EventBus, Message, PublishOptions, SubscribeOptions};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The `rabbitmq-server` script of the installation under `root`, as a path inside it.
fn server_bin(root: &Path) -> Option<String> {
    let lib = root.join("usr/lib/rabbitmq/lib");
    let mut found: Vec<String> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let inside = format!("/usr/lib/rabbitmq/lib/{name}/sbin/rabbitmq-server");
            root.join(inside.trim_start_matches('/'))
                .exists()
                .then_some(inside)
        })
        .collect();
    found.sort();
    found.pop()
}

struct Node {
    /// The installation's root (`/` for the machine's own).
    root: PathBuf,
    /// `user:password` of the URLs (`guest:guest` unless the node was made with others).
    credentials: String,
    /// The AMQPS port, for a node started with [`Node::start_tls`].
    tls_port: Option<u16>,
    /// The node's directory as the node sees it (inside `root`).
    dir: PathBuf,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl Node {
    async fn start(root: &str) -> Result<Self, Failed> {
        Self::start_with(root, None).await
    }

    /// A node that also listens for AMQPS with the certificates of `certs`, requires a client
    /// certificate of their CA, and knows one user: `user` with `password` (no guest).
    async fn start_tls(
        root: &str,
        certs: &TestCerts,
        user: &str,
        password: &str,
    ) -> Result<Self, Failed> {
        Self::start_with(root, Some((certs, user, password))).await
    }

    async fn start_with(root: &str, tls: Option<(&TestCerts, &str, &str)>) -> Result<Self, Failed> {
        let root = PathBuf::from(root);
        let dir = PathBuf::from(format!(
            "/tmp/busbar-rabbit-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let (port, dist_port) = (free_port()?, free_port()?);
        let host_dir = root.join(dir.strip_prefix("/").unwrap_or(&dir));
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(host_dir.join(sub))?;
        }
        std::fs::write(host_dir.join("enabled_plugins"), "[].\n")?;
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{port}\n\
             distribution.listener.interface = 127.0.0.1\n\
             distribution.listener.port_range.min = {dist_port}\n\
             distribution.listener.port_range.max = {dist_port}\n\
             loopback_users = none\n"
        );
        let mut credentials = "guest:guest".to_owned();
        let mut tls_port = None;
        if let Some((certs, user, password)) = tls {
            // The node reads its files inside its root: copies in its directory.
            let inside = |name: &str| dir.join(name).display().to_string();
            for (from, name) in [
                (certs.ca_pem(), "ca.pem"),
                (certs.server_pem(), "server.pem"),
                (certs.server_key(), "server.key"),
            ] {
                std::fs::copy(from, host_dir.join(name))?;
            }
            let p = free_port()?;
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{p}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 default_user = {user}\n\
                 default_pass = {password}\n",
                inside("ca.pem"),
                inside("server.pem"),
                inside("server.key"),
            ));
            credentials = format!("{user}:{password}");
            tls_port = Some(p);
        }
        std::fs::write(host_dir.join("rabbitmq.conf"), conf)?;
        let mut node = Self {
            root,
            credentials,
            tls_port,
            dir,
            port,
            dist_port,
            child: None,
        };
        node.boot().await?;
        Ok(node)
    }

    async fn boot(&mut self) -> TestResult {
        let d: &Path = &self.dir;
        let bin = server_bin(&self.root).ok_or("no rabbitmq-server in the installation")?;
        let mut cmd = if self.root == Path::new("/") {
            Command::new(&bin)
        } else {
            // Another Debian release's RabbitMQ: its own libc and Erlang, so it runs chrooted
            // (with an epmd of its own, the one brokers.sh started for that installation).
            let mut c = Command::new("chroot");
            c.arg(&self.root)
                .arg(&bin)
                .env("ERL_EPMD_PORT", RABBIT_NEW_EPMD_PORT);
            c
        };
        let child = cmd
            .current_dir(self.host_dir())
            .env("HOME", d.join("home"))
            .env(
                "RABBITMQ_NODENAME",
                format!("busbar-{}@localhost", self.port),
            )
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let tls_listens = match self.tls_port {
                Some(p) => TcpStream::connect(("127.0.0.1", p)).await.is_ok(),
                None => true,
            };
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
                && tls_listens
                && AmqpBus::connect(&self.url()).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the private RabbitMQ node did not accept AMQP within 60 s (logs in {})",
                    self.host_dir().display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes the node down as `how` says — SIGTERM to its process group (the Erlang VM shuts
    /// down cleanly) or SIGKILL (no goodbye) — and waits until it no longer listens.
    async fn stop(&mut self, how: Stop) -> TestResult {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        stop_process(&mut child, how, true, Duration::from_secs(30)).await?;
        // The VM may outlive the wrapper script for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
            if Instant::now() > deadline {
                return Err(format!(
                    "the private RabbitMQ node still listens 30 s after it was {}",
                    how.word()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The node's directory as seen from here.
    fn host_dir(&self) -> PathBuf {
        self.root
            .join(self.dir.strip_prefix("/").unwrap_or(&self.dir))
    }

    fn url(&self) -> String {
        format!(
            "amqp://{}@127.0.0.1:{}/%2f?partitions=4",
            self.credentials, self.port
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::fs::remove_dir_all(self.host_dir());
    }
}

/// The epmd port of the chrooted RabbitMQ (`scripts/brokers.sh`).
const RABBIT_NEW_EPMD_PORT: &str = "14369";

/// The node goes down (`how`: its clean shutdown, or SIGKILL) and starts again on the same data while a consumer reads
/// and publishes go on: every publish that returned Ok is handled exactly as the durable
/// quorum queues kept it, and the consumer resumes by itself.
async fn node_restart(root: String, how: Stop) -> TestResult {
    let mut node = Node::start(&root).await?;
    let bus = AmqpBus::connect(&node.url()).await?;
    let topic = "restart";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared.provision(topic, &SubscribeOptions::new("g")).await?;
    if how == Stop::Kill {
        // RabbitMQ records a new quorum queue's Raft member lazily: killed within seconds of
        // declaring its queues, a node came back with one of them "not found on this node,
        // starting member as a new one", without a leader, nacking publishes after 65 s
        // (3.10.8 and 4.0.5; README). The fault under test is a kill mid-stream of a node
        // whose queues exist, so a clean restart first puts them on disk.
        node.stop(Stop::Clean).await?;
        node.boot().await?;
    }
    let plan = RestartPlan {
        down_wait: Duration::from_secs(30),
        publish_limit: Duration::from_secs(60),
        ..RestartPlan::default()
    };
    restart(shared, topic, &mut node, how, &plan).await?;
    let _ = bus.close().await;
    node.stop(Stop::Clean).await
}

#[async_trait::async_trait]
impl Restartable for Node {
    async fn take_down(&mut self, how: Stop) -> TestResult {
        self.stop(how).await
    }

    async fn bring_back(&mut self) -> TestResult {
        self.boot().await
    }
}

/// With `delivery_limit=1`, a message handed back twice by members that closed without
/// acking is dead-lettered by RabbitMQ into `<topic>.dlq` (its redrive group keeps it), with
/// busbar's dead-letter headers, and redrive brings it back.
async fn delivery_limit_dead_letters_into_the_dlq_topic(root: String) -> TestResult {
    let node = Node::start(&root).await?;
    let url = format!("{}&delivery_limit=1", node.url());
    let bus = AmqpBus::connect(&url).await?;
    if !bus.capabilities().native_dead_letter {
        return Err("native_dead_letter is off with delivery_limit=1".into());
    }
    let topic = "limited";
    let options = SubscribeOptions::new("g");
    bus.provision(topic, &options).await?;
    let poison = Message::new("poison").with_key("k");
    bus.publish(topic, poison.clone(), &PublishOptions::default())
        .await?;
    for round in 1..=2 {
        let member = AmqpBus::connect(&url).await?;
        let mut sub = member.subscribe(topic, options.clone()).await?;
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .map_err(|_| format!("round {round}: nothing delivered"))??
            .ok_or("the subscription ended")?;
        if d.id() != poison.id {
            return Err(format!("round {round}: got {}", d.id()).into());
        }
        // Leave without acking: RabbitMQ takes it back and counts a delivery.
        sub.close().await?;
        let _ = member.close().await;
    }
    let mut dlq = bus
        .subscribe("limited.dlq", SubscribeOptions::new("busbar-redrive"))
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(20), dlq.next())
        .await
        .map_err(|_| "nothing arrived in limited.dlq")??
        .ok_or("the dead-letter subscription ended")?;
    let error = d
        .headers()
        .get(busbar_core::dead_letter::headers::ERROR)
        .unwrap_or_default();
    let original = d
        .headers()
        .get(busbar_core::dead_letter::headers::ORIGINAL_TOPIC);
    if d.id() != poison.id || !error.contains("delivery_limit") || original != Some(topic) {
        return Err(format!(
            "dead letter {} with error {error:?}, original topic {original:?}",
            d.id()
        )
        .into());
    }
    d.ack().await?;
    dlq.close().await?;
    // Still nothing for the group: the message left its queue.
    let mut sub = bus.subscribe(topic, options).await?;
    if let Ok(Ok(Some(d))) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        return Err(format!("{} came back to the group after dead-lettering", d.id()).into());
    }
    sub.close().await?;
    let _ = bus.close().await;
    Ok(())
}

const TLS_USER: &str = "busbar-tls";
const PASSWORD: &str = "amqps-s3cret-pw";
const WRONG: &str = "amqps-wrong-pw";

/// `amqps://` against a node that requires a client certificate and a password: a message
/// goes through; a server certificate of an unknown CA, the system CAs alone, or a wrong
/// password are `Auth` errors; no client certificate is refused; an unreadable CA file is a
/// `Config` error; and no password or private key appears in an error, a `Debug` text or any
/// log line at TRACE level.
async fn tls_and_auth(root: String) -> TestResult {
    let logs = capture_logs();
    let certs = TestCerts::make("amqp")?;
    let node = Node::start_tls(&root, &certs, TLS_USER, PASSWORD).await?;
    let port = node.tls_port.ok_or("no AMQPS port")?;
    let url = |password: &str, options: &str| {
        format!("amqps://{TLS_USER}:{password}@127.0.0.1:{port}/%2f?partitions=2&{options}")
    };
    let mut secrets = certs.key_texts()?;
    secrets.extend([PASSWORD.to_owned(), WRONG.to_owned()]);

    let bus = AmqpBus::connect(&url(PASSWORD, &certs.client_options(&certs.ca_pem()))).await?;
    round_trip(&bus, "tls-topic").await?;
    expect_no_secret("the bus's Debug text", &format!("{bus:?}"), &secrets)?;
    bus.close().await?;

    expect_refusals(
        &certs,
        &secrets,
        |good, options| url(if good { PASSWORD } else { WRONG }, options),
        |url| async move { AmqpBus::connect(&url).await },
    )
    .await?;
    drop(node);
    logs.expect_none_of(&secrets)
}

/// The installations of the matrix (see the module docs), labelled by version.
fn servers() -> Vec<busbar_conformance::private_server::Server> {
    let roots: Vec<String> = std::env::var("BUSBAR_RABBITMQ_ROOTS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let roots = if roots.is_empty() {
        vec!["/".to_owned()]
    } else {
        roots
    };
    roots
        .into_iter()
        .map(|root| {
            let r = Path::new(&root);
            let bin = server_bin(r);
            let version = bin.as_deref().and_then(|b| {
                b.split("rabbitmq_server-")
                    .nth(1)?
                    .split('/')
                    .next()
                    .map(str::to_owned)
            });
            let missing = if bin.is_none() {
                Some(format!(
                    "no RabbitMQ installation under {root} (Debian: apt-get install rabbitmq-server; the 4.x chroot: scripts/brokers.sh up)"
                ))
            } else if r != Path::new("/") && !r.join("proc/self").exists() {
                Some(format!(
                    "{root}/proc is not mounted; run scripts/brokers.sh up"
                ))
            } else {
                None
            };
            busbar_conformance::private_server::Server {
                label: version.unwrap_or_else(|| root.clone()),
                param: root,
                missing,
            }
        })
        .collect()
}

fn main() {
    // First: every log line from here on is captured and checked for secrets.
    capture_logs();
    busbar_conformance::private_server::main_matrix(
        &servers(),
        &[
            ("stopped_node_restart_loses_nothing_confirmed", |r| {
                Box::pin(node_restart(r, Stop::Clean))
            }),
            ("killed_node_restart_loses_nothing_confirmed", |r| {
                Box::pin(node_restart(r, Stop::Kill))
            }),
            ("delivery_limit_dead_letters_into_the_dlq_topic", |r| {
                Box::pin(delivery_limit_dead_letters_into_the_dlq_topic(r))
            }),
            ("tls_and_auth", |r| Box::pin(tls_and_auth(r))),
        ],
        &[],
    )
}
