//! For TLS and auth tests of private brokers: certificates made here with the `openssl` CLI
//! (a CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a second
//! CA that signed nothing the servers use), every log line of the process captured at TRACE
//! level, and the checks such a test makes: a failure is an `Auth` error, no secret appears in
//! an error's `Display` or `Debug` nor in any log line, and a message goes through.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use busbar_core::{ErrorKind, EventBus, Message, PublishOptions, SubscribeOptions};

use crate::private_server::{Failed, TestResult};

/// Certificates for one test (in a temporary directory, removed on drop). Keys are EC P-256
/// in PKCS#8 PEM; certificates are valid for two days.
#[derive(Debug)]
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// Makes a CA, a server certificate (SAN `IP:127.0.0.1`, `DNS:localhost`), a client
    /// certificate and an unrelated CA with `openssl`, in a fresh directory named after `name`.
    pub fn make(name: &str) -> Result<Self, Failed> {
        let dir = std::env::temp_dir().join(format!(
            "busbar-certs-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let certs = Self { dir };
        certs.ca("ca", "busbar test CA")?;
        certs.ca("other-ca", "busbar unrelated CA")?;
        certs.leaf(
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        )?;
        certs.leaf(
            "client",
            "busbar-client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        )?;
        Ok(certs)
    }

    fn openssl(&self, args: &[&str]) -> TestResult {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("cannot run openssl (is it installed?): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(())
    }

    fn ca(&self, name: &str, subject: &str) -> TestResult {
        let (key, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={subject}"),
        );
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    fn leaf(&self, name: &str, cn: &str, extensions: &str) -> TestResult {
        let (key, csr, pem, ext, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
            format!("/CN={cn}"),
        );
        std::fs::write(self.dir.join(&ext), extensions)?;
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA that signed the server and client certificates.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA that signed neither (a client trusting only it must refuse the server).
    pub fn other_ca_pem(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// The server's certificate.
    pub fn server_pem(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client's certificate.
    pub fn client_pem(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// The base64 bodies of every private key here: what must never be printed or logged.
    pub fn key_texts(&self) -> Result<Vec<String>, Failed> {
        let mut texts = Vec::new();
        for name in ["ca.key", "other-ca.key", "server.key", "client.key"] {
            let pem = std::fs::read_to_string(self.dir.join(name))?;
            texts.extend(
                pem.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() > 16)
                    .map(str::to_owned),
            );
        }
        Ok(texts)
    }

    /// `tls_ca=…&tls_cert=…&tls_key=…` for a client trusting `ca` and presenting the client
    /// certificate (paths percent-encoded for a URL's query).
    pub fn client_options(&self, ca: &Path) -> String {
        let enc = |p: PathBuf| {
            url::form_urlencoded::byte_serialize(p.to_string_lossy().as_bytes()).collect::<String>()
        };
        format!(
            "tls_ca={}&tls_cert={}&tls_key={}",
            enc(ca.to_path_buf()),
            enc(self.client_pem()),
            enc(self.client_key())
        )
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every log line of the process since [`capture_logs`], at TRACE level.
#[derive(Debug, Clone, Default)]
pub struct CapturedLogs {
    lines: Arc<Mutex<Vec<u8>>>,
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lines
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// What was logged so far.
    pub fn text(&self) -> String {
        self.lines
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default()
    }

    /// Fails if any of `secrets` appears in a log line, or if nothing was logged at all (then
    /// the capture is not working and the check would prove nothing).
    pub fn expect_none_of(&self, secrets: &[String]) -> TestResult {
        let text = self.text();
        if text.is_empty() {
            return Err("no log line was captured: is capture_logs() called first?".into());
        }
        for secret in secrets {
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                return Err(format!("a log line holds a secret: {line}").into());
            }
        }
        Ok(())
    }
}

/// Sends every `tracing` event (and every `log` record) of the process, at TRACE level, into
/// memory, once per process; call it first in the test binary's `main`, before the test
/// runner installs its own subscriber (which then stays unused).
pub fn capture_logs() -> CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            tracing::warn!("capture_logs: another subscriber was installed first");
        }
        let _ = tracing_log::LogTracer::init();
        logs
    })
    .clone()
}

/// Fails unless `attempt` fails with an `Auth` error whose `Display` and `Debug` texts hold
/// none of `secrets`; `what` names the attempt in failures.
pub async fn expect_auth_error<T: std::fmt::Debug>(
    what: &str,
    attempt: impl std::future::Future<Output = busbar_core::Result<T>>,
    secrets: &[String],
) -> TestResult {
    let e = match tokio::time::timeout(Duration::from_secs(60), attempt).await {
        Err(_) => return Err(format!("{what}: no answer within 60 s").into()),
        Ok(Ok(v)) => return Err(format!("{what}: succeeded ({v:?})").into()),
        Ok(Err(e)) => e,
    };
    if e.kind() != ErrorKind::Auth {
        return Err(format!("{what}: expected an Auth error, got {:?}: {e}", e.kind()).into());
    }
    let texts = format!("{e}\n{e:?}");
    if let Some(s) = secrets.iter().find(|s| texts.contains(s.as_str())) {
        return Err(format!("{what}: the error prints the secret {s:?}: {texts}").into());
    }
    Ok(())
}

/// Fails if `text` (`what`: e.g. a bus's `Debug` text) holds one of `secrets`.
pub fn expect_no_secret(what: &str, text: &str, secrets: &[String]) -> TestResult {
    match secrets.iter().find(|s| text.contains(s.as_str())) {
        Some(s) => Err(format!("{what} holds the secret {s:?}").into()),
        None => Ok(()),
    }
}

/// Publishes one message to `topic` and receives it in a fresh group: the connection works.
pub async fn round_trip(bus: &dyn EventBus, topic: &str) -> TestResult {
    // The group exists before the publish (provision), so it gets the message from where it
    // starts; from the earliest message where the broker can.
    let mut options = SubscribeOptions::new("tls-round-trip");
    if bus.capabilities().replay {
        options = options.start(busbar_core::StartPosition::Earliest);
    }
    bus.provision(topic, &options).await?;
    let message = Message::new("over TLS");
    bus.publish(topic, message.clone(), &PublishOptions::default())
        .await?;
    let mut sub = bus.subscribe(topic, options).await?;
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .map_err(|_| "the message did not arrive within 30 s")??
        .ok_or("the subscription ended")?;
    if delivery.id() != message.id {
        return Err(format!("expected {}, got {}", message.id, delivery.id()).into());
    }
    delivery.ack().await?;
    sub.close().await?;
    Ok(())
}

/// The refusals every TLS test checks, with `url(good_credentials, options)` the server's URL
/// and `connect` the backend's connect: a server certificate of the unrelated CA, the system
/// CAs alone, and wrong credentials are `Auth` errors without `secrets`; without a client
/// certificate the server ends the handshake (an error, whatever its kind); a missing CA file
/// is a `Config` error.
pub async fn expect_refusals<T, F, Fut>(
    certs: &TestCerts,
    secrets: &[String],
    url: impl Fn(bool, &str) -> String,
    connect: F,
) -> TestResult
where
    T: std::fmt::Debug,
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = busbar_core::Result<T>>,
{
    let untrusted = certs.client_options(&certs.other_ca_pem());
    expect_auth_error(
        "a server certificate of another CA",
        connect(url(true, &untrusted)),
        secrets,
    )
    .await?;
    let client_only = format!(
        "tls_cert={}&tls_key={}",
        certs.client_pem().display(),
        certs.client_key().display()
    );
    expect_auth_error(
        "the system CAs only",
        connect(url(true, &client_only)),
        secrets,
    )
    .await?;
    let trusted = certs.client_options(&certs.ca_pem());
    expect_auth_error("wrong credentials", connect(url(false, &trusted)), secrets).await?;
    let no_identity = format!("tls_ca={}", certs.ca_pem().display());
    if connect(url(true, &no_identity)).await.is_ok() {
        return Err("connected without the client certificate the server requires".into());
    }
    let missing = format!("tls_ca={}/missing.pem", certs.dir().display());
    match connect(url(true, &missing)).await {
        Err(e) if e.kind() == ErrorKind::Config => Ok(()),
        other => Err(format!("a missing CA file: expected Config, got {other:?}").into()),
    }
}
