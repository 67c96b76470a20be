//! The operator's commands: `publish`, `tail`, `lag`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use busbar::{EventBus, Message, PublishOptions, StartPosition, SubscribeOptions};
use tokio::io::AsyncBufReadExt as _;

/// What `busbar publish` sends.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  busbar publish redis://127.0.0.1:6379 orders '{\"id\":42}' --key order-42 --type order.created
  busbar publish nats://127.0.0.1:4222 orders --file event.json --header tenant=acme
  printf 'order-1\\t{\"id\":1}\\n' | busbar publish kafka://127.0.0.1:9092 orders --key-from-line
  busbar publish amqp://guest:guest@127.0.0.1:5672/%2f load 'msg {seq}' --count 10000 --rate 500

Prints the id of each message published (one per line; --quiet: none) and a summary on stderr.
Exit status: 0 all published, 1 an error (nothing after it is sent), 2 bad usage.")]
pub(crate) struct PublishArgs {
    /// Broker URL (memory://, redis://, kafka://, nats://, amqp://, sqs://).
    url: String,
    /// Topic to publish to.
    topic: String,
    /// The payload; `-` or none (and no --file): one message per line of stdin.
    payload: Option<String>,
    /// Read one payload from this file (bytes as they are).
    #[arg(long, conflicts_with = "payload")]
    file: Option<PathBuf>,
    /// Partition key (per-key order).
    #[arg(long)]
    key: Option<String>,
    /// With stdin lines: the key is the text before the first tab of each line (the payload
    /// the rest).
    #[arg(long, conflicts_with = "key")]
    key_from_line: bool,
    /// Event type (CloudEvents `type`).
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Event source (CloudEvents `source`).
    #[arg(long)]
    source: Option<String>,
    /// Content type of the payload (e.g. application/json).
    #[arg(long)]
    content_type: Option<String>,
    /// A header `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = header)]
    headers: Vec<(String, String)>,
    /// Send each payload this many times; `{seq}` in a payload becomes the message's number
    /// (from 1) — for load.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// At most this many messages per second (default: as fast as the broker confirms).
    #[arg(long, value_parser = positive)]
    rate: Option<f64>,
    /// Print no ids.
    #[arg(long, short)]
    quiet: bool,
}

/// Parses `name=value`.
fn header(h: &str) -> Result<(String, String), String> {
    h.split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{h:?}: expected NAME=VALUE"))
}

/// A command line the command refuses (exit status 2, as clap's usage errors).
#[derive(Debug)]
pub(crate) struct Usage(pub(crate) String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A positive, finite number.
fn positive(v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|r| *r > 0.0 && r.is_finite())
        .ok_or_else(|| format!("{v:?}: expected a positive number"))
}

/// A bar on stderr when it is a terminal (indicatif hides it otherwise).
fn progress(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} {msg} [{elapsed_precise}, {per_sec}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

pub(crate) async fn publish(a: PublishArgs) -> anyhow::Result<()> {
    let headers = a.headers.clone();
    let bus = busbar::connect(&a.url).await?;
    let started = Instant::now();
    let mut p = Publisher {
        bus: bus.clone(),
        headers,
        pacer: Pacer::new(a.rate),
        bar: progress(None, &format!("published to {}", a.topic)),
        sent: 0,
        args: &a,
    };
    match (&a.payload, &a.file) {
        (_, Some(file)) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            p.send(&bytes, None).await?;
        }
        (Some(payload), None) if payload != "-" => p.send(payload.as_bytes(), None).await?,
        _ => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await.context("reading stdin")? {
                let (key, payload) = match line.split_once('\t') {
                    Some((k, rest)) if a.key_from_line => (Some(k), rest),
                    _ => (None, line.as_str()),
                };
                p.send(payload.as_bytes(), key).await?;
            }
        }
    }
    p.bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "published {} message(s) to {} in {secs:.2}s ({:.0} msgs/s)",
        p.sent,
        a.topic,
        p.sent as f64 / secs.max(1e-9)
    );
    bus.close().await?;
    Ok(())
}

/// Publishes payloads as `busbar publish` was told to.
struct Publisher<'a> {
    bus: Arc<dyn EventBus>,
    headers: Vec<(String, String)>,
    pacer: Pacer,
    bar: indicatif::ProgressBar,
    sent: u64,
    args: &'a PublishArgs,
}

