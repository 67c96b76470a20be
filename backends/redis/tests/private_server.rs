//! Tests that need a Redis server of their own (started here on a spare loopback port):
//! a restart mid-stream, a wrong password, an unreachable server, a malformed URL.
//!
//! They need `redis-server` on PATH (`scripts/brokers.sh up` installs it). Without it they are
//! reported ignored, or fail when `BUSBAR_REQUIRE_BROKERS=1`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, restart_mid_stream as restart,
    stop_process, wait_until_listening, Failed, RestartPlan, Restartable, Stop, TestResult,
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
        wait_until_listening(self.port, Duration::from_secs(10), "redis-server").await?;
        Ok(())
    }

    /// Takes the server down as `how` says (SIGTERM: Redis fsyncs the AOF and exits).
    async fn stop(&mut self, how: Stop) -> TestResult {
        match self.child.take() {
            Some(mut c) => stop_process(&mut c, how, false, Duration::from_secs(30)).await,
            None => Ok(()),
        }
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

#[async_trait::async_trait]
impl Restartable for Server {
    async fn take_down(&mut self, how: Stop) -> TestResult {
        self.stop(how).await
    }

    async fn bring_back(&mut self) -> TestResult {
        self.spawn().await
    }
}

/// The server goes down (`how`) and comes back on the same AOF mid-stream, while a consumer
/// reads and publishes go on: every publish that returned Ok is handled, each key's messages
/// first handled in publish order.
async fn restart_mid_stream(how: Stop) -> TestResult {
    let mut server = Server::start(None).await?;
    let bus = RedisBus::connect(&server.url("?lease_ttl_ms=1500")).await?;
    let topic = "restart";
    let opts = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(3));
    bus.provision(topic, &opts).await?;
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    let plan = RestartPlan {
        while_down: 5,
        after: 200,
        publish_limit: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(3),
        handled_within: Duration::from_secs(60),
        ..RestartPlan::default()
    };
    restart(shared, topic, &mut server, how, &plan).await?;
    Ok(())
}

async fn killed_server_restart_loses_nothing_acked() -> TestResult {
    restart_mid_stream(Stop::Kill).await
}

async fn stopped_server_restart_loses_nothing_acked() -> TestResult {
    restart_mid_stream(Stop::Clean).await
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

async fn next_of(
    sub: &mut Box<dyn busbar_core::Subscriber>,
    what: &str,
) -> Result<busbar_core::Delivery, Failed> {
    Ok(tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .map_err(|_| format!("{what} did not arrive"))??
        .ok_or("the subscription ended")?)
}

/// An entry another program wrote (no busbar fields) is delivered with what can be read — its
/// fields as a JSON object, its id from its place in the stream — where it used to be
/// dead-lettered; a busbar entry with a broken field is dead-lettered with its payload and
/// every field, where it used to go with an EMPTY payload and none of them.
async fn foreign_entries_are_delivered_and_broken_ones_kept() -> TestResult {
    let server = Server::start(None).await?;
    let bus = RedisBus::connect(&server.url("?partitions=1")).await?;
    let topic = "foreign";
    let opts = SubscribeOptions::new("g");
    bus.provision(topic, &opts).await?;
    let stream = bus.config().stream_key(topic, 0);
    let client = redis::Client::open(server.url("")).map_err(|e| e.to_string())?;
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let foreign: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&["event", "order.created", "total", "42"])
        .query_async(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&["id", "broken-1", "d", "the payload", "tm", "yesterday"])
        .query_async(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let ours = Message::new("ours");
    bus.publish(topic, ours.clone(), &PublishOptions::default())
        .await?;
    let mut sub = bus.subscribe(topic, opts).await?;
    let first = next_of(&mut sub, "the foreign entry").await?;
    let want = format!("redis-0-{foreign}");
    let body: serde_json::Value =
        serde_json::from_slice(first.payload()).map_err(|e| format!("payload: {e}"))?;
    if first.id() != want || body["event"] != "order.created" || body["total"] != "42" {
        return Err(format!("got {} {:?}, expected {want}", first.id(), body).into());
    }
    first.ack().await?;
    let second = next_of(&mut sub, "the busbar message").await?;
    if second.id() != ours.id {
        return Err(format!("expected {}, got {}", ours.id, second.id()).into());
    }
    second.ack().await?;
    sub.close().await?;

    let dlq = busbar_core::dead_letter::default_topic(topic);
    let mut dead_letters = bus
        .subscribe(
            &dlq,
            SubscribeOptions::new("inspect").start(busbar_core::StartPosition::Earliest),
        )
        .await?;
    let dead = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
        .await
        .map_err(|_| "the broken entry is not in the dead-letter topic")??
        .ok_or("the subscription ended")?;
    let h = dead.headers();
    if dead.payload().as_ref() != b"the payload"
        || h.get("busbar-redis-field-tm") != Some("yesterday")
        || h.get("busbar-redis-field-id") != Some("broken-1")
        || h.get(busbar_core::dead_letter::headers::ERROR).is_none()
    {
        return Err(format!(
            "dead letter lost content: payload {:?}, headers {h:?}",
            String::from_utf8_lossy(dead.payload())
        )
        .into());
    }
    dead.ack().await?;
    dead_letters.close().await?;
    Ok(())
}

/// A `redis://` URL pointing at a server of another protocol is a (retryable) connection
/// error naming the mix-up, not a `Decode` error of a reply.
async fn not_redis_is_a_connection_error() -> TestResult {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let result = expect_connection_error(
        RedisBus::connect(&format!("redis://127.0.0.1:{port}/")),
        Duration::from_secs(20),
    )
    .await;
    server.abort();
    result
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
            ("killed_server_restart_loses_nothing_acked", true, || {
                Box::pin(killed_server_restart_loses_nothing_acked())
            }),
            ("stopped_server_restart_loses_nothing_acked", true, || {
                Box::pin(stopped_server_restart_loses_nothing_acked())
            }),
            ("wrong_password_is_an_auth_error", true, || {
                Box::pin(wrong_password_is_an_auth_error())
            }),
            ("unreachable_server_is_a_connection_error", false, || {
                Box::pin(unreachable_server_is_a_connection_error())
            }),
            (
                "foreign_entries_are_delivered_and_broken_ones_kept",
                true,
                || Box::pin(foreign_entries_are_delivered_and_broken_ones_kept()),
            ),
            ("not_redis_is_a_connection_error", false, || {
                Box::pin(not_redis_is_a_connection_error())
            }),
            ("malformed_urls_are_config_errors", false, || {
                Box::pin(malformed_urls_are_config_errors())
            }),
        ],
    )
}
