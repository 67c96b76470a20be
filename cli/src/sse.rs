//! `busbar tail --sse ADDR`: the events as Server-Sent Events (`GET /events`) and a page that
//! shows them live (`GET /`). Each event has an increasing id; a client that reconnects with
//! `Last-Event-ID` (browsers' EventSource does it by itself) gets what it missed from the last
//! 1,000 events, a new client gets those 1,000 first.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Html;
use axum::routing::get;
use futures::{Stream, StreamExt as _};
use tokio::sync::broadcast;

/// How many events a reconnecting client can catch up on.
const KEPT: usize = 1000;

/// One event: its id and JSON line.
type Item = (u64, Arc<str>);

/// The last id given and the last [`KEPT`] events.
type Kept = (u64, VecDeque<Item>);

/// The events shown so far (the last [`KEPT`]) and the live feed.
#[derive(Debug)]
pub(crate) struct Hub {
    topic: String,
    kept: Mutex<Kept>,
    live: broadcast::Sender<Item>,
}

impl Hub {
    pub(crate) fn new(topic: &str) -> Arc<Self> {
        Arc::new(Self {
            topic: topic.to_owned(),
            kept: Mutex::new((0, VecDeque::new())),
            live: broadcast::channel(KEPT).0,
        })
    }

    /// Adds an event (its JSON line) under the next id.
    pub(crate) fn push(&self, json: String) {
        let json: Arc<str> = json.into();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.0 += 1;
        let id = kept.0;
        kept.1.push_back((id, json.clone()));
        if kept.1.len() > KEPT {
            kept.1.pop_front();
        }
        // Sent under the lock, so a client's catch-up and its live feed never miss or repeat.
        let _ = self.live.send((id, json));
    }
}

fn event(id: u64, json: &str) -> Result<Event, Infallible> {
    Ok(Event::default()
        .id(id.to_string())
        .retry(Duration::from_secs(1))
        .data(json))
}

async fn events(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let after: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let (catch_up, rx) = {
        let kept = hub.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let catch_up: Vec<Item> = kept
            .1
            .iter()
            .filter(|(id, _)| *id > after)
            .cloned()
            .collect();
        (catch_up, hub.live.subscribe())
    };
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(item) => return Some((item, rx)),
                // A client too slow for the feed skips ahead (it can reconnect to catch up).
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures::stream::iter(catch_up)
        .chain(live)
        .map(|(id, json)| event(id, &json));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn page(State(hub): State<Arc<Hub>>) -> Html<String> {
    let topic = hub
        .topic
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    Html(PAGE.replace("{{topic}}", &topic))
}

/// Serves the page and the feed on `addr` until the process ends; returns the bound address.
pub(crate) async fn serve(addr: &str, hub: Arc<Hub>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--sse {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .with_state(hub);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("busbar tail: the SSE server stopped: {e}");
        }
    });
    Ok(bound)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>busbar tail {{topic}}</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; }
  #status { color: #666; }
  #status.live { color: #1a7f37; }
  ol { list-style: none; padding: 0; }
  li { border-bottom: 1px solid #eee; padding: .3em 0; }
  code { font-size: 12px; }
  .meta { color: #555; }
</style>
</head>
<body>
<h1>busbar tail <code>{{topic}}</code></h1>
<p id="status">connecting…</p>
<ol id="events"></ol>
<script>
  const list = document.getElementById("events");
  const status = document.getElementById("status");
  const source = new EventSource("events");
  let count = 0;
  source.onopen = () => { status.textContent = "live"; status.className = "live"; };
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = ""; };
  source.onmessage = (e) => {
    const ev = JSON.parse(e.data);
    const li = document.createElement("li");
    li.dataset.id = ev.id;
    li.dataset.seq = e.lastEventId;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = [ev.time, ev.id, ev.key && "key=" + ev.key, ev.type && "type=" + ev.type]
      .filter(Boolean).join("  ");
    const data = document.createElement("code");
    data.textContent = ev.data !== undefined ? ev.data : "(binary) " + ev.data_base64;
    li.append(meta, data);
    list.prepend(li);
    count += 1;
    document.title = "(" + count + ") busbar tail {{topic}}";
  };
</script>
</body>
</html>
"#;
