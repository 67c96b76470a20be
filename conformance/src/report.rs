//! `BUSBAR_CONFORMANCE_REPORT`: one JSON line per case run, for the compatibility table.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::Harness;

/// Where case results go, if anywhere.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    path: Option<PathBuf>,
}

impl Report {
    pub(crate) fn from_env() -> Self {
        Self {
            path: std::env::var_os("BUSBAR_CONFORMANCE_REPORT")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        }
    }

    /// The record of one case on one server.
    pub(crate) fn entry(&self, harness: &Harness, server: &str, case: &str) -> Entry {
        Entry {
            path: self.path.clone(),
            line: serde_json::json!({
                "backend": harness.backend,
                "server": server,
                "url": busbar_core::raw::redact_url(&harness.url),
                "case": case,
            }),
        }
    }
}

/// One case's record, written once it has a result.
#[derive(Debug)]
pub(crate) struct Entry {
    path: Option<PathBuf>,
    line: serde_json::Value,
}

impl Entry {
    /// Appends the record with its result (`passed`, `failed`, `ignored`); a report that
    /// cannot be written is said on stderr and does not fail the case.
    pub(crate) fn write(&self, result: &str, took: Duration, note: &str) {
        let Some(path) = &self.path else { return };
        let mut line = self.line.clone();
        line["result"] = result.into();
        line["seconds"] = ((took.as_secs_f64() * 100.0).round() / 100.0).into();
        line["note"] = note.into();
        let mut text = line.to_string();
        text.push('\n');
        // One write of the whole line in append mode: lines of parallel cases never mix.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot append to {}: {e}", path.display());
        }
    }
}

/// `host:port` of a URL (no credentials), to name a server that did not report a version.
pub(crate) fn address(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => u.scheme().to_owned(),
        },
        Err(_) => "?".to_owned(),
    }
}
