//! Tests that need a NATS server of their own (started here on a spare loopback port, with
//! its own store directory): a restart mid-stream, a wrong password, an unreachable server
//! and malformed URLs.
//!
//! They need `nats-server` on PATH (`scripts/brokers.sh up` installs it). Without it they are
//! reported ignored, or fail when `BUSBAR_REQUIRE_BROKERS=1`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, publish_retrying, Failed, Recorder,
    TestResult,
};
use busbar_core::{
    Delivery, ErrorKind, EventBus, Message, PublishOptions, SubscribeOptions, Subscriber,
};
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

/// The current value of a partition lease (see the README's layout: one message per
/// subject on the lease stream of the lease TTL), or `None` when it expired.
async fn lease_value(url: &str, ttl_ms: u64, key: &str) -> Result<Option<Vec<u8>>, Failed> {
    let client = async_nats::connect(url).await?;
    let request = serde_json::json!({ "last_by_subj": format!("busbar-lease.{ttl_ms}.{key}") });
    let reply = client
        .request(
            format!("$JS.API.STREAM.MSG.GET.BUSBAR_LEASES_{ttl_ms}"),
            request.to_string().into(),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    let Some(data) = v.pointer("/message/data") else {
        return Ok(None);
    };
    let data = data.as_str().unwrap_or_default();
    Ok(Some(
        base64::engine::general_purpose::STANDARD.decode(data)?,
    ))
}

async fn next_within(sub: &mut Box<dyn Subscriber>, what: &str) -> Result<Delivery, Failed> {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .map_err(|_| format!("no {what} within 20 s"))??
        .ok_or_else(|| format!("the subscription ended before the {what}").into())
}

/// A member that takes over a crashed member's partition waits one ack wait, then hands out
/// what the crashed member left unacked in stream order. When it is itself asked to hand
/// the partition over during that wait, the next owner must wait as well: here the crashed
/// member extended its first message's deadline (as the runner does before a retry), so
/// JetStream alone would redeliver the key's second message first.
async fn handover_during_recovery_keeps_key_order() -> TestResult {
    let server = Server::start(None).await?;
    let url = format!("{}?partitions=1&lease_ttl_ms=600", server.url());
    let (topic, lease) = ("handover", "handover.g.p0");
    let ack_wait = Duration::from_secs(4);
    let opts = SubscribeOptions::new("g").ack_timeout(ack_wait);
    let crashing = NatsBus::connect(&url).await?;
    crashing.provision(topic, &opts).await?;
    let mut ids = Vec::new();
    for payload in ["first", "second"] {
        let m = Message::new(payload).with_key("k");
        ids.push(m.id.clone());
        crashing
            .publish(topic, m, &PublishOptions::default())
            .await?;
    }
    let mut sub1 = crashing.subscribe(topic, opts.clone()).await?;
    let d1 = next_within(&mut sub1, "first delivery").await?;
    let d2 = next_within(&mut sub1, "second delivery").await?;
    if [d1.id(), d2.id()] != [ids[0].as_str(), ids[1].as_str()] {
        return Err("the first owner got the key's messages out of order".into());
    }
    let crashed_owner = lease_value(&server.url(), 600, lease)
        .await?
        .ok_or("the first owner holds no lease")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The first message is now due one second after the second.
    d1.extend_deadline(ack_wait).await?;
    // Crash: nothing is acked, nacked or released.
    drop((d1, d2, sub1));

    let taking_over = NatsBus::connect(&url).await?;
    let mut sub2 = taking_over.subscribe(topic, opts.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = lease_value(&server.url(), 600, lease).await?;
        if v.as_ref()
            .is_some_and(|v| !v.is_empty() && v != b"-hold-" && *v != crashed_owner)
        {
            break;
        }
        if Instant::now() > deadline {
            return Err("the second member did not take the partition within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still within its wait: leave the group, handing the partition over.
    sub2.close().await?;

    let next_owner = NatsBus::connect(&url).await?;
    let mut sub3 = next_owner.subscribe(topic, opts).await?;
    let a = next_within(&mut sub3, "first redelivery").await?;
    let b = next_within(&mut sub3, "second redelivery").await?;
    let got = [a.payload().clone(), b.payload().clone()];
    a.ack().await?;
    b.ack().await?;
    if [a.id(), b.id()] != [ids[0].as_str(), ids[1].as_str()] {
        return Err(format!("redelivered out of order after the hand-over: {got:?}").into());
    }
    for bus in [crashing, taking_over, next_owner] {
        bus.close().await?;
    }
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
            ("handover_during_recovery_keeps_key_order", true, || {
                Box::pin(handover_during_recovery_keeps_key_order())
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