impl Publisher<'_> {
    /// Sends `payload` `--count` times (`{seq}` numbered), one confirmed publish after another.
    async fn send(&mut self, payload: &[u8], key: Option<&str>) -> anyhow::Result<()> {
        let a = self.args;
        let template = std::str::from_utf8(payload)
            .ok()
            .filter(|t| t.contains("{seq}"));
        for n in 1..=a.count {
            let body = match template {
                Some(t) => t.replace("{seq}", &n.to_string()).into_bytes(),
                None => payload.to_vec(),
            };
            let mut m = Message::new(body);
            m.key = key.or(a.key.as_deref()).map(str::to_owned);
            m.event_type = a.event_type.clone();
            m.source = a.source.clone();
            m.content_type = a.content_type.clone();
            for (name, value) in &self.headers {
                m.headers.insert(name.as_str(), value.as_str());
            }
            let id = m.id.clone();
            self.pacer.wait().await;
            self.bus
                .publish(&a.topic, m, &PublishOptions::default())
                .await
                .with_context(|| {
                    format!(
                        "publishing message {} to {} ({} sent before it)",
                        self.sent + 1,
                        a.topic,
                        self.sent
                    )
                })?;
            self.sent += 1;
            self.bar.inc(1);
            if !a.quiet {
                println!("{id}");
            }
        }
        Ok(())
    }
}

/// Spaces sends to at most `rate` per second.
struct Pacer {
    every: Option<Duration>,
    next: tokio::time::Instant,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        Self {
            every: rate.map(|r| Duration::from_secs_f64(1.0 / r)),
            next: tokio::time::Instant::now(),
        }
    }

    async fn wait(&mut self) {
        if let Some(every) = self.every {
            tokio::time::sleep_until(self.next).await;
            self.next = self.next.max(tokio::time::Instant::now() - every) + every;
        }
    }
}

/// What `busbar tail` follows.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  busbar tail redis://127.0.0.1:6379 orders                  # new events, pretty, until Ctrl-C
  busbar tail kafka://127.0.0.1:9092 orders --from earliest --json --count 100
  busbar tail nats://127.0.0.1:4222 orders.dlq --group busbar-redrive   # consumes the DLQ group!
  busbar tail redis://127.0.0.1:6379 orders --sse 127.0.0.1:8080         # open http://127.0.0.1:8080/

Without --group, a throwaway group busbar-tail-<random> sees every event without taking any
from the application's groups (it stays on brokers that keep groups; delete it there if you
must). With --group, tail is one more member of that group: it takes (and acks) its share.
Exit status: 0 stopped (Ctrl-C, --count, --idle), 1 an error, 2 bad usage.")]
pub(crate) struct TailArgs {
    /// Broker URL.
    url: String,
    /// Topic to follow.
    topic: String,
    /// Consume as a member of this group (acks what it shows).
    #[arg(long)]
    group: Option<String>,
    /// Where to start: latest (default), earliest (a new group; where the backend can
    /// replay), or an RFC 3339 time (what the topic holds from then on, read without a
    /// group — capability browse — then live).
    #[arg(long, default_value = "latest", value_parser = from_arg)]
    from: From,
    /// One JSON object per line (id, topic, key, type, source, time, datacontenttype,
    /// headers, attempt, data or data_base64).
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds without an event.
    #[arg(long, value_name = "SECONDS", value_parser = positive)]
    idle: Option<f64>,
    /// Also serve the events as Server-Sent Events on this address (`GET /events`, with
    /// `Last-Event-ID` catch-up) and a page showing them live (`GET /`); feature `sse`.
    #[arg(long, value_name = "ADDR")]
    sse: Option<String>,
}

/// The JSON line of a message (`attempt`: of its delivery; none when browsed).
pub(crate) fn message_json(topic: &str, m: &Message, attempt: Option<u32>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": m.id,
        "topic": topic,
        "key": m.key,
        "type": m.event_type,
        "source": m.source,
        "time": m.time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        "datacontenttype": m.content_type,
        "headers": m.headers.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "attempt": attempt,
    });
    match std::str::from_utf8(&m.payload) {
        Ok(text) => v["data"] = text.into(),
        Err(_) => {
            v["data_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&m.payload)
                .into()
        }
    }
    v
}

