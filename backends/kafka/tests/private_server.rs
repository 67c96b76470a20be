//! Tests that need a Kafka broker of their own: a restart of the broker mid-stream (killed
//! with SIGKILL, and stopped cleanly), every connection cut for longer than the group
//! session, an unreachable broker and malformed URLs.
//!
//! The private broker is Apache Kafka (single-node KRaft, from the jars `scripts/brokers.sh
//! up` resolves into `~/.cache/busbar-brokers/kafka-<version>/lib`; `BUSBAR_KAFKA_HOME` points
//! elsewhere), configured from `scripts/kafka/server.properties` on spare loopback ports with a
//! data directory of its own that survives its restarts, and stopped when the test ends.
//! For the outage test the broker advertises a TCP proxy of the test that can cut every
//! connection and refuse new ones.

#![allow(clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use busbar_conformance::private_server::{
    expect_config_errors, expect_connection_error, free_port, publish_retrying,
    restart_mid_stream as restart, stop_process, Failed, Proxy, Recorder, RestartPlan, Restartable,
    Stop, TestResult,
};
use busbar_conformance::tls::{
    capture_logs, expect_no_secret, expect_refusals, round_trip, TestCerts,
};
use busbar_core::{EventBus, Message, PublishOptions};
use busbar_kafka::KafkaBus;
use tokio::process::{Child, Command};

/// The directory whose `lib/` holds the broker's jars.
fn kafka_home() -> Option<PathBuf> {
    if let Ok(h) = std::env::var("BUSBAR_KAFKA_HOME") {
        return Some(PathBuf::from(h));
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let tools = std::env::var("BUSBAR_BROKER_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(home).join(".cache/busbar-brokers"));
    let mut homes: Vec<PathBuf> = std::fs::read_dir(tools)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kafka-"))
                && p.join(".complete").exists()
        })
        .collect();
    homes.sort();
    homes.pop()
}

fn config_template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka")
}

struct Broker {
    home: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The SASL_SSL listener's port, on a broker started with [`Broker::start_tls`].
    tls_port: Option<u16>,
    proxy: Option<Proxy>,
    child: Option<Child>,
}

/// The user the SASL_SSL listener of [`Broker::start_tls`] knows, and its password.
const TLS_USER: &str = "app";
const PASSWORD: &str = "kafka-s3cret-pw";
const WRONG: &str = "kafka-wrong-pw";

impl Broker {
    /// A fresh broker; with `proxied`, clients reach it only through a [`Proxy`].
    async fn start(proxied: bool) -> Result<Self, Failed> {
        Self::start_with(proxied, None).await
    }

    /// A fresh broker with a second listener, SASL_SSL: TLS with the server certificate of
    /// `certs`, a client certificate of their CA required, and SASL/PLAIN with the user
    /// [`TLS_USER`] and the password [`PASSWORD`].
    async fn start_tls(certs: &TestCerts) -> Result<Self, Failed> {
        Self::start_with(false, Some(certs)).await
    }

