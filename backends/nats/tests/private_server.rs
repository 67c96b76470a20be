//! Tests that need a NATS server of their own (started here on a spare loopback port, with
//! its own store directory): a restart mid-stream, partition hand-overs after a crash (with
//! short leases), a wrong password, an unreachable server and malformed URLs.
//!
//! They run once per server binary of `BUSBAR_NATS_SERVERS` (whitespace-separated paths;
//! `scripts/brokers.sh env` lists NATS 2.15 and Debian's 2.9), or `nats-server` on PATH when
//! it is unset; a test is named `test@<version>`. A missing binary makes its tests IGNORED, or
//! FAILED when `BUSBAR_REQUIRE_BROKERS=1`.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, restart_mid_stream as restart,
    stop_process, wait_until_listening, Failed, RestartPlan, Restartable, Stop, TestResult,
};
use busbar_core::{
    Delivery, ErrorKind, EventBus, Message, PublishOptions, SubscribeOptions, Subscriber,
};
use busbar_nats::NatsBus;
use tokio::process::{Child, Command};

mod common;
use common::servers;

struct Server {
    bin: String,
    port: u16,
    dir: std::path::PathBuf,
    auth: Option<(&'static str, &'static str)>,
    child: Option<Child>,
}

impl Server {
    async fn start(bin: &str, auth: Option<(&'static str, &'static str)>) -> Result<Self, Failed> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("busbar-nats-test-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            bin: bin.to_owned(),
            port,
            dir,
            auth,
            child: None,
        };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> TestResult {
        let mut cmd = Command::new(&self.bin);
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
        wait_until_listening(self.port, Duration::from_secs(10), "nats-server").await?;
        Ok(())
    }

