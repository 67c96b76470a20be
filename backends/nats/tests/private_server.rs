//! Tests that need a NATS server of their own (started here on a spare loopback port, with
//! its own store directory): a restart mid-stream, a wrong password, an unreachable server
//! and malformed URLs.
//!
//! They need `nats-server` on PATH (`scripts/brokers.sh up` installs it). Without it they are
//! reported ignored, or fail when `BUSBAR_REQUIRE_BROKERS=1`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, publish_retrying, Failed, Recorder,
    TestResult,
};
use busbar_core::{ErrorKind, EventBus, Message, PublishOptions, SubscribeOptions};
use busbar_nats::NatsBus;
use tokio::process::{Child, Command};

struct Server {
    port: u16,
    dir: std::path::PathBuf,
    auth: Option<(&'static str, &'static str)>,
    child: Option<Child>,
}

impl Server {
    async fn start(auth: Option<(&'static str, &'static str)>) -> Result<Self, Failed> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("busbar-nats-test-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port,
            dir,
            auth,
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> TestResult {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some((u, p)) = self.auth {
            cmd.args(["--user", u, "--pass", p]);
        }
        self.child = Some(
            cmd.spawn()
                .map_err(|e| format!("cannot start nats-server: {e}"))?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("nats-server did not listen within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn kill(&mut self) -> TestResult {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    fn url(&self) -> String {
        match self.auth {
            Some((u, p)) => format!("nats://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("nats://127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn restart_mid_stream_loses_nothing_acked() -> TestResult {
    let mut server = Server::start(None).await?;
    let bus = NatsBus::connect(&format!("{}?lease_ttl_ms=2000", server.url())).await?;
    let topic = "restart";
    let opts = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(3));
    bus.provision(topic, &opts).await?;
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    let recorder = Recorder::start(shared, topic, "g", Duration::from_secs(3));
    let mut acked = Vec::new();
    for i in 0..300 {
        let m = Message::new(format!("before-{i}")).with_key(format!("k{}", i % 10));
        let id = m.id.clone();
        if bus
            .publish(topic, m, &PublishOptions::default())
            .await
            .is_ok()
        {
            acked.push(id);
        }
        if i == 150 {
            // Mid-stream, while the consumer is reading.
            server.kill().await?;
            for j in 0..3 {
                let m = Message::new(format!("down-{j}"));
                let id = m.id.clone();
                match bus.publish(topic, m, &PublishOptions::default()).await {
                    Ok(()) => acked.push(id),
                    Err(e) if e.is_retryable() => {}
                    Err(e) => return Err(format!("publish while down: {e}").into()),
                }
            }
            server.spawn().await?;
        }
    }
    for i in 0..200 {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(&bus, topic, m, Duration::from_secs(30)).await?;
    }
    recorder
        .expect_all(&acked, Duration::from_secs(90), "restart")
        .await?;
    Ok(())
}

async fn wrong_password_is_an_auth_error() -> TestResult {
    let server = Server::start(Some(("busbar", "s3cret-pw"))).await?;
    let url = format!("nats://busbar:wrong-pw@127.0.0.1:{}", server.port);
    let e = NatsBus::connect(&url)
        .await
        .err()
        .ok_or("connected with a wrong password")?;
    if e.kind() != ErrorKind::Auth {
        return Err(format!("expected Auth, got {:?}: {e}", e.kind()).into());
    }
    if e.to_string().contains("wrong-pw") || e.to_string().contains("s3cret") {
        return Err(format!("the error prints the password: {e}").into());
    }
    NatsBus::connect(&server.url()).await?;
    Ok(())
}

async fn unreachable_server_is_a_connection_error() -> TestResult {
    let port = free_port()?;
    expect_connection_error(
        NatsBus::connect(&format!("nats://127.0.0.1:{port}")),
        Duration::from_secs(20),
    )
    .await
}

async fn malformed_urls_are_config_errors() -> TestResult {
    expect_config_errors(
        &[
            "nats://",
            "nats://127.0.0.1:4222?partitions=zero",
            "nats://h:notaport",
        ],
        |url| async move { NatsBus::connect(&url).await },
    )
    .await
}

fn main() {
    busbar_conformance::private_server::main(
        "nats-server",
        &[
            ("restart_mid_stream_loses_nothing_acked", true, || {
                Box::pin(restart_mid_stream_loses_nothing_acked())
            }),
            ("wrong_password_is_an_auth_error", true, || {
                Box::pin(wrong_password_is_an_auth_error())
            }),
            ("unreachable_server_is_a_connection_error", false, || {
                Box::pin(unreachable_server_is_a_connection_error())
            }),
            ("malformed_urls_are_config_errors", false, || {
                Box::pin(malformed_urls_are_config_errors())
            }),
        ],
    )
}
