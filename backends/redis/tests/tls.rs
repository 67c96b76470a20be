//! `rediss://` against a private redis-server that requires TLS, a client certificate
//! (`tls-auth-clients yes`) and a password, with certificates made by `openssl`: a message goes
//! through; a server certificate of an unknown CA, the system CAs alone, or a wrong password
//! are `Auth` errors; unreadable TLS files are `Config` errors; and no password or private key
//! appears in an error, a `Debug` text or any log line at TRACE level.

use std::process::Stdio;
use std::time::Duration;

use busbar_conformance::private_server::{free_port, wait_until_listening, Failed, TestResult};
use busbar_conformance::tls::{
    capture_logs, expect_no_secret, expect_refusals, round_trip, TestCerts,
};
use busbar_core::EventBus;
use busbar_redis::RedisBus;
use tokio::process::{Child, Command};

const PASSWORD: &str = "tls-s3cret-pw";
const WRONG: &str = "tls-wrong-pw";

/// A private redis-server listening for TLS only.
struct TlsServer {
    port: u16,
    _child: Child,
}

impl TlsServer {
    async fn start(certs: &TestCerts) -> Result<Self, Failed> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0", "--save", ""])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "yes"])
            .arg("--tls-cert-file")
            .arg(certs.server_pem())
            .arg("--tls-key-file")
            .arg(certs.server_key())
            .arg("--tls-ca-cert-file")
            .arg(certs.ca_pem())
            .args(["--requirepass", PASSWORD])
            .arg("--dir")
            .arg(certs.dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        wait_until_listening(
            port,
            Duration::from_secs(10),
            "redis-server (TLS; built without TLS?)",
        )
        .await?;
        Ok(Self {
            port,
            _child: child,
        })
    }

    fn url(&self, password: &str, options: &str) -> String {
        format!("rediss://:{password}@127.0.0.1:{}/?{options}", self.port)
    }
}

async fn tls_and_auth() -> TestResult {
    let logs = capture_logs();
    let certs = TestCerts::make("redis")?;
    let server = TlsServer::start(&certs).await?;
    let mut secrets = certs.key_texts()?;
    secrets.extend([PASSWORD.to_owned(), WRONG.to_owned()]);
    let trusted = certs.client_options(&certs.ca_pem());

    let bus = RedisBus::connect(&server.url(PASSWORD, &trusted)).await?;
    round_trip(&bus, "tls-topic").await?;
    expect_no_secret("the bus's Debug text", &format!("{bus:?}"), &secrets)?;
    bus.close().await?;

    expect_refusals(
        &certs,
        &secrets,
        |good, options| server.url(if good { PASSWORD } else { WRONG }, options),
        |url| async move { RedisBus::connect(&url).await },
    )
    .await?;
    logs.expect_none_of(&secrets)
}

fn main() {
    // First: every log line from here on is captured and checked for secrets.
    capture_logs();
    busbar_conformance::private_server::main(
        "redis-server",
        &[("tls_and_auth", true, || Box::pin(tls_and_auth()))],
    )
}