    /// Takes the server down as `how` says (SIGTERM: nats-server's own orderly shutdown).
    async fn stop(&mut self, how: Stop) -> TestResult {
        match self.child.take() {
            Some(mut c) => stop_process(&mut c, how, false, Duration::from_secs(30)).await,
            None => Ok(()),
        }
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

#[async_trait::async_trait]
impl Restartable for Server {
    async fn take_down(&mut self, how: Stop) -> TestResult {
        self.stop(how).await
    }

    async fn bring_back(&mut self) -> TestResult {
        self.spawn().await
    }
}

/// The server goes down (`how`) and comes back on the same store mid-stream, while a consumer
/// reads and publishes go on: every publish that returned Ok is handled, each key's messages
/// first handled in publish order.
async fn restart_mid_stream(bin: String, how: Stop) -> TestResult {
    let mut server = Server::start(&bin, None).await?;
    let bus = NatsBus::connect(&format!("{}?lease_ttl_ms=2000", server.url())).await?;
    let topic = "restart";
    let opts = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(3));
    bus.provision(topic, &opts).await?;
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    let plan = RestartPlan {
        while_down: 3,
        after: 200,
        publish_limit: Duration::from_secs(30),
        ack_timeout: Duration::from_secs(3),
        handled_within: Duration::from_secs(90),
        ..RestartPlan::default()
    };
    restart(shared, topic, &mut server, how, &plan).await?;
    Ok(())
}

/// Lease TTL of the hand-over tests, short so that a crashed member's leases expire fast.
const LEASE_TTL_MS: u64 = 600;
/// Ack wait of the hand-over tests: long enough for the whole hand-over to happen inside it.
const HANDOVER_ACK_WAIT: Duration = Duration::from_secs(4);

/// The current value of a partition lease of group `g` (see the README's layout: one message
/// per subject on the lease stream of the lease TTL), or `None` when it expired.
async fn lease_value(
    client: &async_nats::Client,
    topic: &str,
    p: u32,
) -> Result<Option<Vec<u8>>, Failed> {
    let subject = format!("busbar-lease.{LEASE_TTL_MS}.{topic}.g.p{p}");
    let request = serde_json::json!({ "last_by_subj": subject });
    let reply = client
        .request(
            format!("$JS.API.STREAM.MSG.GET.BUSBAR_LEASES_{LEASE_TTL_MS}"),
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

/// A key of each of `partitions` partitions.
fn key_per_partition(partitions: u32) -> Vec<String> {
    (0..partitions)
        .map(|p| {
            (0..)
                .map(|i| format!("k{i}"))
                .find(|k| busbar_nats::partition_for(k, partitions) == p)
                .unwrap_or_default()
        })
        .collect()
}

/// A group after a crash and a take-over: the member that took the crashed member's
/// partitions is still within its wait, nothing redelivered yet.
struct TakenOver {
    url: String,
    keys: Vec<String>,
    opts: SubscribeOptions,
    /// The crashed member's bus (still connected) and the taking-over member's.
    buses: Vec<NatsBus>,
    /// The taking-over member's subscription.
    sub: Box<dyn Subscriber>,
}

/// On a topic of `partitions` partitions, publishes "first" and "second" for one key per
/// partition, lets a member take them all, extends every "first"'s deadline a second later
/// (as the runner does before a retry: JetStream alone would now redeliver each key's
/// "second" first) and crashes that member; then subscribes a second member and waits until
/// it holds every partition's lease.
async fn crash_then_take_over(
    server: &Server,
    topic: &str,
    partitions: u32,
) -> Result<TakenOver, Failed> {
    let url = format!(
        "{}?partitions={partitions}&lease_ttl_ms={LEASE_TTL_MS}",
        server.url()
    );
    let keys = key_per_partition(partitions);
    let opts = SubscribeOptions::new("g").ack_timeout(HANDOVER_ACK_WAIT);
    let leases = async_nats::connect(server.url()).await?;
    let crashing = NatsBus::connect(&url).await?;
    crashing.provision(topic, &opts).await?;
    for key in &keys {
        for payload in ["first", "second"] {
            let m = Message::new(payload).with_key(key.as_str());
            crashing
                .publish(topic, m, &PublishOptions::default())
                .await?;
        }
    }
    let mut sub = crashing.subscribe(topic, opts.clone()).await?;
    let mut held = Vec::new();
    for _ in 0..keys.len() * 2 {
        held.push(next_within(&mut sub, "delivery to the first member").await?);
    }
    let crashed = lease_value(&leases, topic, 0)
        .await?
        .ok_or("the first member holds no lease")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for d in held.iter().filter(|d| d.payload().as_ref() == b"first") {
        d.extend_deadline(HANDOVER_ACK_WAIT).await?;
    }
    // Crash: nothing is acked, nacked or released.
    drop((held, sub));

    let taking_over = NatsBus::connect(&url).await?;
    let sub = taking_over.subscribe(topic, opts.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in 0..partitions {
        loop {
            let v = lease_value(&leases, topic, p).await?;
            if v.is_some_and(|v| !v.is_empty() && v != b"-hold-" && v != crashed) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("no member took partition {p} within 10 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(TakenOver {
        url,
        keys,
        opts,
        buses: vec![crashing, taking_over],
        sub,
    })
}

/// Receives `n` deliveries from any of `subs`, acks them and returns each key's payloads in
/// the order they were handed out.
async fn receive_by_key(
    subs: &mut [Box<dyn Subscriber>],
    n: usize,
) -> Result<BTreeMap<String, Vec<String>>, Failed> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < n {
        if Instant::now() > deadline {
            return Err(format!("{got} of {n} redeliveries within 30 s: {by_key:?}").into());
        }
        for sub in subs.iter_mut() {
            let Ok(d) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await else {
                continue;
            };
            let d = d?.ok_or("a subscription ended")?;
            let key = d.key().unwrap_or_default().to_string();
            let payload = String::from_utf8_lossy(d.payload()).into_owned();
            by_key.entry(key).or_default().push(payload);
            d.ack().await?;
            got += 1;
        }
    }
    Ok(by_key)
}

fn expect_in_order(by_key: &BTreeMap<String, Vec<String>>, keys: &[String]) -> TestResult {
    for key in keys {
        if by_key.get(key).map(Vec::as_slice) != Some(&["first".to_string(), "second".into()][..]) {
            return Err(format!("key {key} redelivered out of order: {by_key:?}").into());
        }
    }
    Ok(())
}

/// A member that takes over a crashed member's partition waits one ack wait, then hands out
/// what the crashed member left unacked in stream order. When it leaves the group during that
/// wait, the next owner must wait as well.
async fn handover_during_recovery_keeps_key_order(bin: String) -> TestResult {
    let server = Server::start(&bin, None).await?;
    let mut t = crash_then_take_over(&server, "handover", 1).await?;
    // Still within its wait: leave the group, handing the partition over.
    t.sub.close().await?;
    let next_owner = NatsBus::connect(&t.url).await?;
    let sub3 = next_owner.subscribe("handover", t.opts.clone()).await?;
    let by_key = receive_by_key(&mut [sub3], 2).await?;
    expect_in_order(&by_key, &t.keys)?;
    t.buses.push(next_owner);
    for bus in t.buses {
        bus.close().await?;
    }
    Ok(())
}

/// The same through a rebalance: the member that took over both partitions of a crashed
/// member gives one up to a member joining during its wait; both keys still come back in
/// order, whichever partition moved.
async fn rebalance_during_recovery_keeps_key_order(bin: String) -> TestResult {
    let server = Server::start(&bin, None).await?;
    let mut t = crash_then_take_over(&server, "rebalance", 2).await?;
    // Joins within the second member's wait: one of the two partitions moves to it.
    let joining = NatsBus::connect(&t.url).await?;
    let sub3 = joining.subscribe("rebalance", t.opts.clone()).await?;
    let by_key = receive_by_key(&mut [t.sub, sub3], 4).await?;
    expect_in_order(&by_key, &t.keys)?;
    t.buses.push(joining);
    for bus in t.buses {
        bus.close().await?;
    }
    Ok(())
}

/// A message another program published on the topic's subject (no busbar headers) is
/// delivered with what can be read — its payload, its headers, an id from its stream sequence
/// — where it used to be dead-lettered.
async fn foreign_messages_are_delivered(bin: String) -> TestResult {
    let server = Server::start(&bin, None).await?;
    let bus = NatsBus::connect(&format!("{}?partitions=1", server.url())).await?;
    let topic = "foreign";
    let opts = SubscribeOptions::new("g");
    bus.provision(topic, &opts).await?;
    let client = async_nats::connect(format!("127.0.0.1:{}", server.port))
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Origin", "legacy");
    let ack = js
        .publish_with_headers(
            busbar_nats::config::subject(topic, 0),
            headers,
            "legacy payload".into(),
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let ours = Message::new("ours");
    bus.publish(topic, ours.clone(), &PublishOptions::default())
        .await?;
    let mut sub = bus.subscribe(topic, opts).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .map_err(|_| "the foreign message did not arrive")??
        .ok_or("the subscription ended")?;
    let want = format!("nats-{topic}-{}", ack.sequence);
    if first.id() != want
        || first.payload().as_ref() != b"legacy payload"
        || first.headers().get("Origin") != Some("legacy")
    {
        return Err(format!(
            "got {} {:?} {:?}, expected {want}",
            first.id(),
            String::from_utf8_lossy(first.payload()),
            first.headers()
        )
        .into());
    }
    first.ack().await?;
    let second = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .map_err(|_| "the busbar message did not arrive")??
        .ok_or("the subscription ended")?;
    if second.id() != ours.id {
        return Err(format!("expected {}, got {}", ours.id, second.id()).into());
    }
    second.ack().await?;
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

const INTEROP_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/interop/cloudevents_nats.py"
);

/// busbar's events read by nats-py + the CloudEvents Python SDK as valid binary-mode
/// CloudEvents (attributes percent-decoded: the partition key `ключ-1` used to travel as raw
/// UTF-8, which nats-py turns into U+FFFD), and an event the SDK wrote read by busbar with the
/// same id, type, source, time, data and extensions.
async fn cloudevents_sdk_interop(bin: String) -> TestResult {
    use busbar_conformance::interop;
    let Some(python) = interop::python() else {
        if busbar_conformance::Harness::brokers_required() {
            return Err("BUSBAR_INTEROP_PYTHON is unset: run scripts/brokers.sh up".into());
        }
        eprintln!("IGNORED cloudevents_sdk_interop: no interop clients; run scripts/brokers.sh up");
        return Ok(());
    };
    let server = Server::start(&bin, None).await?;
    let url = format!("nats://127.0.0.1:{}", server.port);
    let bus = NatsBus::connect(&format!("{url}?partitions=1")).await?;
    let topic = "interop";
    let subject = busbar_nats::config::subject(topic, 0);
    let opts = SubscribeOptions::new("g");
    bus.provision(topic, &opts).await?;

    let reader =
        interop::Reader::start(&python, INTEROP_SCRIPT, &["read", &url, &subject, "2"]).await?;
    let sent = interop::sent();
    for m in &sent {
        bus.publish(topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    // NATS header values are percent-encoded, user headers included.
    interop::check_read(reader.read(2).await?, &sent, "acme%20corp")?;

    interop::write(&python, INTEROP_SCRIPT, &["write", &url, &subject]).await?;
    let mut sub = bus.subscribe(topic, opts).await?;
    interop::check_received_written(sub.as_mut(), Duration::from_secs(20)).await?;
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

/// A batch holding a message whose header block the server would refuse (over 64 KiB, though
/// within `message_max_bytes`) is `PayloadTooLarge` and publishes nothing — it used to publish
/// the messages before it, then fail with a retryable `Broker` error.
async fn oversized_headers_publish_nothing(bin: String) -> TestResult {
    let server = Server::start(&bin, None).await?;
    let bus = NatsBus::connect(&server.url()).await?;
    let topic = "headers";
    let opts = SubscribeOptions::new("g");
    bus.provision(topic, &opts).await?;
    let big = Message::new("big").with_header("blob", "\u{1}".repeat(25_000));
    let batch = vec![Message::new("before"), big, Message::new("after")];
    let e = bus
        .publish_batch(topic, batch, &PublishOptions::default())
        .await
        .err()
        .ok_or("the batch was published")?;
    if e.kind() != ErrorKind::PayloadTooLarge {
        return Err(format!("expected PayloadTooLarge, got {:?}: {e}", e.kind()).into());
    }
    let mut sub = bus.subscribe(topic, opts).await?;
    if let Ok(d) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        let d = d?.ok_or("the subscription ended")?;
        return Err(format!(
            "{:?} of the refused batch was published",
            String::from_utf8_lossy(d.payload())
        )
        .into());
    }
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

async fn wrong_password_is_an_auth_error(bin: String) -> TestResult {
    let server = Server::start(&bin, Some(("busbar", "s3cret-pw"))).await?;
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
    busbar_conformance::private_server::main_matrix(
        &servers(),
        &[
            ("killed_server_restart_loses_nothing_acked", |b| {
                Box::pin(restart_mid_stream(b, Stop::Kill))
            }),
            ("stopped_server_restart_loses_nothing_acked", |b| {
                Box::pin(restart_mid_stream(b, Stop::Clean))
            }),
            ("handover_during_recovery_keeps_key_order", |b| {
                Box::pin(handover_during_recovery_keeps_key_order(b))
            }),
            ("rebalance_during_recovery_keeps_key_order", |b| {
                Box::pin(rebalance_during_recovery_keeps_key_order(b))
            }),
            ("foreign_messages_are_delivered", |b| {
                Box::pin(foreign_messages_are_delivered(b))
            }),
            ("oversized_headers_publish_nothing", |b| {
                Box::pin(oversized_headers_publish_nothing(b))
            }),
            ("cloudevents_sdk_interop", |b| {
                Box::pin(cloudevents_sdk_interop(b))
            }),
            ("wrong_password_is_an_auth_error", |b| {
                Box::pin(wrong_password_is_an_auth_error(b))
            }),
        ],
        &[
            ("unreachable_server_is_a_connection_error", || {
                Box::pin(unreachable_server_is_a_connection_error())
            }),
            ("malformed_urls_are_config_errors", || {
                Box::pin(malformed_urls_are_config_errors())
            }),
        ],
    )
}