fn pretty(topic: &str, m: &Message, attempt: u32, colour: bool) -> String {
    let (dim, bold, reset) = if colour {
        ("\x1b[2m", "\x1b[1m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let mut line = format!(
        "{dim}{}{reset} {topic} {bold}{}{reset}",
        m.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        m.id
    );
    if let Some(k) = &m.key {
        line.push_str(&format!(" key={k}"));
    }
    if let Some(t) = &m.event_type {
        line.push_str(&format!(" type={t}"));
    }
    if attempt > 1 {
        line.push_str(&format!(" attempt={attempt}"));
    }
    let text = String::from_utf8_lossy(&m.payload);
    let preview: String = text.chars().take(160).collect();
    let cut = if preview.len() < text.len() {
        "…"
    } else {
        ""
    };
    line.push_str(&format!("  {}{cut}", preview.replace('\n', "⏎")));
    line
}

/// `tail --from`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum From {
    Latest,
    Earliest,
    Time(chrono::DateTime<chrono::Utc>),
}

fn from_arg(v: &str) -> Result<From, String> {
    match v {
        "latest" => Ok(From::Latest),
        "earliest" => Ok(From::Earliest),
        t => chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| From::Time(t.with_timezone(&chrono::Utc)))
            .map_err(|e| format!("{t:?}: expected latest, earliest or an RFC 3339 time ({e})")),
    }
}

pub(crate) async fn tail(a: TailArgs) -> anyhow::Result<()> {
    let bus = busbar::connect(&a.url).await?;
    let group = a.group.clone().unwrap_or_else(|| {
        format!(
            "busbar-tail-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )
    });
    let start = match a.from {
        From::Earliest => StartPosition::Earliest,
        _ => StartPosition::Latest,
    };
    let opts = SubscribeOptions::new(&group).start(start);
    // The group first: what is published while the history is read comes live too (and is
    // shown once).
    bus.provision(&a.topic, &opts).await?;
    let colour = std::io::stdout().is_terminal();
    let feed = match &a.sse {
        Some(addr) => Some(sse_feed(addr, &a.topic).await?),
        None => None,
    };
    let show = |m: &Message, attempt: Option<u32>| {
        if let Some(hub) = &feed {
            hub.push(message_json(&a.topic, m, attempt).to_string());
        }
        if a.json {
            println!("{}", message_json(&a.topic, m, attempt));
        } else {
            println!("{}", pretty(&a.topic, m, attempt.unwrap_or(1), colour));
        }
    };
    let mut shown = 0u64;
    let mut history = std::collections::HashSet::new();
    if let From::Time(t) = a.from {
        let limit = a
            .count
            .map_or(busbar::limits::BROWSE_LIMIT_MAX, |c| {
                usize::try_from(c).unwrap_or(usize::MAX)
            })
            .clamp(1, busbar::limits::BROWSE_LIMIT_MAX);
        let past = bus
            .browse(&a.topic, &busbar::BrowseOptions::since(t, limit))
            .await
            .context("reading the topic from --from")?;
        for m in &past {
            show(m, None);
            history.insert(m.id.clone());
            shown += 1;
        }
    }
    if a.count.is_some_and(|c| shown >= c) {
        bus.close().await?;
        return Ok(());
    }
    let mut sub = bus.subscribe(&a.topic, opts).await?;
    eprintln!("tailing {} as group {group} (Ctrl-C stops)", a.topic);
    let idle = a.idle.map(Duration::from_secs_f64);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let outcome = loop {
        if a.count.is_some_and(|c| shown >= c) {
            break Ok(());
        }
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, sub.next()).await.ok(),
                None => Some(sub.next().await),
            }
        };
        let got = tokio::select! {
            _ = &mut stop => break Ok(()),
            got = next => got,
        };
        let d = match got {
            None => break Ok(()), // idle
            Some(Ok(Some(d))) => d,
            Some(Ok(None)) => break Ok(()),
            Some(Err(e)) => break Err(anyhow::Error::from(e)),
        };
        if !history.remove(d.id()) {
            show(d.message(), Some(d.attempt()));
            shown += 1;
        }
        d.ack().await?;
    };
    sub.close().await?;
    bus.close().await?;
    outcome
}

#[cfg(feature = "sse")]
type Feed = Arc<crate::sse::Hub>;

