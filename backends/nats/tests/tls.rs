//! `tls://` against private nats-servers that require TLS and a client certificate
//! (`--tlsverify`) besides a user and password or a token, with certificates made by
//! `openssl`: a message goes through; a server certificate of an unknown CA, the system CAs
//! alone, a wrong password or a wrong token are `Auth` errors; and no password, token or
//! private key appears in an error, a `Debug` text or any log line at TRACE level. Run once
//! per server of `BUSBAR_NATS_SERVERS` (see `private_server.rs`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use busbar_conformance::private_server::{free_port, Failed, TestResult};
use busbar_conformance::tls::{capture_logs, expect_refusals, round_trip, TestCerts};
use busbar_core::EventBus;
use busbar_nats::NatsBus;
use tokio::process::{Child, Command};

mod common;

/// A private nats-server with JetStream, TLS with client verification, and `auth`.
struct TlsServer {
    port: u16,
    _child: Child,
}

impl TlsServer {
    async fn start(bin: &str, certs: &TestCerts, auth: &[&str]) -> Result<Self, Failed> {
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .arg("-sd")
            .arg(certs.dir().join("store"))
            .args(["--tls", "--tlsverify"])
            .arg("--tlscert")
            .arg(certs.server_pem())
            .arg("--tlskey")
            .arg(certs.server_key())
            .arg("--tlscacert")
            .arg(certs.ca_pem())
            .args(auth)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start nats-server: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("nats-server did not listen within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            port,
            _child: child,
        })
    }

    fn url(&self, credentials: &str, options: &str) -> String {
        format!("tls://{credentials}@127.0.0.1:{}?{options}", self.port)
    }
}

/// With the server started with `auth`, `good` credentials work and `bad` ones (and the good
/// ones over an untrusted server certificate) are `Auth` errors without secrets.
async fn tls_with(bin: String, name: &str, auth: &[&str], good: &str, bad: &str) -> TestResult {
    let logs = capture_logs();
    let certs = TestCerts::make(name)?;
    let server = TlsServer::start(&bin, &certs, auth).await?;
    let mut secrets = certs.key_texts()?;
    // The password or token is the server's last argument (a user name is no secret).
    secrets.extend(auth.last().map(|s| (*s).to_owned()));
    secrets.push(bad.rsplit(':').next().unwrap_or(bad).to_owned());
    let trusted = certs.client_options(&certs.ca_pem());

    let bus = NatsBus::connect(&server.url(good, &trusted)).await?;
    round_trip(&bus, "tls-topic").await?;
    if let Some(s) = secrets
        .iter()
        .find(|s| format!("{bus:?}").contains(s.as_str()))
    {
        return Err(format!("the bus's Debug text holds the secret {s:?}").into());
    }
    bus.close().await?;

    expect_refusals(
        &certs,
        &secrets,
        |ok, options| server.url(if ok { good } else { bad }, options),
        |url| async move { NatsBus::connect(&url).await },
    )
    .await?;
    logs.expect_none_of(&secrets)
}

async fn tls_with_user_and_password(bin: String) -> TestResult {
    tls_with(
        bin,
        "nats-user",
        &["--user", "alice", "--pass", "tls-s3cret-pw"],
        "alice:tls-s3cret-pw",
        "alice:tls-wrong-pw",
    )
    .await
}

async fn tls_with_token(bin: String) -> TestResult {
    tls_with(
        bin,
        "nats-token",
        &["--auth", "tls-s3cret-token"],
        "tls-s3cret-token",
        "tls-wrong-token",
    )
    .await
}

fn main() {
    // First: every log line from here on is captured and checked for secrets.
    capture_logs();
    busbar_conformance::private_server::main_matrix(
        &common::servers(),
        &[
            ("tls_with_user_and_password", |b| {
                Box::pin(tls_with_user_and_password(b))
            }),
            ("tls_with_token", |b| Box::pin(tls_with_token(b))),
        ],
        &[],
    )
}
