//! Tests that need a Redis server of their own (started here on a spare loopback port):
//! a restart mid-stream, a wrong password, an unreachable server, a malformed URL.
//!
//! They need `redis-server` on PATH (`scripts/brokers.sh up` installs it). Without it they are
//! reported ignored, or fail when `BUSBAR_REQUIRE_BROKERS=1`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, publish_retrying, Failed, Recorder,
    TestResult,
};
use busbar_core::{ErrorKind, EventBus, Message, PublishOptions, SubscribeOptions};
use busbar_redis::RedisBus;
use tokio::process::{Child, Command};

/// A private redis-server with AOF (`appendfsync always`), so a restart keeps what it acked.
struct Server {
    port: u16,
    dir: std::path::PathBuf,
    password: Option<&'static str>,
    child: Option<Child>,
}

impl Server {
    async fn start(password: Option<&'static str>) -> Result<Self, Failed> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("busbar-redis-test-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port,
            dir,
            password,
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> TestResult {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(p) = self.password {
            cmd.args(["--requirepass", p]);
        }
        self.child = Some(
            cmd.spawn()
                .map_err(|e| format!("cannot start redis-server: {e}"))?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("redis-server did not listen within 10 s".into());
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

    fn url(&self, query: &str) -> String {
        match self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/{query}", self.port),
            None => format!("redis://127.0.0.1:{}/{query}", self.port),
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
    let bus = RedisBus::connect(&server.url("?lease_ttl_ms=1500")).await?;
    let topic = "restart";
    let opts = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(3));
    bus.provision(topic, &opts).await?;
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    let recorder = Recorder::start(shared, topic, "g", Duration::from_secs(3));

    // Before the crash: everything whose publish returned Ok must arrive.
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
            // While Redis is down, publishing fails with a retryable error, never silently.
            for j in 0..5 {
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
    // After the restart: publishing resumes and everything arrives.
    for i in 0..200 {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(&bus, topic, m, Duration::from_secs(30)).await?;
    }
    recorder
        .expect_all(&acked, Duration::from_secs(60), "restart")
        .await?;
    Ok(())
}

async fn wrong_password_is_an_auth_error() -> TestResult {
    let server = Server::start(Some("s3cret-pw")).await?;
    let url = format!("redis://:wrong-pw@127.0.0.1:{}/", server.port);
    let e = RedisBus::connect(&url)
        .await
        .err()
        .ok_or("connected with a wrong password")?;
    if e.kind() != ErrorKind::Auth {
        return Err(format!("expected Auth, got {:?}: {e}", e.kind()).into());
    }
    if e.to_string().contains("wrong-pw") || e.to_string().contains("s3cret") {
        return Err(format!("the error prints the password: {e}").into());
    }
    RedisBus::connect(&server.url("")).await?;
    Ok(())
}

async fn unreachable_server_is_a_connection_error() -> TestResult {
    let port = free_port()?;
    expect_connection_error(
        RedisBus::connect(&format!("redis://127.0.0.1:{port}/")),
        Duration::from_secs(20),
    )
    .await
}

async fn malformed_urls_are_config_errors() -> TestResult {
    expect_config_errors(
        &[
            "redis://",
            "redis://127.0.0.1:6379/?partitions=zero",
            "redis://h:notaport/",
        ],
        |url| async move { RedisBus::connect(&url).await },
    )
    .await
}

fn main() {
    busbar_conformance::private_server::main(
        "redis-server",
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