    async fn start_with(proxied: bool, tls: Option<&TestCerts>) -> Result<Self, Failed> {
        let home = kafka_home().ok_or("no Kafka jars; run scripts/brokers.sh up")?;
        let (port, controller) = (free_port()?, free_port()?);
        let proxy = if proxied {
            Some(Proxy::start(port).await?)
        } else {
            None
        };
        let advertised = proxy.as_ref().map_or(port, Proxy::port);
        let dir =
            std::env::temp_dir().join(format!("busbar-kafka-test-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let template = std::fs::read_to_string(config_template().join("server.properties"))?;
        let config = template
            .replace("@PORT@", &port.to_string())
            .replace("@ADVERTISED_PORT@", &advertised.to_string())
            .replace("@CONTROLLER_PORT@", &controller.to_string())
            .replace("@DATA@", &dir.join("data").to_string_lossy());
        let (config, tls_port) = match tls {
            Some(certs) => {
                let tls_port = free_port()?;
                (tls_listener(config, &dir, certs, tls_port)?, Some(tls_port))
            }
            None => (config, None),
        };
        std::fs::write(dir.join("server.properties"), config)?;
        let cluster = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().as_bytes());
        let format = Self::java(&home)
            // `--cluster-id=<id>`: a random id may start with `-`, which argparse would take
            // for an option after a separate `-t` (seen in CI: 1 start in 64 failed).
            .args([
                "kafka.tools.StorageTool",
                "format",
                &format!("--cluster-id={cluster}"),
                "-c",
            ])
            .arg(dir.join("server.properties"))
            .output()
            .await
            .map_err(|e| format!("cannot run java: {e}"))?;
        if !format.status.success() {
            return Err(format!(
                "formatting the private broker's storage failed: {}",
                String::from_utf8_lossy(&format.stderr)
            )
            .into());
        }
        let mut b = Self {
            home,
            dir,
            port,
            tls_port,
            proxy,
            child: None,
        };
        b.boot().await?;
        Ok(b)
    }

    fn java(home: &Path) -> Command {
        let mut cmd = Command::new("java");
        cmd.arg("-cp").arg(home.join("lib/*")).arg(format!(
            "-Dlog4j2.configurationFile={}",
            config_template().join("log4j2.properties").display()
        ));
        cmd
    }

    async fn boot(&mut self) -> TestResult {
        let log = std::fs::File::create(self.dir.join("broker.log"))?;
        let child = Self::java(&self.home)
            .args(["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "kafka.Kafka"])
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the private Kafka broker: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
            if log.contains("Kafka Server started") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the private Kafka broker did not start within 90 s; its log ends: {}",
                    log.lines().rev().take(10).collect::<Vec<_>>().join(" | ")
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes the broker down (and waits until its process is gone).
    async fn stop(&mut self, how: Stop) -> TestResult {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        stop_process(&mut child, how, false, Duration::from_secs(60)).await
    }

    fn url(&self) -> String {
        let port = self.proxy.as_ref().map_or(self.port, Proxy::port);
        format!("kafka://127.0.0.1:{port}?partitions=4")
    }

    fn proxy(&self) -> Result<&Proxy, Failed> {
        self.proxy.as_ref().ok_or_else(|| "no proxy".into())
    }
}

/// `config` with a SASL_SSL listener on `port` (see [`Broker::start_tls`]); the broker's key
/// goes into a PKCS#12 keystore made with `openssl` in `dir`.
fn tls_listener(
    config: String,
    dir: &Path,
    certs: &TestCerts,
    port: u16,
) -> Result<String, Failed> {
    let keystore = dir.join("server.p12");
    let out = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:keystore-pw", "-in"])
        .arg(certs.server_pem())
        .arg("-inkey")
        .arg(certs.server_key())
        .arg("-out")
        .arg(&keystore)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!("openssl pkcs12: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let listener = format!("SASL_SSL://127.0.0.1:{port}");
    let mut edited = String::new();
    for line in config.lines() {
        match line.split_once('=') {
            Some(("listeners" | "advertised.listeners", _)) => {
                edited += &format!("{line},{listener}\n");
            }
            Some(("listener.security.protocol.map", _)) => {
                edited += &format!("{line},SASL_SSL:SASL_SSL\n");
            }
            _ => edited += &format!("{line}\n"),
        }
    }
    edited += &format!(
        "sasl.enabled.mechanisms=PLAIN\n\
         listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_{TLS_USER}=\"{PASSWORD}\";\n\
         listener.name.sasl_ssl.ssl.client.auth=required\n\
         ssl.keystore.type=PKCS12\n\
         ssl.keystore.location={}\n\
         ssl.keystore.password=keystore-pw\n\
         ssl.key.password=keystore-pw\n\
         ssl.truststore.type=PEM\n\
         ssl.truststore.location={}\n",
        keystore.display(),
        certs.ca_pem().display()
    );
    Ok(edited)
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The broker goes down (`how`) and comes back on the same data mid-stream, while a consumer
/// reads and publishes go on: every publish that returned Ok is handled, each key's messages
/// are first handled in publish order, and producer and consumer recover by themselves.
async fn restart_mid_stream(how: Stop) -> TestResult {
    let mut broker = Broker::start(false).await?;
    let bus = KafkaBus::connect(&broker.url()).await?;
    let topic = "restart";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared
        .provision(topic, &busbar_core::SubscribeOptions::new("g"))
        .await?;
    let plan = RestartPlan {
        before: 400,
        at: 200,
        after: 0,
        ..RestartPlan::default()
    };
    let result = restart(shared, topic, &mut broker, how, &plan).await;
    let _ = bus.close().await;
    result
}

#[async_trait::async_trait]
impl Restartable for Broker {
    async fn take_down(&mut self, how: Stop) -> TestResult {
        self.stop(how).await
    }

    async fn bring_back(&mut self) -> TestResult {
        self.boot().await
    }
}

async fn killed_broker_restart_loses_nothing_and_keeps_key_order() -> TestResult {
    restart_mid_stream(Stop::Kill).await
}

async fn stopped_broker_restart_loses_nothing_and_keeps_key_order() -> TestResult {
    restart_mid_stream(Stop::Clean).await
}

/// Every connection to the broker dies for longer than the group session while a consumer
/// reads and publishes go on: every publish that returned Ok is handled, and consuming
/// resumes by itself.
async fn outage_mid_stream_loses_nothing_acked() -> TestResult {
    let broker = Broker::start(true).await?;
    let bus = KafkaBus::connect(&broker.url()).await?;
    let topic = "restart";
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    shared
        .provision(topic, &busbar_core::SubscribeOptions::new("g"))
        .await?;
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
            broker.proxy()?.cut();
            for j in 0..3 {
                let m = Message::new(format!("down-{j}"));
                let id = m.id.clone();
                match tokio::time::timeout(
                    Duration::from_secs(60),
                    bus.publish(topic, m, &PublishOptions::default()),
                )
                .await
                {
                    Ok(Ok(())) => acked.push(id),
                    Ok(Err(e)) if e.is_retryable() => {}
                    Ok(Err(e)) => return Err(format!("publish while down: {e}").into()),
                    Err(_) => return Err("a publish during the outage hung for 60 s".into()),
                }
                if j == 0 {
                    // Longer than the group session (10 s): the member is evicted.
                    tokio::time::sleep(Duration::from_secs(12)).await;
                    broker.proxy()?.restore();
                }
            }
        }
    }
    for i in 0..200 {
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

/// Where keys land: with `partitioner=consistent_random` busbar places every key where a
/// librdkafka-based client with its defaults does (confluent-kafka, kcat); busbar's default
/// (`murmur2_random`, the Java client's) does not, which the README used to deny.
async fn keys_land_where_the_chosen_partitioner_puts_them() -> TestResult {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::{Header, Headers as _, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message as _;
    let broker = Broker::start(false).await?;
    let topic = "placement";
    let java = KafkaBus::connect(&broker.url()).await?;
    let librdkafka =
        KafkaBus::connect(&format!("{}&partitioner=consistent_random", broker.url())).await?;
    java.provision(topic, &busbar_core::SubscribeOptions::new("g"))
        .await?;
    let bootstrap = broker
        .url()
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap_or_default()
        .to_owned();
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let keys: Vec<String> = (0..40).map(|i| format!("order-{i}")).collect();
    for key in &keys {
        for (source, bus) in [("java", &java), ("librdkafka", &librdkafka)] {
            let m = Message::new("x").with_key(key).with_header("src", source);
            bus.publish(topic, m, &PublishOptions::default()).await?;
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: "src",
            value: Some("raw"),
        });
        raw.send(
            FutureRecord::to(topic)
                .key(key)
                .payload("x")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    }
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "placement-check")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut placed = std::collections::HashMap::new();
    let end = Instant::now() + Duration::from_secs(60);
    while placed.len() < keys.len() * 3 && Instant::now() < end {
        let Some(record) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let record = record?;
        let source = record
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "src"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        placed.insert((source, key), record.partition());
    }
    if placed.len() < keys.len() * 3 {
        return Err(format!("read back {} of {} records", placed.len(), keys.len() * 3).into());
    }
    let at = |source: &str, key: &str| placed.get(&(source.to_owned(), key.to_owned())).copied();
    let same = |source: &str| {
        keys.iter()
            .filter(|k| at(source, k) == at("raw", k))
            .count()
    };
    if same("librdkafka") != keys.len() {
        return Err(format!(
            "partitioner=consistent_random placed {} of {} keys where librdkafka does",
            same("librdkafka"),
            keys.len()
        )
        .into());
    }
    if same("java") == keys.len() {
        return Err("murmur2_random placed every key where librdkafka does: the README's warning would be wrong".into());
    }
    Ok(())
}

/// `kafkas://` with SASL/PLAIN against a SASL_SSL listener that requires a client
/// certificate: a message goes through; a server certificate of another CA, the system CAs
/// alone or a wrong password are `Auth` errors, refused at once rather than after
/// librdkafka's 15 s of retries; no password or private key appears in an error, a `Debug`
/// text or any log line at TRACE level.
async fn tls_and_auth() -> TestResult {
    let logs = capture_logs();
    let certs = TestCerts::make("kafka")?;
    let broker = Broker::start_tls(&certs).await?;
    let port = broker.tls_port.ok_or("no SASL_SSL port")?;
    let url = |password: &str, options: &str| {
        format!("kafkas://{TLS_USER}:{password}@127.0.0.1:{port}?partitions=2&{options}")
    };
    let mut secrets = certs.key_texts()?;
    secrets.extend([PASSWORD.to_owned(), WRONG.to_owned()]);

    let bus = KafkaBus::connect(&url(PASSWORD, &certs.client_options(&certs.ca_pem()))).await?;
    round_trip(&bus, "tls-topic").await?;
    expect_no_secret("the bus's Debug text", &format!("{bus:?}"), &secrets)?;
    bus.close().await?;

    let started = Instant::now();
    expect_refusals(
        &certs,
        &secrets,
        |good, options| url(if good { PASSWORD } else { WRONG }, options),
        |url| async move { KafkaBus::connect(&url).await },
    )
    .await?;
    // Five refusals: each is reported when librdkafka sees it, not after its request
    // timeout (15 s each).
    if started.elapsed() > Duration::from_secs(30) {
        return Err(format!("the refusals took {:?}", started.elapsed()).into());
    }
    drop(broker);
    logs.expect_none_of(&secrets)
}

async fn unreachable_broker_is_a_connection_error() -> TestResult {
    let port = free_port()?;
    expect_connection_error(
        KafkaBus::connect(&format!("kafka://127.0.0.1:{port}")),
        // As fast as the other backends: librdkafka alone retried for 15 s.
        Duration::from_secs(5),
    )
    .await
}

async fn malformed_urls_are_config_errors() -> TestResult {
    expect_config_errors(
        &[
            "kafka://",
            "kafka://127.0.0.1:9092?partitions=zero",
            "kafka://h:notaport",
            "kafka://127.0.0.1:9092?no.such.librdkafka.setting=1",
        ],
        |url| async move { KafkaBus::connect(&url).await },
    )
    .await
}

fn main() {
    // First: every log line from here on is captured and checked for secrets.
    capture_logs();
    let home = kafka_home();
    busbar_conformance::private_server::main_when(
        home.as_ref().is_some_and(|h| h.join("lib").is_dir()),
        "no Apache Kafka jars; run scripts/brokers.sh up (or set BUSBAR_KAFKA_HOME)",
        &[
            (
                "killed_broker_restart_loses_nothing_and_keeps_key_order",
                true,
                || Box::pin(killed_broker_restart_loses_nothing_and_keeps_key_order()),
            ),
            (
                "stopped_broker_restart_loses_nothing_and_keeps_key_order",
                true,
                || Box::pin(stopped_broker_restart_loses_nothing_and_keeps_key_order()),
            ),
            ("outage_mid_stream_loses_nothing_acked", true, || {
                Box::pin(outage_mid_stream_loses_nothing_acked())
            }),
            (
                "keys_land_where_the_chosen_partitioner_puts_them",
                true,
                || Box::pin(keys_land_where_the_chosen_partitioner_puts_them()),
            ),
            ("tls_and_auth", true, || Box::pin(tls_and_auth())),
            ("unreachable_broker_is_a_connection_error", false, || {
                Box::pin(unreachable_broker_is_a_connection_error())
            }),
            ("malformed_urls_are_config_errors", false, || {
                Box::pin(malformed_urls_are_config_errors())
            }),
        ],
    )
}