#[cfg(feature = "sse")]
async fn sse_feed(addr: &str, topic: &str) -> anyhow::Result<Feed> {
    let hub = crate::sse::Hub::new(topic);
    let bound = crate::sse::serve(addr, hub.clone()).await?;
    eprintln!("serving http://{bound}/ (events: http://{bound}/events)");
    Ok(hub)
}

/// Without the `sse` feature: an event sink that says how to get one.
#[cfg(not(feature = "sse"))]
#[derive(Debug)]
struct Feed;

#[cfg(not(feature = "sse"))]
impl Feed {
    fn push(&self, _json: String) {}
}

#[cfg(not(feature = "sse"))]
async fn sse_feed(_addr: &str, _topic: &str) -> anyhow::Result<Feed> {
    anyhow::bail!(
        "this busbar was built without its `sse` feature (axum): cargo install busbar-cli --features sse"
    )
}

/// `busbar lag URL TOPIC GROUP`.
pub(crate) async fn lag(url: &str, topic: &str, group: &str, json: bool) -> anyhow::Result<()> {
    let bus: Arc<dyn EventBus> = busbar::connect(url).await?;
    let lag = bus.lag(topic, group).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"topic": topic, "group": group, "lag": lag})
        );
    } else {
        println!("{lag}");
    }
    bus.close().await?;
    Ok(())
}

/// `busbar dlq …`: look into a dead-letter topic, send its messages back, drop them.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Dlq {
    /// Lists the dead letters: id, when, attempts, original topic and group, error, payload.
    #[command(after_help = "Examples:
  busbar dlq list redis://127.0.0.1:6379 orders           # the dead letters of orders (orders.dlq)
  busbar dlq list nats://127.0.0.1:4222 orders --json

The dead letters are what the group busbar-redrive (where busbar keeps them) has not settled:
not redriven, not purged. They are read through it and handed back untouched when the listing
ends (RabbitMQ and SQS count that hand-out as a delivery; dead-letter topics have no delivery
limit there, so nothing moves). Exit status: 0 listed, 1 an error, 2 bad usage.")]
    List {
        #[command(flatten)]
        at: DlqAt,
        /// One JSON object per line (the dead letter as `busbar tail --json` prints events).
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Shows one dead letter in full: every header and the payload.
    #[command(after_help = "Examples:
  busbar dlq show redis://127.0.0.1:6379 orders 01a2…       # an id from busbar dlq list
  busbar dlq show kafka://127.0.0.1:9092 payments-failed 01a2… --exact  # your own DLQ topic

A payload that is not UTF-8 is printed as base64. Exit status: 0 shown, 1 an error or no such
dead letter (redriven, purged or never there), 2 bad usage.")]
    Show {
        #[command(flatten)]
        at: DlqAt,
        /// The message id (from `busbar dlq list`).
        id: String,
    },
    /// Sends dead letters back to the topic they came from (or --to), in order per key.
    #[command(after_help = "Examples:
  busbar dlq redrive redis://127.0.0.1:6379 orders --all
  busbar dlq redrive redis://127.0.0.1:6379 orders 01a2… 01a3… --to orders-retry

Each message is acked on the dead-letter topic only after its republish succeeded.
Exit status: 0 every listed id moved, 1 an error or an id not found, 2 bad usage.")]
    Redrive {
        #[command(flatten)]
        at: DlqAt,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        all: bool,
        /// The ids to send back.
        ids: Vec<String>,
        /// Republish here instead of each message's original topic.
        #[arg(long)]
        to: Option<String>,
    },
    /// Drops dead letters for good (asks first unless --yes).
    #[command(after_help = "Examples:
  busbar dlq purge redis://127.0.0.1:6379 orders            # asks, then drops all
  busbar dlq purge redis://127.0.0.1:6379 orders 01a2… --yes

Without a terminal to ask on, --yes is required (else exit status 2). Exit status: 0 dropped
(or nothing to drop), 1 an error, an id not found or the answer was no, 2 bad usage.")]
    Purge {
        #[command(flatten)]
        at: DlqAt,
        /// Only these ids (default: all).
        ids: Vec<String>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead-letter topic.
#[derive(Debug, clap::Args)]
pub(crate) struct DlqAt {
    /// Broker URL.
    url: String,
    /// The topic whose dead letters to use (`TOPIC.dlq`), or a dead-letter topic itself
    /// (a name ending in `.dlq`, or any name with --exact).
    topic: String,
    /// TOPIC is the dead-letter topic as given (a DeadLetterPolicy topic of your own).
    #[arg(long)]
    exact: bool,
    /// Stop reading after this many seconds without a message (the first one included: a
    /// new member of the dead-letter group may need a moment to be handed its partitions).
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = positive)]
    idle: f64,
}

