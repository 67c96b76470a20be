#![doc = include_str!("../README.md")]

mod codec;
pub mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod leases;
mod subscriber;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use busbar_core::raw::{known, Backend, Connect, Identity};
use busbar_core::{
    Bus, Capabilities, Error, ErrorKind, Message, Ordering, PublishOptions, Result, StartPosition,
    SubscribeOptions, Subscriber,
};

pub use config::{encode_topic, partition_for, Auth, NatsConfig};

pub(crate) const BACKEND: &str = known::NATS.name;

/// Bytes of `max_payload` kept for NATS header framing when declaring `message_max_bytes`.
const HEADER_ROOM: usize = 1024;

pub(crate) struct Inner {
    pub(crate) config: NatsConfig,
    pub(crate) js: jetstream::Context,
    closed: AtomicBool,
    max_payload: usize,
    /// Per topic whose stream was read: its partition subjects.
    topics: Mutex<HashMap<String, Arc<[async_nats::Subject]>>>,
    leases: tokio::sync::OnceCell<leases::LeaseStore>,
    unseen: tokio::sync::OnceCell<leases::LeaseStore>,
    round_robin: AtomicU32,
    /// The version the server announced on connect.
    server_version: String,
    /// The server schedules messages (`Nats-Schedule`, server 2.12 and later): delayed
    /// publish is native.
    schedules: bool,
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("nats bus").with_backend(BACKEND))
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(AtomicOrdering::Acquire)
    }

    /// The stream of `topic` (created with our partition count when missing) and its
    /// partition count.
    pub(crate) async fn topic(&self, topic: &str) -> Result<(stream::Stream, u32)> {
        let name = config::stream_name(topic);
        let cfg = stream::Config {
            name: name.clone(),
            subjects: vec![format!("busbar.{}.*", encode_topic(topic))],
            description: Some(format!(
                "busbar topic {topic}; partitions={}",
                self.config.partitions
            )),
            storage: stream::StorageType::File,
            max_messages: self.config.retention,
            duplicate_window: Duration::from_secs(120),
            allow_message_schedules: self.schedules,
            ..Default::default()
        };
        let mut stream = self.js.get_or_create_stream(cfg).await.map_err(|e| {
            let kind = error::request_kind(&e);
            error::map(kind, e, "creating the topic stream")
        })?;
        if let Some(subjects) = self.cached_subjects(topic) {
            return Ok((stream, subjects.len() as u32));
        }
        let info = stream.info().await.map_err(|e| {
            let kind = error::request_kind(&e);
            error::map(kind, e, "reading the topic stream")
        })?;
        if self.schedules && !info.config.allow_message_schedules {
            // A stream created before (or by an older busbar): schedules can be switched on.
            let mut cfg = info.config.clone();
            cfg.allow_message_schedules = true;
            if let Err(e) = self.js.update_stream(cfg).await {
                tracing::warn!(stream = %name, error = %e,
                    "nats: cannot allow message schedules on an existing stream; delayed publishes to it will fail");
            }
        }
        let n = partitions_of(&info.config, &name)?;
        let subjects: Arc<[async_nats::Subject]> = (0..n)
            .map(|p| async_nats::Subject::from(config::subject(topic, p)))
            .collect();
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned(), subjects);
        Ok((stream, n))
    }

    /// The group's lag: over its partition consumers, the messages not delivered yet
    /// (JetStream `num_pending`). Nothing is created: no stream or consumer, no lag.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
        use async_nats::jetstream::ErrorCode;
        let name = config::stream_name(topic);
        let stream = match self.js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Ok(0)
                }
                _ => {
                    let kind = error::request_kind(&e);
                    return Err(error::map(kind, e, "reading the topic stream"));
                }
            },
        };
        let n = partitions_of(&stream.cached_info().config, &name)?;
        let mut total = 0;
        for p in 0..n {
            match stream.consumer_info(config::consumer_name(group, p)).await {
                Ok(info) => total += info.num_pending,
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
                Err(e) => {
                    let kind = error::request_kind(&e);
                    return Err(error::map(kind, e, "reading the group's consumer"));
                }
            }
        }
        Ok(total)
    }

    /// Up to `options.limit` messages of `topic`'s stream, in stream order: an ordered
    /// consumer (ephemeral, no acks: nothing changes for any group) from the first stored
    /// message or the first stored at the time, up to the last sequence seen at the start.
    /// Scheduled messages (not yet due) are skipped.
    pub(crate) async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        use futures::StreamExt as _;
        let Some((stream, last_sequence)) = self.stored_stream(topic).await? else {
            return Ok(Vec::new());
        };
        let deliver_policy = match options.from {
            busbar_core::BrowseFrom::Time(t) => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                    t.timestamp_nanos_opt().unwrap_or(0),
                ))
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
            _ => consumer::DeliverPolicy::All,
        };
        let prefix = format!("busbar.{}.", config::encode_topic(topic));
        let ordered = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{prefix}*"),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| error::map(error::request_kind(&e), e, "creating a browsing consumer"))?;
        if ordered.cached_info().num_pending == 0 {
            return Ok(Vec::new());
        }
        let mut messages = ordered
            .messages()
            .await
            .map_err(|e| error::map(ErrorKind::Connection, e, "browsing the topic stream"))?;
        let mut out = Vec::new();
        while out.len() < options.limit {
            let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .map_err(|_| {
                    Error::new(ErrorKind::Timeout, format!("browsing {topic}: no answer"))
                        .with_backend(BACKEND)
                })?;
            let Some(msg) = next else { break };
            let msg =
                msg.map_err(|e| error::map(ErrorKind::Connection, e, "browsing the topic stream"))?;
            let (seq, pending) = msg
                .info()
                .map(|i| (i.stream_sequence, i.pending))
                .unwrap_or((last_sequence, 0));
            let partition_subject = msg
                .subject
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()));
            if partition_subject {
                let decoded =
                    codec::decode_message(msg.headers.as_ref(), msg.payload.clone(), || {
                        format!("nats-{topic}-{seq}")
                    });
                out.push(decoded.unwrap_or_else(|_| {
                    Message::new(msg.payload.clone()).with_id(format!("nats-{topic}-{seq}"))
                }));
            }
            if seq >= last_sequence || pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// The stream of `topic` and its last sequence; `None` when the topic has no stream or
    /// no message stored.
    async fn stored_stream(
        &self,
        topic: &str,
    ) -> Result<Option<(async_nats::jetstream::stream::Stream, u64)>> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        use async_nats::jetstream::ErrorCode;
        let name = config::stream_name(topic);
        let mut stream = match self.js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Ok(None)
                }
                _ => {
                    let kind = error::request_kind(&e);
                    return Err(error::map(kind, e, "reading the topic stream"));
                }
            },
        };
        let state = stream
            .info()
            .await
            .map_err(|e| error::map(error::request_kind(&e), e, "reading the topic stream"))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(None);
        }
        Ok(Some((stream, state.last_sequence)))
    }

    /// The partition subjects of `topic`, once its stream was read (their number is its
    /// partition count).
    fn cached_subjects(&self, topic: &str) -> Option<Arc<[async_nats::Subject]>> {
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned()
    }

    /// Creates the group's durable consumer on every partition (existing ones are kept).
    pub(crate) async fn ensure_group(
        &self,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<(stream::Stream, u32)> {
        let (stream, n) = self.topic(topic).await?;
        for p in 0..n {
            let name = config::consumer_name(&options.group, p);
            let cfg = consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: config::subject(topic, p),
                deliver_policy: match options.start {
                    StartPosition::Latest => consumer::DeliverPolicy::New,
                    StartPosition::Earliest => consumer::DeliverPolicy::All,
                },
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: options.ack_timeout,
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            };
            let consumer = stream
                .get_or_create_consumer::<consumer::pull::Config>(&name, cfg)
                .await
                .map_err(|e| {
                    let kind = error::request_kind(&e);
                    error::map(kind, e, "creating the group's consumer")
                })?;
            let wait = consumer.cached_info().config.ack_wait;
            if wait != options.ack_timeout {
                tracing::warn!(group = %options.group, partition = p, existing = ?wait, requested = ?options.ack_timeout,
                    "nats: the group's consumer already exists with another ack timeout; the existing one applies");
            }
        }
        Ok((stream, n))
    }

    /// The lease store (created on first use): one per lease TTL, since the TTL is the
    /// stream's `max_age`.
    pub(crate) async fn leases(&self) -> Result<&leases::LeaseStore> {
        self.leases
            .get_or_try_init(|| leases::LeaseStore::open(&self.js, self.config.lease_ttl))
            .await
    }

    /// The store of hand-outs no handler saw (created on first use).
    pub(crate) async fn unseen(&self) -> Result<&leases::LeaseStore> {
        self.unseen
            .get_or_try_init(|| leases::LeaseStore::open_unseen(&self.js))
            .await
    }

    fn partition_of(&self, m: &Message, n: u32) -> u32 {
        match &m.key {
            Some(k) => partition_for(k, n),
            None => self.round_robin.fetch_add(1, AtomicOrdering::Relaxed) % n,
        }
    }

    /// Publishes in order and returns once JetStream acknowledged every message; with a
    /// delay, each message is a schedule (`Nats-Schedule: @at <time>`) on a subject of its
    /// own that the server publishes to the partition's subject when the time comes.
    pub(crate) async fn publish_many(
        &self,
        topic: &str,
        messages: &[Message],
        delay: Option<Duration>,
    ) -> Result<()> {
        let due = delay.map(codec::schedule_at).transpose()?;
        // The stream is created (and its partition count read) once per topic and process.
        let subjects = match self.cached_subjects(topic) {
            Some(s) => s,
            None => {
                self.topic(topic).await?;
                self.cached_subjects(topic).ok_or_else(|| {
                    Error::new(ErrorKind::Broker, "the topic stream was not read")
                        .with_backend(BACKEND)
                })?
            }
        };
        let n = subjects.len() as u32;
        // Every message is encoded and checked before the first is sent: a batch holding one
        // the server would refuse publishes nothing.
        let mut encoded = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = codec::encode(m);
            let p = self.partition_of(m, n) as usize;
            let mut subject = subjects.get(p).cloned().ok_or_else(|| {
                Error::new(ErrorKind::Broker, format!("partition {p} of {n}")).with_backend(BACKEND)
            })?;
            if let Some(due) = &due {
                headers.insert(codec::SCHEDULE, due.as_str());
                headers.insert(codec::SCHEDULE_TARGET, subject.as_str());
                subject = config::schedule_subject(topic).into();
            }
            let header_len = codec::wire_len(&headers);
            let size = header_len + m.payload.len();
            if size > self.max_payload || header_len > codec::HEADERS_MAX_BYTES {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "message {} is {size} bytes on the wire ({header_len} of headers); the server's max_payload is {}, and headers take at most {} bytes",
                        m.id, self.max_payload, codec::HEADERS_MAX_BYTES
                    ),
                )
                .with_backend(BACKEND));
            }
            encoded.push((m, subject, headers));
        }
        let mut acks = Vec::with_capacity(messages.len());
        for (m, subject, headers) in encoded {
            let ack = self
                .js
                .publish_with_headers(subject, headers, m.payload.clone())
                .await
                .map_err(|e| error::map(error::publish_kind(e.kind()), e, "publishing"))?;
            acks.push(ack);
        }
        for ack in acks {
            let ack = ack
                .await
                .map_err(|e| error::map(error::publish_kind(e.kind()), e, "publishing"))?;
            if ack.duplicate {
                tracing::debug!(stream = %ack.stream, "nats: publish was a duplicate within the duplicate window; stored once");
            }
        }
        Ok(())
    }
}

