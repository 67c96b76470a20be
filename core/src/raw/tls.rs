//! The TLS files a broker URL names, read the same way by every backend: `tls_ca` (PEM
//! certificates to trust instead of, or besides, the system's), `tls_cert` and `tls_key` (a
//! client certificate and its private key, for servers that ask for one). They are allowed on
//! the backend's TLS scheme only (`rediss://`, `tls://`, `amqps://`, ...), a certificate
//! needs its key and a key its certificate, and a file that cannot be read or holds no PEM
//! block is a `Config` error naming the option and the path — never the file's contents.
//!
//! A server certificate the client does not trust is an [`ErrorKind::Auth`] error
//! ([`error_is_tls_trust_failure`] tells a backend which of its client's errors are such).

use std::path::{Path, PathBuf};

use super::UrlOption;
use crate::{Error, ErrorKind, Result};

/// The names of the URL options [`TlsFiles::take`] reads.
pub const TLS_OPTIONS: [&str; 3] = ["tls_ca", "tls_cert", "tls_key"];

/// The TLS files of a broker URL (see the module documentation): paths only, never the
/// files' contents (a private key), so its `Debug` text is safe to log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls_ca`: PEM certificates of the authorities to trust.
    pub ca: Option<PathBuf>,
    /// `tls_cert`: the client's PEM certificate (chain).
    pub cert: Option<PathBuf>,
    /// `tls_key`: the client certificate's PEM private key.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Takes `option` when it is one of [`TLS_OPTIONS`] (returns `true`); any other option
    /// is left to the caller (`false`). An empty path is a `Config` error.
    pub fn take(&mut self, option: &UrlOption) -> Result<bool> {
        let slot = match option.key() {
            "tls_ca" => &mut self.ca,
            "tls_cert" => &mut self.cert,
            "tls_key" => &mut self.key,
            _ => return Ok(false),
        };
        if option.value().is_empty() {
            return Err(option.invalid("must be the path of a PEM file"));
        }
        *slot = Some(PathBuf::from(option.value()));
        Ok(true)
    }

    /// Whether no TLS file is named.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Checks the combination: files only with TLS on (`tls_on`; `tls_scheme` names the
    /// scheme that turns it on, for the error), a certificate with its key and a key with its
    /// certificate.
    pub fn check(
        &self,
        tls_on: bool,
        broker: &str,
        tls_scheme: &str,
        backend: &'static str,
    ) -> Result<()> {
        let error = |msg: String| Error::new(ErrorKind::Config, msg).with_backend(backend);
        if !tls_on && !self.is_empty() {
            return Err(error(format!(
                "the {broker} URL options tls_ca, tls_cert and tls_key need TLS: use a {tls_scheme} URL"
            )));
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(error(format!(
                "the {broker} URL option tls_cert needs tls_key (the certificate's private key)"
            ))),
            (None, Some(_)) => Err(error(format!(
                "the {broker} URL option tls_key needs tls_cert (the client certificate)"
            ))),
            _ => Ok(()),
        }
    }

    /// The PEM text of `tls_ca`, when named.
    pub fn read_ca(&self, backend: &'static str) -> Result<Option<Vec<u8>>> {
        self.ca
            .as_deref()
            .map(|p| read_pem("tls_ca", p, backend))
            .transpose()
    }

    /// The PEM texts of `tls_cert` and `tls_key`, when both are named.
    pub fn read_identity(&self, backend: &'static str) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((
                read_pem("tls_cert", cert, backend)?,
                read_pem("tls_key", key, backend)?,
            ))),
            _ => Ok(None),
        }
    }
}

/// The contents of the PEM file at `path`, named by URL option `option`. Errors (`Config`)
/// name the option and the path, never what the file holds.
pub fn read_pem(option: &str, path: &Path, backend: &'static str) -> Result<Vec<u8>> {
    let error = |why: String| {
        Error::new(
            ErrorKind::Config,
            format!("URL option {option}: {} {why}", path.display()),
        )
        .with_backend(backend)
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot be read ({e})")))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(error("is not a PEM file (no -----BEGIN line)".into()));
    }
    Ok(bytes)
}

/// Whether an error text of a TLS library says the server's certificate is not trusted
/// (unknown issuer, self-signed, bad signature, name mismatch, expired).
pub fn is_tls_trust_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "invalid peer certificate",
        "unknownissuer",
        "unknown issuer",
        "certificate verify failed",
        "self signed certificate",
        "self-signed certificate",
        "badsignature",
        "notvalidforname",
        "certificate has expired",
        "certnotvalidyet",
        "unable to get local issuer certificate",
    ]
    .iter()
    .any(|needle| t.contains(needle))
}

/// Whether `e` or one of its sources says the server's certificate is not trusted (see
/// [`is_tls_trust_failure`]); each is read by its `Display` and its `Debug` text.
pub fn error_is_tls_trust_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if is_tls_trust_failure(&e.to_string()) || is_tls_trust_failure(&format!("{e:?}")) {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::UrlOptions;
    use std::fmt;

    fn files(query: &str) -> Result<TlsFiles> {
        let mut files = TlsFiles::default();
        for o in UrlOptions::parse("Test", "test", Some(query)) {
            assert!(files.take(&o)?, "{} taken", o.key());
        }
        Ok(files)
    }

    #[test]
    fn options_are_checked_together() {
        let f = files("tls_ca=/a&tls_cert=/b&tls_key=/c").expect("parsed");
        assert_eq!(f.ca.as_deref(), Some(Path::new("/a")));
        f.check(true, "Test", "tests://", "test").expect("complete");
        let e = f
            .check(false, "Test", "tests://", "test")
            .expect_err("no TLS");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("tests://"), "{e}");
        for half in ["tls_cert=/b", "tls_key=/c"] {
            let e = files(half)
                .expect("parsed")
                .check(true, "Test", "tests://", "test")
                .expect_err(half);
            assert_eq!(e.kind(), ErrorKind::Config, "{half}");
        }
        assert_eq!(
            files("tls_ca=").expect_err("empty").kind(),
            ErrorKind::Config
        );
        let mut f = TlsFiles::default();
        let other = UrlOptions::parse("Test", "test", Some("x=1"))
            .into_iter()
            .next();
        assert!(!f.take(&other.expect("one")).expect("not ours"));
        assert!(f.is_empty());
    }

    #[test]
    fn unreadable_and_non_pem_files_are_config_errors_without_contents() {
        let dir = std::env::temp_dir().join(format!("busbar-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let secret = dir.join("key.txt");
        std::fs::write(&secret, "hunter2-not-pem").expect("write");
        let e = read_pem("tls_key", &secret, "test").expect_err("not PEM");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("tls_key"), "{e}");
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
        let e = read_pem("tls_ca", &dir.join("missing.pem"), "test").expect_err("missing");
        assert_eq!(e.kind(), ErrorKind::Config);
        let pem = dir.join("ok.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(read_pem("tls_ca", &pem, "test").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn trust_failures_are_recognised_through_sources() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("connecting failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(error_is_tls_trust_failure(&Outer(inner)));
        let refused = std::io::Error::other("connection refused");
        assert!(!error_is_tls_trust_failure(&Outer(refused)));
    }
}
