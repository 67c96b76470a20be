//! A private RabbitMQ node (own ports, own data directory, no plugins) stopped and restarted
//! mid-stream: no confirmed message is lost and consuming resumes by itself.
//!
//! The node is the machine's RabbitMQ installation (`rabbitmq-server` from
//! `RABBITMQ_SERVER_BIN`, else Debian's `/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin`, else
//! `PATH`) started as the current user with everything under a temporary directory: node name
//! `busbar-<port>@localhost`, AMQP on a spare 127.0.0.1 port, distribution on another, a private
//! Erlang cookie (`HOME`). Without the binary the test is reported ignored, or fails with
//! `BUSBAR_REQUIRE_BROKERS=1`.

#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_amqp::AmqpBus;
use busbar_conformance::private_server::{
    free_port, publish_retrying, Failed, Recorder, TestResult,
};
use busbar_core::{EventBus, Message, PublishOptions, SubscribeOptions};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

fn server_bin() -> String {
    if let Ok(b) = std::env::var("RABBITMQ_SERVER_BIN") {
        return b;
    }
    std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .ok()
        .and_then(|mut d| {
            d.find_map(|e| {
                let p = e.ok()?.path().join("sbin/rabbitmq-server");
                p.exists().then_some(p)
            })
        })
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rabbitmq-server".into())
}

struct Node {
    dir: PathBuf,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl Node {
    async fn start() -> Result<Self, Failed> {
        let dir =
            std::env::temp_dir().join(format!("busbar-rabbit-{}", uuid::Uuid::now_v7().simple()));
        let (port, dist_port) = (free_port()?, free_port()?);
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n\
                 distribution.listener.interface = 127.0.0.1\n\
                 distribution.listener.port_range.min = {dist_port}\n\
                 distribution.listener.port_range.max = {dist_port}\n\
                 loopback_users = none\n"
            ),
        )?;
        let mut node = Self {
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
        let child = Command::new(server_bin())
            .current_dir(d)
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
            .map_err(|e| format!("cannot start {}: {e}", server_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
                && AmqpBus::connect(&self.url()).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the private RabbitMQ node did not accept AMQP within 60 s (logs in {})",
                    self.dir.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM to the node's process group (the Erlang VM shuts down cleanly), then waits.
    async fn stop(&mut self) -> TestResult {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", "--", &format!("-{pid}")])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill().await;
            }
        }
        // The VM may outlive the wrapper script for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
            if Instant::now() > deadline {
                return Err("the private RabbitMQ node still listens 30 s after SIGTERM".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?partitions=4",
            self.port
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The node stops (clean shutdown) and starts again on the same data while a consumer reads
/// and publishes go on: every publish that returned Ok is handled exactly as the durable
/// quorum queues kept it, and the consumer resumes by itself.
async fn node_restart_loses_nothing_confirmed() -> TestResult {
    let mut node = Node::start().await?;
    let bus = AmqpBus::connect(&node.url()).await?;
    let topic = "restart";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared.provision(topic, &SubscribeOptions::new("g")).await?;
    let recorder = Recorder::start(shared, topic, "g", Duration::from_secs(5));
    let mut acked = Vec::new();
    for i in 0..300 {
        let m = Message::new(format!("before-{i}")).with_key(format!("k{}", i % 10));
        let id = m.id.clone();
        match bus.publish(topic, m, &PublishOptions::default()).await {
            Ok(()) => acked.push(id),
            Err(e) if e.is_retryable() => {}
            Err(e) => return Err(format!("publish {i}: {e}").into()),
        }
        if i == 150 {
            node.stop().await?;
            let m = Message::new("while-down").with_key("k0");
            let id = m.id.clone();
            match tokio::time::timeout(
                Duration::from_secs(30),
                bus.publish(topic, m, &PublishOptions::default()),
            )
            .await
            {
                Ok(Ok(())) => acked.push(id),
                Ok(Err(e)) if e.is_retryable() => {}
                Ok(Err(e)) => return Err(format!("publish while down: {e}").into()),
                Err(_) => return Err("a publish while the node was down hung for 30 s".into()),
            }
            node.boot().await?;
        }
    }
    for i in 0..100 {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(&bus, topic, m, Duration::from_secs(60)).await?;
    }
    recorder
        .expect_all(&acked, Duration::from_secs(120), "restart")
        .await?;
    let _ = bus.close().await;
    node.stop().await
}

/// With `delivery_limit=1`, a message handed back twice by members that closed without
/// acking is dead-lettered by RabbitMQ into `<topic>.dlq` (its redrive group keeps it), with
/// busbar's dead-letter headers, and redrive brings it back.
async fn delivery_limit_dead_letters_into_the_dlq_topic() -> TestResult {
    let node = Node::start().await?;
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
        .get(busbar_core::dlq_headers::ERROR)
        .unwrap_or_default();
    let original = d.headers().get(busbar_core::dlq_headers::ORIGINAL_TOPIC);
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

fn main() {
    let bin = server_bin();
    let installed = Path::new(&bin).exists()
        || std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(&bin).exists()));
    busbar_conformance::private_server::main_when(
        installed,
        "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server; or set RABBITMQ_SERVER_BIN)",
        &[
            ("node_restart_loses_nothing_confirmed", true, || {
                Box::pin(node_restart_loses_nothing_confirmed())
            }),
            ("delivery_limit_dead_letters_into_the_dlq_topic", true, || {
                Box::pin(delivery_limit_dead_letters_into_the_dlq_topic())
            }),
        ],
    )
}