/// An event bus on Nats: [`Nats`] behind the checks of [`Bus`]. Connect with
/// `NatsBus::connect(url)` or `NatsBus::with_config(config)`.
pub type NatsBus = Bus<Nats>;

/// The backend (applications use it as [`NatsBus`]).
pub struct Nats {
    inner: Arc<Inner>,
}

impl fmt::Debug for Nats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Connect for Nats {
    type Config = NatsConfig;

    fn config_from_url(url: &str) -> Result<NatsConfig> {
        NatsConfig::from_url(url)
    }

    /// Connects to the NATS server of `url` and checks that JetStream is enabled.
    ///
    /// Errors: `Config` (malformed URL, unreadable creds file), `Connection` (unreachable),
    /// `Auth` (credentials refused), `Broker` (JetStream disabled).
    async fn connect_with(config: NatsConfig) -> Result<Self> {
        // async-nats builds its rustls config without choosing a crypto provider: with both of
        // rustls' providers in the build (the AWS SDK brings aws-lc-rs) it panicked on a TLS
        // connect. Use ring; a provider the application installed first is kept.
        let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
        let mut opts = async_nats::ConnectOptions::new()
            .name(&config.name)
            .connection_timeout(Duration::from_secs(5))
            .require_tls(config.tls);
        // Read here first: a missing or non-PEM file is a `Config` error naming the option.
        config.tls_files.read_ca(BACKEND)?;
        config.tls_files.read_identity(BACKEND)?;
        if let Some(ca) = &config.tls_files.ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&config.tls_files.cert, &config.tls_files.key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        match &config.auth {
            Auth::None => {}
            Auth::UserPassword(u, p) => opts = opts.user_and_password(u.clone(), p.clone()),
            Auth::Token(t) => opts = opts.token(t.clone()),
            Auth::CredsFile(path) => {
                opts = opts.credentials_file(path).await.map_err(|e| {
                    error::map(ErrorKind::Config, e, "reading the NATS credentials file")
                })?;
            }
            Auth::NkeyFile(path) => opts = opts.nkey(read_nkey_seed(path)?),
        }
        let client = tokio::time::timeout(Duration::from_secs(15), opts.connect(&config.server))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Connection,
                    format!("no answer from NATS at {} within 15 s", config.server),
                )
                .with_backend(BACKEND)
            })?
            .map_err(error::connecting)?;
        let max_payload = client.server_info().max_payload;
        let server_version = client.server_info().version;
        let schedules = config::version_at_least(&server_version, (2, 12));
        check_jetstream(&client).await?;
        let js = jetstream::new(client);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                js,
                closed: AtomicBool::new(false),
                max_payload,
                topics: Mutex::new(HashMap::new()),
                leases: tokio::sync::OnceCell::new(),
                unseen: tokio::sync::OnceCell::new(),
                round_robin: AtomicU32::new(0),
                server_version,
                schedules,
            }),
        })
    }

    fn config(&self) -> &NatsConfig {
        &self.inner.config
    }
}