impl DlqAt {
    fn dlq_topic(&self) -> String {
        if self.exact || self.topic.ends_with(".dlq") {
            self.topic.clone()
        } else {
            busbar::dead_letter::default_topic(&self.topic)
        }
    }

    fn options(&self, only: &[String]) -> busbar::dead_letter::RedriveOptions {
        let mut o = busbar::dead_letter::RedriveOptions::default();
        o.idle_timeout = Duration::from_secs_f64(self.idle);
        o.only = (!only.is_empty()).then(|| only.iter().cloned().collect());
        o
    }
}

fn dlq_line(m: &Message) -> String {
    use busbar::dead_letter::headers as h;
    let get = |n: &str| m.headers.get(n).unwrap_or("-");
    let text = String::from_utf8_lossy(&m.payload);
    let preview: String = text.chars().take(60).collect();
    format!(
        "{}  {}  attempts={}  from={}/{}  error={:?}  {}",
        m.id,
        get(h::TIME),
        get(h::ATTEMPTS),
        get(h::ORIGINAL_TOPIC),
        get(h::GROUP),
        get(h::ERROR),
        preview.replace('\n', "⏎")
    )
}

/// The dead letters of `topic` (those of `only`, at most `limit`): what the group
/// `busbar-redrive` has not settled — not redriven, not purged — read through it and handed
/// back. Not `browse`: a log broker keeps what was redriven or purged in the topic's history.
async fn dead_letters(
    bus: &dyn EventBus,
    at: &DlqAt,
    topic: &str,
    only: &[String],
    limit: usize,
) -> anyhow::Result<Vec<Message>> {
    let mut options = at.options(only);
    options.max_messages = Some(limit);
    let held = busbar::dead_letter::peek(bus, topic, &options).await?;
    Ok(held.iter().map(|e| e.message().clone()).collect())
}

/// A spinner on stderr (a terminal only) while long work runs.
fn working(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn missing(wanted: &[String], found: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|w| !found.contains(w))
        .cloned()
        .collect()
}

pub(crate) async fn dlq(command: Dlq) -> anyhow::Result<()> {
    use busbar::dead_letter::{purge, redrive};
    match command {
        Dlq::List { at, json, limit } => {
            let bus = busbar::connect(&at.url).await?;
            let topic = at.dlq_topic();
            let found = dead_letters(bus.as_ref(), &at, &topic, &[], limit).await?;
            for e in &found {
                if json {
                    println!("{}", message_json(&topic, e, None));
                } else {
                    println!("{}", dlq_line(e));
                }
            }
            eprintln!("{} dead letter(s) in {topic}", found.len());
            bus.close().await?;
        }
        Dlq::Show { at, id } => {
            let bus = busbar::connect(&at.url).await?;
            let topic = at.dlq_topic();
            let found =
                dead_letters(bus.as_ref(), &at, &topic, std::slice::from_ref(&id), 1).await?;
            bus.close().await?;
            let m = found
                .first()
                .ok_or_else(|| anyhow::anyhow!("no dead letter {id} in {topic}"))?;
            println!("id:       {}", m.id);
            println!("topic:    {topic}");
            println!("key:      {}", m.key.as_deref().unwrap_or("-"));
            println!("type:     {}", m.event_type.as_deref().unwrap_or("-"));
            println!("source:   {}", m.source.as_deref().unwrap_or("-"));
            println!("time:     {}", m.time.to_rfc3339());
            for (n, v) in m.headers.iter() {
                println!("header:   {n}: {v}");
            }
            match std::str::from_utf8(&m.payload) {
                Ok(text) => println!("payload:\n{text}"),
                Err(_) => println!(
                    "payload (base64):\n{}",
                    base64::engine::general_purpose::STANDARD.encode(&m.payload)
                ),
            }
        }
        Dlq::Redrive { at, all, ids, to } => {
            let bus = busbar::connect(&at.url).await?;
            let topic = at.dlq_topic();
            let mut options = at.options(if all { &[] } else { &ids });
            options.target_topic = to;
            let spinner = working(&format!("redriving {topic}"));
            let report = redrive(bus.as_ref(), &topic, &options).await;
            spinner.finish_and_clear();
            let report = report?;
            bus.close().await?;
            for id in &report.ids {
                println!("{id}");
            }
            eprintln!("redrove {} dead letter(s) from {topic}", report.redriven);
            let not_found = missing(&ids, &report.ids);
            if !not_found.is_empty() {
                anyhow::bail!(
                    "not found (or behind another dead letter of their key): {not_found:?}"
                );
            }
        }
        Dlq::Purge { at, ids, yes } => {
            let topic = at.dlq_topic();
            if !yes {
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!(
                        "refusing to purge {topic} without --yes (no terminal to ask on)"
                    );
                }
                let what = if ids.is_empty() {
                    "ALL dead letters".to_owned()
                } else {
                    format!("{} dead letter(s)", ids.len())
                };
                eprint!("drop {what} of {topic} for good? [y/N] ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    anyhow::bail!("not purged");
                }
            }
            let bus = busbar::connect(&at.url).await?;
            let spinner = working(&format!("purging {topic}"));
            let report = purge(bus.as_ref(), &topic, &at.options(&ids)).await;
            spinner.finish_and_clear();
            let report = report?;
            bus.close().await?;
            eprintln!("dropped {} dead letter(s) of {topic}", report.redriven);
            let not_found = missing(&ids, &report.ids);
            if !not_found.is_empty() {
                anyhow::bail!("not found: {not_found:?}");
            }
        }
    }
    Ok(())
}

