//! The operator's commands end to end, as separate processes against every broker of
//! `BUSBAR_*_URL` (the first server of each list): `busbar tail --json` follows a topic while
//! `busbar publish` sends to it (ids, order, key, type, headers, data as published), and
//! `busbar lag` counts what the group has not received. A backend whose URL is unset, or whose
//! feature this build lacks, is IGNORED (FAILED with `BUSBAR_REQUIRE_BROKERS=1`).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use busbar_conformance::interop::fresh_name;
use busbar_conformance::private_server::TestResult;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BUSBAR: &str = env!("CARGO_BIN_EXE_busbar");

/// `busbar args…`: its exit status, stdout and stderr.
async fn status(args: &[&str]) -> Result<(bool, String, String), String> {
    let out = Command::new(BUSBAR)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(BUSBAR)
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "busbar {args:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `busbar lag` until it says `want` (brokers count lag asynchronously) or 30 s pass.
async fn lag_reaches(url: &str, topic: &str, group: &str, want: u64) -> TestResult {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(&["lag", url, topic, group, "--json"]).await?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        if v["lag"] == want {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("busbar lag said {v}, expected {want}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn publish_tail_and_lag(url: String) -> TestResult {
    let topic = fresh_name("cli");
    let mut tail = Command::new(BUSBAR)
        .args([
            "tail", &url, &topic, "--group", "ops", "--json", "--count", "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut err = BufReader::new(tail.stderr.take().ok_or("no stderr")?).lines();
    let said = tokio::time::timeout(Duration::from_secs(60), err.next_line())
        .await
        .map_err(|_| "busbar tail never started")??
        .unwrap_or_default();
    if !said.starts_with("tailing") {
        return Err(format!("busbar tail said {said:?}").into());
    }
    let ids = run(&[
        "publish",
        &url,
        &topic,
        "order {seq}",
        "--count",
        "3",
        "--key",
        "k1",
        "--type",
        "order.created",
        "--header",
        "tenant=acme",
    ])
    .await?;
    let ids: Vec<&str> = ids.lines().collect();
    if ids.len() != 3 {
        return Err(format!("busbar publish printed {ids:?}").into());
    }
    let mut out = BufReader::new(tail.stdout.take().ok_or("no stdout")?).lines();
    for (i, id) in ids.iter().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
            .await
            .map_err(|_| format!("busbar tail showed {i} of 3"))??
            .ok_or("busbar tail ended early")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let want = serde_json::json!({
            "id": id, "key": "k1", "type": "order.created", "data": format!("order {}", i + 1),
            "topic": topic,
        });
        for (name, value) in want.as_object().ok_or("object")? {
            if &v[name] != value {
                return Err(
                    format!("event {i}: {name} is {}, expected {value} ({v})", v[name]).into(),
                );
            }
        }
        if v["headers"]["tenant"] != "acme" {
            return Err(format!("event {i} lost its header: {v}").into());
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), tail.wait())
        .await
        .map_err(|_| "busbar tail did not stop after --count 3")??;
    if !status.success() {
        return Err(format!("busbar tail exited with {status}").into());
    }
    lag_reaches(&url, &topic, "ops", 0).await?;
    run(&["publish", &url, &topic, "more", "--count", "4", "-q"]).await?;
    lag_reaches(&url, &topic, "ops", 4).await?;
    Ok(())
}

/// `busbar dlq list/show/redrive/purge` on three dead letters the library made.
async fn dlq_commands(url: String) -> TestResult {
    use busbar::{Message, NackAction, PublishOptions, SubscribeOptions};
    let topic = fresh_name("cli-dlq");
    let dlq = format!("{topic}.dlq");
    let bus = busbar::connect(&url).await?;
    bus.provision(&topic, &SubscribeOptions::new("g")).await?;
    bus.provision(&dlq, &SubscribeOptions::new("busbar-redrive"))
        .await?;
    let mut sub = bus.subscribe(&topic, SubscribeOptions::new("g")).await?;
    let mut ids = Vec::new();
    for i in 1..=3 {
        let m = Message::new(format!("poison {i}")).with_key(format!("k{i}"));
        ids.push(m.id.clone());
        bus.publish(&topic, m, &PublishOptions::default()).await?;
    }
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .map_err(|_| "a message never arrived")??
            .ok_or("the subscription ended")?;
        let reason = format!("bad {}", d.key().unwrap_or_default());
        d.nack(NackAction::DeadLetter { reason }).await?;
    }
    let listed = run(&["dlq", "list", &url, &topic, "--json"]).await?;
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut listed_ids: Vec<&str> = listed.iter().filter_map(|v| v["id"].as_str()).collect();
    listed_ids.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    if listed_ids != want || listed[0]["headers"]["busbar-dlq-error"].as_str().is_none() {
        return Err(format!("busbar dlq list printed {listed:?}, expected {ids:?}").into());
    }
    let shown = run(&["dlq", "show", &url, &topic, &ids[1]]).await?;
    if !shown.contains("busbar-dlq-error: bad k2") || !shown.contains("poison 2") {
        return Err(format!("busbar dlq show printed {shown}").into());
    }
    let moved = run(&["dlq", "redrive", &url, &topic, &ids[1]]).await?;
    if moved.trim() != ids[1] {
        return Err(format!("busbar dlq redrive printed {moved:?}").into());
    }
    let back = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .map_err(|_| "the redriven message never came back")??
        .ok_or("the subscription ended")?;
    if back.id() != ids[1] {
        return Err(format!("{} came back instead of {}", back.id(), ids[1]).into());
    }
    back.ack().await?;
    let (ok, _, err) = status(&["dlq", "purge", &url, &topic, &ids[0]]).await?;
    if ok || !err.contains("--yes") {
        return Err(format!("purge without --yes and without a terminal: ok={ok}, {err}").into());
    }
    run(&["dlq", "purge", &url, &topic, &ids[0], "--yes"]).await?;
    let rest = run(&["dlq", "redrive", &url, &topic, "--all"]).await?;
    if rest.trim() != ids[2] {
        return Err(format!(
            "after purge and redrive, --all moved {rest:?}, expected {}",
            ids[2]
        )
        .into());
    }
    let (ok, _, err) = status(&["dlq", "redrive", &url, &topic, &ids[0]]).await?;
    if ok || !err.contains("not found") {
        return Err(format!("redrive of a purged id: ok={ok}, {err}").into());
    }
    // What was redriven or purged is no longer a dead letter: list and show say so (a log
    // broker still holds it in the dead-letter topic's history).
    let left = run(&["dlq", "list", &url, &topic, "--json"]).await?;
    if !left.trim().is_empty() {
        return Err(
            format!("after redriving and purging all three, dlq list printed {left}").into(),
        );
    }
    let (ok, shown, _) = status(&["dlq", "show", &url, &topic, &ids[0]]).await?;
    if ok {
        return Err(format!("dlq show of a purged dead letter printed {shown}").into());
    }
    sub.close().await?;
    bus.close().await?;
    Ok(())
}

/// `busbar trace` prints a chain (root, a consequence, a dead letter of it) as a tree, and
/// `busbar tail --from TIME` shows what the topic already holds — where the backend can browse;
/// elsewhere both say so.
async fn trace_and_history(url: String) -> TestResult {
    use busbar::{Message, PublishOptions};
    let bus = busbar::connect(&url).await?;
    let (orders, invoices) = (fresh_name("cli-orders"), fresh_name("cli-invoices"));
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let root = Message::new("order 42").with_type("order.placed");
    let child = Message::new("invoice")
        .with_type("invoice.created")
        .caused_by(&root);
    let dead = Message::new("payment")
        .with_type("payment.requested")
        .caused_by(&child)
        .with_header("busbar-dlq-error", "card declined");
    let args = [
        "trace", &url, &root.id, "--topic", &orders, "--topic", &invoices,
    ];
    if !bus.capabilities().browse {
        let (ok, _, err) = status(&args).await?;
        if ok || !err.contains("browse") {
            return Err(format!("trace without browse: ok={ok}, {err}").into());
        }
        return Ok(());
    }
    for (topic, m) in [
        (&orders, &root),
        (&invoices, &child),
        (&format!("{invoices}.dlq"), &dead),
    ] {
        bus.publish(topic, m.clone(), &PublishOptions::default())
            .await?;
    }
    bus.close().await?;
    let tree = run(&args).await?;
    let lines: Vec<&str> = tree.lines().collect();
    let expected = [
        format!("order.placed {}", root.id),
        format!("└─ invoice.created {}", child.id),
        format!("   └─ payment.requested {}", dead.id),
    ];
    if lines.len() != 3
        || !lines
            .iter()
            .zip(&expected)
            .all(|(l, e)| l.starts_with(e.as_str()))
        || !lines[2].contains("DEAD LETTER: card declined")
    {
        return Err(
            format!("busbar trace printed:\n{tree}expected lines starting {expected:?}").into(),
        );
    }
    let history = run(&[
        "tail",
        &url,
        &orders,
        "--from",
        &before.to_rfc3339(),
        "--json",
        "--count",
        "1",
    ])
    .await?;
    let v: serde_json::Value = serde_json::from_str(history.trim())?;
    if v["id"] != root.id.as_str() || !v["attempt"].is_null() {
        return Err(format!("tail --from showed {v}").into());
    }
    Ok(())
}

/// A chromedriver process and its HTTP address (WebDriver, JSON over HTTP/1.1).
#[cfg(all(feature = "sse", feature = "redis"))]
#[derive(Clone)]
struct WebDriver {
    addr: String,
    _child: std::sync::Arc<tokio::process::Child>,
}

#[cfg(all(feature = "sse", feature = "redis"))]
impl WebDriver {
    async fn start(binary: &str) -> Result<Self, busbar_conformance::private_server::Failed> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {binary} (BUSBAR_CHROMEDRIVER): {e}"))?;
        let addr = format!("127.0.0.1:{port}");
        let end = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if Instant::now() > end {
                return Err("chromedriver did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            addr,
            _child: std::sync::Arc::new(child),
        })
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, busbar_conformance::private_server::Failed> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = tokio::net::TcpStream::connect(&self.addr).await?;
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.addr,
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        // chromedriver keeps the connection open: read the head, then Content-Length bytes.
        let read = async {
            let mut raw = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
            Ok::<_, std::io::Error>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .map_err(|_| format!("chromedriver did not answer {method} {path}"))??;
        let text = String::from_utf8_lossy(&raw);
        let (head, json) = text
            .split_once("\r\n\r\n")
            .ok_or("chromedriver answered without a body")?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("chromedriver {method} {path}: {head} {json}").into());
        }
        Ok(serde_json::from_str(json)?)
    }

    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, busbar_conformance::private_server::Failed> {
        self.request("POST", path, Some(body)).await
    }

    async fn delete(
        &self,
        path: &str,
    ) -> Result<serde_json::Value, busbar_conformance::private_server::Failed> {
        self.request("DELETE", path, None).await
    }

    /// A headless Chromium session; its id.
    async fn session(
        &self,
        chromium: &str,
    ) -> Result<String, busbar_conformance::private_server::Failed> {
        let v = self
            .post(
                "/session",
                serde_json::json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
                    },
                }}}),
            )
            .await?;
        v["value"]["sessionId"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no session: {v}").into())
    }
}