/// The nkey seed in the file `path` (the URL option `nkey`): unreadable, or not a seed, is a
/// `Config` error that names the file and never prints its contents.
fn read_nkey_seed(path: &str) -> Result<String> {
    let bad = |why: String| {
        Error::new(
            ErrorKind::Config,
            format!("the NATS URL option nkey={path:?}: {why}"),
        )
        .with_backend(BACKEND)
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let seed = text.trim();
    nkeys::KeyPair::from_seed(seed)
        .map_err(|_| bad("holds no nkey seed (one line starting with S)".to_owned()))?;
    Ok(seed.to_owned())
}

/// Asks `$JS.API.INFO` (the raw request: async-nats's typed account info does not parse a
/// 2.9 server's answer) and fails unless JetStream answers without an error.
async fn check_jetstream(client: &async_nats::Client) -> Result<()> {
    let not_enabled = |why: String| {
        Error::new(
            ErrorKind::Broker,
            format!("JetStream is not available ({why}); start nats-server with -js"),
        )
        .with_backend(BACKEND)
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| not_enabled("no answer within 10 s".into()))?
    .map_err(|e| not_enabled(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| not_enabled(format!("unreadable answer: {e}")))?;
    match v.get("error") {
        Some(err) => Err(not_enabled(err.to_string())),
        None => Ok(()),
    }
}

/// The partition count busbar wrote into the description of the stream `name`.
fn partitions_of(config: &stream::Config, name: &str) -> Result<u32> {
    config
        .description
        .as_deref()
        .and_then(|d| d.rsplit_once("partitions="))
        .and_then(|(_, n)| n.trim().parse::<u32>().ok())
        // The range busbar creates topics with (`partitions` of the URL).
        .filter(|n| (1..=1024).contains(n))
        .ok_or_else(|| {
            error::decode(format!(
                "stream {name} exists but was not created by busbar (no partition count of 1 to 1024)"
            ))
        })
}

#[async_trait]
impl Backend for Nats {
    const IDENTITY: Identity = known::NATS;

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.ordering = Ordering::PerKey;
        c.consumer_groups = true;
        c.persistent = true;
        c.replay = true;
        c.nack_can_delay = true;
        c.ack_deadline_can_extend = true;
        c.exact_attempts = true;
        c.consumer_lag = true;
        c.browse = true;
        c.message_max_bytes = Some(self.inner.max_payload.saturating_sub(HEADER_ROOM));
        if self.inner.schedules {
            c.publish_with_delay = true;
            c.publish_delay_max = Some(codec::SCHEDULE_MAX);
        }
        c
    }

    fn server_version(&self) -> Option<String> {
        Some(self.inner.server_version.clone())
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()> {
        self.inner
            .publish_many(topic, &messages, options.delay)
            .await
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let (stream, partitions) = self.inner.ensure_group(topic, &options).await?;
        let sub = subscriber::NatsSubscriber::start(
            self.inner.clone(),
            stream,
            topic.to_owned(),
            options,
            partitions,
        )
        .await?;
        Ok(Box::new(sub))
    }

    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.inner.ensure_group(topic, options).await.map(|_| ())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        self.inner.lag(topic, group).await
    }

    async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        self.inner.browse(topic, options).await
    }

    async fn close(&self) -> Result<()> {
        if !self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            let _ = self.inner.js.client().flush().await;
        }
        Ok(())
    }
}