/// `busbar trace URL CORRELATION_ID --topic T…`: the event chain as a tree.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  busbar trace redis://127.0.0.1:6379 01a2… --topic orders --topic invoices --topic payments
  busbar trace kafka://127.0.0.1:9092 saga-7 --topic orders --json

Reads each topic and its dead-letter topic (TOPIC.dlq) without a consumer group (capability
browse: memory, Redis, NATS, Kafka, RabbitMQ with ?history=) and prints every event of the chain — the event whose id
is CORRELATION_ID and everything whose correlationid header is it — under the event that
caused it (causationid). Exit status: 0 printed, 1 an error or no event found, 2 bad usage.")]
pub(crate) struct TraceArgs {
    /// Broker URL.
    url: String,
    /// The chain's correlation id (the id of its first event, or one the application set).
    correlation_id: String,
    /// A topic to look in (repeatable; its dead-letter topic is read too).
    #[arg(long = "topic", required = true)]
    topics: Vec<String>,
    /// One JSON object per event (with `depth` and `dead_letter`) instead of the tree.
    #[arg(long)]
    json: bool,
    /// At most this many messages read per topic.
    #[arg(long, default_value_t = busbar::limits::BROWSE_LIMIT_MAX)]
    scan: usize,
}

pub(crate) async fn trace(a: TraceArgs) -> anyhow::Result<()> {
    let bus = busbar::connect(&a.url).await?;
    let mut found: Vec<(String, Message)> = Vec::new();
    for topic in &a.topics {
        for t in [topic.clone(), busbar::dead_letter::default_topic(topic)] {
            let messages = bus
                .browse(&t, &busbar::BrowseOptions::earliest(a.scan))
                .await
                .with_context(|| format!("reading {t}"))?;
            found.extend(
                messages
                    .into_iter()
                    .filter(|m| m.correlation_id() == a.correlation_id)
                    .map(|m| (t.clone(), m)),
            );
        }
    }
    bus.close().await?;
    if found.is_empty() {
        anyhow::bail!(
            "no event of chain {} in {:?} (or their dead-letter topics)",
            a.correlation_id,
            a.topics
        );
    }
    found.sort_by_key(|(_, m)| m.time);
    // Roots: events whose cause is not among those found (the first event has none).
    let ids: std::collections::HashSet<&str> = found.iter().map(|(_, m)| m.id.as_str()).collect();
    let is_root = |m: &Message| m.causation_id().is_none_or(|c| !ids.contains(c));
    let mut lines = Vec::new();
    let mut stack: Vec<(usize, usize)> = found
        .iter()
        .enumerate()
        .filter(|(_, (_, m))| is_root(m))
        .map(|(i, _)| (i, 0))
        .rev()
        .collect();
    let mut shown = std::collections::HashSet::new();
    while let Some((i, depth)) = stack.pop() {
        if !shown.insert(i) {
            continue;
        }
        lines.push((i, depth));
        let id = found[i].1.id.as_str();
        let children: Vec<usize> = found
            .iter()
            .enumerate()
            .filter(|(_, (_, m))| m.causation_id() == Some(id))
            .map(|(j, _)| j)
            .collect();
        stack.extend(children.into_iter().rev().map(|j| (j, depth + 1)));
    }
    for (i, depth) in lines {
        let (topic, m) = &found[i];
        let dead = topic.ends_with(".dlq");
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "depth": depth, "topic": topic, "id": m.id, "type": m.event_type,
                    "key": m.key, "time": m.time.to_rfc3339(), "causationid": m.causation_id(),
                    "dead_letter": dead,
                    "error": m.headers.get(busbar::dead_letter::headers::ERROR),
                })
            );
            continue;
        }
        let indent = if depth == 0 {
            String::new()
        } else {
            format!("{}└─ ", "   ".repeat(depth - 1))
        };
        let mut line = format!(
            "{indent}{} {} ({topic}) {}",
            m.event_type.as_deref().unwrap_or("busbar.message"),
            m.id,
            m.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        if dead {
            line.push_str(&format!(
                " DEAD LETTER: {}",
                m.headers
                    .get(busbar::dead_letter::headers::ERROR)
                    .unwrap_or("-")
            ));
        }
        println!("{line}");
    }
    Ok(())
}

