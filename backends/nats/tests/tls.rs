//! `tls://` against private nats-servers that require TLS and a client certificate
//! (`--tlsverify`) besides a user and password, a token or an nkey, with certificates made
//! by `openssl`: a message goes through; a server certificate of an unknown CA, the system
//! CAs alone, a wrong password, a wrong token or an unknown nkey are `Auth` errors; and no
//! password, token, nkey seed or private key appears in an error, a `Debug` text or any log
//! line at TRACE level. Run once per server of `BUSBAR_NATS_SERVERS` (see
//! `private_server.rs`).

use std::process::Stdio;
use std::time::Duration;

use busbar_conformance::private_server::{free_port, wait_until_listening, Failed, TestResult};
use busbar_conformance::tls::{
    capture_logs, expect_no_secret, expect_refusals, round_trip, TestCerts,
};
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
        wait_until_listening(port, Duration::from_secs(10), "nats-server").await?;
        Ok(Self {
            port,
            _child: child,
        })
    }

    /// The server's URL with `credentials` (`user:password@`, `token@`, or an option such as
    /// `nkey=...&`) and `options`.
    fn url(&self, credentials: &str, options: &str) -> String {
        match credentials.strip_suffix('&') {
            Some(option) => format!("tls://127.0.0.1:{}?{option}&{options}", self.port),
            None => format!("tls://{credentials}127.0.0.1:{}?{options}", self.port),
        }
    }
}

/// With the server started with `auth`, `good` credentials work and `bad` ones (and the good
/// ones over an untrusted server certificate) are `Auth` errors that, like the `Debug` text
/// and every log line, hold none of `secrets` (nor any private key).
async fn tls_with(
    bin: String,
    certs: TestCerts,
    auth: &[&str],
    (good, bad): (&str, &str),
    secrets: &[&str],
) -> TestResult {
    let logs = capture_logs();
    let server = TlsServer::start(&bin, &certs, auth).await?;
    let mut secrets: Vec<String> = secrets.iter().map(|s| (*s).to_owned()).collect();
    secrets.extend(certs.key_texts()?);
    let trusted = certs.client_options(&certs.ca_pem());

    let bus = NatsBus::connect(&server.url(good, &trusted)).await?;
    round_trip(&bus, "tls-topic").await?;
    expect_no_secret("the bus's Debug text", &format!("{bus:?}"), &secrets)?;
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
        TestCerts::make("nats-user")?,
        &["--user", "alice", "--pass", "tls-s3cret-pw"],
        ("alice:tls-s3cret-pw@", "alice:tls-wrong-pw@"),
        &["tls-s3cret-pw", "tls-wrong-pw"],
    )
    .await
}

async fn tls_with_token(bin: String) -> TestResult {
    tls_with(
        bin,
        TestCerts::make("nats-token")?,
        &["--auth", "tls-s3cret-token"],
        ("tls-s3cret-token@", "tls-wrong-token@"),
        &["tls-s3cret-token", "tls-wrong-token"],
    )
    .await
}

/// nkey authentication: the server knows one user's public key; the client signs the
/// server's nonce with the seed in the file its URL names (`nkey=`). A seed the server does
/// not know is an `Auth` error, a file that holds no seed a `Config` error, and no seed
/// appears anywhere.
async fn tls_with_nkey(bin: String) -> TestResult {
    let certs = TestCerts::make("nats-nkey")?;
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let (seed, stranger_seed) = (user.seed()?, stranger.seed()?);
    let dir = certs.dir().to_path_buf();
    let (good_file, bad_file, junk_file) = (
        dir.join("app.nk"),
        dir.join("stranger.nk"),
        dir.join("junk.nk"),
    );
    std::fs::write(&good_file, format!("{seed}\n"))?;
    std::fs::write(&bad_file, &stranger_seed)?;
    std::fs::write(&junk_file, "SUnot-a-seed-at-all")?;
    let conf = dir.join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )?;
    let option = |file: &std::path::Path| format!("nkey={}&", file.display());
    let (good, bad) = (option(&good_file), option(&bad_file));
    let config = conf.to_string_lossy().into_owned();
    let junk = NatsBus::connect(&format!("nats://127.0.0.1:1?nkey={}", junk_file.display())).await;
    match junk {
        Err(e) if e.kind() == busbar_core::ErrorKind::Config => {}
        other => {
            return Err(format!("a file without a seed: expected Config, got {other:?}").into())
        }
    }
    tls_with(
        bin,
        certs,
        &["-c", &config],
        (&good, &bad),
        &[&seed, &stranger_seed],
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
            ("tls_with_nkey", |b| Box::pin(tls_with_nkey(b))),
        ],
        &[],
    )
}