/// `busbar tail --sse`: a client reconnecting with `Last-Event-ID: 1` gets event 2 (not 1),
/// then event 3 live; headless Chromium (through chromedriver) shows the page connected
/// ("live") with all three, and a fourth as it arrives.
#[cfg(all(feature = "sse", feature = "redis"))]
async fn sse_live_view(url: String) -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chromium =
        std::env::var("BUSBAR_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let chromedriver =
        std::env::var("BUSBAR_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned());
    let topic = fresh_name("cli-sse");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut tail = Command::new(BUSBAR)
        .args(["tail", &url, &topic, "--json", "--sse", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut err = BufReader::new(tail.stderr.take().ok_or("no stderr")?).lines();
    for want in ["serving", "tailing"] {
        let said = tokio::time::timeout(Duration::from_secs(60), err.next_line())
            .await
            .map_err(|_| "busbar tail --sse never started")??
            .unwrap_or_default();
        if !said.starts_with(want) {
            return Err(format!("busbar tail --sse said {said:?}").into());
        }
    }
    let publish = |n: &'static str| {
        let (url, topic) = (url.clone(), topic.clone());
        async move { run(&["publish", &url, &topic, n, "--key", "k"]).await }
    };
    let mut ids = vec![publish("one").await?.trim().to_owned()];
    ids.push(publish("two").await?.trim().to_owned());
    let mut http = tokio::net::TcpStream::connect(&addr).await?;
    http.write_all(
        format!("GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nLast-Event-ID: 1\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut read_until = async |want: &str, seen: &mut String| -> TestResult {
        let end = Instant::now() + Duration::from_secs(30);
        while !seen.contains(want) {
            let left = end.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, http.read(&mut buf))
                .await
                .map_err(|_| format!("no {want:?} in the SSE stream: {seen}"))??;
            if n == 0 {
                return Err(format!("the SSE stream ended: {seen}").into());
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(())
    };
    read_until("id: 2\n", &mut seen).await?;
    if seen.contains("id: 1\n") || !seen.contains(ids[1].as_str()) {
        return Err(format!("Last-Event-ID: 1 should replay event 2 only: {seen}").into());
    }
    ids.push(publish("three").await?.trim().to_owned());
    read_until(&ids[2], &mut seen).await?;
    // The page in headless Chromium, driven through chromedriver (WebDriver): it connects,
    // catches up and shows the three events, live; then a fourth arrives while it is open.
    let driver = WebDriver::start(&chromedriver).await?;
    let session = driver.session(&chromium).await?;
    driver
        .post(
            &format!("/session/{session}/url"),
            serde_json::json!({ "url": format!("http://{addr}/") }),
        )
        .await?;
    let shown = |driver: &WebDriver, session: &str| {
        let (driver, session) = (driver.clone(), session.to_owned());
        async move {
            let v = driver
                .post(
                    &format!("/session/{session}/execute/sync"),
                    serde_json::json!({
                        "script": "return [document.getElementById('status').className, \
                                   Array.from(document.querySelectorAll('li')).map(l => l.dataset.id)]",
                        "args": [],
                    }),
                )
                .await?;
            Ok::<_, busbar_conformance::private_server::Failed>(v["value"].clone())
        }
    };
    let wait_for = |want: Vec<String>| {
        let (driver, session) = (driver.clone(), session.clone());
        async move {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let v = shown(&driver, &session).await?;
                let mut ids: Vec<String> = v[1]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                ids.sort();
                let mut sorted = want.clone();
                sorted.sort();
                if v[0] == "live" && ids == sorted {
                    return Ok(());
                }
                if Instant::now() > end {
                    return Err(format!("the page shows {v}, expected live and {want:?}").into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let result: TestResult = async {
        wait_for(ids.clone()).await?;
        ids.push(publish("four").await?.trim().to_owned());
        wait_for(ids.clone()).await
    }
    .await;
    let _ = driver.delete(&format!("/session/{session}")).await;
    result?;
    tail.kill().await?;
    Ok(())
}

/// `busbar check --json`: one object per case, then the totals; exit status 0.
async fn check_json() -> TestResult {
    let out = run(&["check", "memory://", "--json", "--filter", "basic::"]).await?;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let (cases, totals) = lines.split_at(lines.len().saturating_sub(1));
    let passed = cases.iter().filter(|c| c["result"] == "passed").count();
    if cases.is_empty() || passed != cases.len() || totals[0]["passed"] != passed {
        return Err(format!("busbar check --json printed {out}").into());
    }
    let (ok, _, _) = status(&["check", "nope://", "--json"]).await?;
    if ok {
        return Err("busbar check of an unknown scheme exited 0".into());
    }
    Ok(())
}

fn main() {
    let servers = common::servers(false);
    #[cfg(all(feature = "sse", feature = "redis"))]
    let once: Vec<(&'static str, busbar_conformance::private_server::TestFn)> = vec![
        ("check_json", || Box::pin(check_json())),
        ("sse_live_view", || {
            let url = std::env::var("BUSBAR_REDIS_URL")
                .ok()
                .and_then(|l| l.split_whitespace().next().map(str::to_owned))
                .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
            Box::pin(sse_live_view(url))
        }),
    ];
    #[cfg(not(all(feature = "sse", feature = "redis")))]
    let once: Vec<(&'static str, busbar_conformance::private_server::TestFn)> =
        vec![("check_json", || Box::pin(check_json()))];
    busbar_conformance::private_server::main_matrix(
        &servers,
        &[
            ("publish_tail_and_lag", |url| {
                Box::pin(publish_tail_and_lag(url))
            }),
            ("dlq_commands", |url| Box::pin(dlq_commands(url))),
            ("trace_and_history", |url| Box::pin(trace_and_history(url))),
        ],
        &once,
    )
}