/// `busbar worker URL --topic T --group G --record FILE` (hidden): the consumer process the
/// crash tests SIGKILL (`busbar_conformance::crash`). It handles each message for
/// `--handle-ms`, appends `<pid> <micros> <key> <payload> <id>` to the record, then returns
/// (the runner acks), until it is killed.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// Broker URL.
    url: String,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// The record file (appended to).
    #[arg(long)]
    record: PathBuf,
    /// Handler time in milliseconds.
    #[arg(long, default_value_t = 20)]
    handle_ms: u64,
    /// Handlers at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The subscription's ack timeout in seconds.
    #[arg(long, default_value_t = 10)]
    ack_timeout_secs: u64,
    /// Make the consumer idempotent with this store: redis://… (feature redis) or
    /// postgres://… (feature postgres; the table is created).
    #[arg(long, value_name = "STORE_URL")]
    idempotent: Option<String>,
    /// Abort right after the store recorded this many messages (before the ack).
    #[arg(long, requires = "idempotent")]
    die_after_records: Option<usize>,
    /// Abort right after handling this many messages (before the ack).
    #[arg(long)]
    die_after_handled: Option<usize>,
}

/// Completes on SIGTERM or Ctrl-C (never, where neither can be listened for).
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        futures::future::pending::<()>().await;
    }
}

/// The idempotency store of `url`, for `busbar worker --idempotent`.
async fn idempotency_store(
    url: &str,
) -> anyhow::Result<Arc<dyn busbar::idempotency::IdempotencyStore>> {
    #[cfg(feature = "redis")]
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Arc::new(
            busbar::redis::RedisIdempotencyStore::connect(url).await?,
        ));
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(url)
            .await?;
        busbar_outbox::Outbox::migrate(&pool).await?;
        return Ok(Arc::new(busbar_outbox::PgIdempotencyStore::new(pool)));
    }
    Err(Usage(format!(
        "--idempotent takes redis://… (feature redis) or postgres://… (feature postgres), not {url:?}"
    ))
    .into())
}

pub(crate) async fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    busbar_conformance::crash::init_worker_log();
    let bus = busbar::connect(&a.url).await?;
    let idempotent = match &a.idempotent {
        Some(url) => Some((idempotency_store(url).await?, Duration::from_secs(3600))),
        None => None,
    };
    busbar_conformance::crash::worker(
        bus,
        busbar_conformance::crash::WorkerOptions {
            topic: a.topic,
            group: a.group,
            record: a.record,
            handle: Duration::from_millis(a.handle_ms),
            concurrency: a.concurrency.max(1),
            ack_timeout: Duration::from_secs(a.ack_timeout_secs.max(1)),
            idempotent,
            die_after_records: a.die_after_records,
            die_after_handled: a.die_after_handled,
        },
        terminated(),
    )
    .await
}
