#![doc = include_str!("../README.md")]

mod codec;
pub mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod idempotency;
mod scripts;
mod subscriber;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use busbar_core::raw::{known, Backend, Connect, Identity};
use busbar_core::{
    Bus, Capabilities, Error, ErrorKind, Message, Ordering, PublishOptions, Result, StartPosition,
    SubscribeOptions, Subscriber,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;

pub use config::{partition_for, RedisConfig};
pub use idempotency::RedisIdempotencyStore;

pub(crate) const BACKEND: &str = known::REDIS.name;

/// An event bus on Redis Streams: [`Redis`] behind the checks of [`Bus`]. Connect with
/// `RedisBus::connect(url)` or `RedisBus::with_config(config)`.
pub type RedisBus = Bus<Redis>;

pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    client: redis::Client,
    pub(crate) conn: ConnectionManager,
    closed: AtomicBool,
    persistent: bool,
    partitions: Mutex<HashMap<String, u32>>,
    round_robin: AtomicU32,
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(AtomicOrdering::Acquire) {
            Err(Error::closed("redis bus").with_backend(BACKEND))
        } else {
            Ok(())
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(AtomicOrdering::Acquire)
    }

    /// A new connection of its own (subscribers block on theirs).
    pub(crate) async fn dedicated_connection(&self) -> Result<ConnectionManager> {
        self.client
            .get_connection_manager_with_config(manager_config())
            .await
            .map_err(|e| error::map(e, "opening a subscriber connection"))
    }

    /// The partition count of `topic`: the one recorded in Redis, or ours recorded now.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
        {
            return Ok(*n);
        }
        let key = self.config.meta_key(topic);
        let mut conn = self.conn.clone();
        let (_, n): (i64, Option<u32>) = redis::pipe()
            .cmd("HSETNX")
            .arg(&key)
            .arg("partitions")
            .arg(self.config.partitions)
            .cmd("HGET")
            .arg(&key)
            .arg("partitions")
            .query_async(&mut conn)
            .await
            .map_err(|e| error::map(e, "reading the topic's partition count"))?;
        let n = n
            .filter(|n| *n > 0)
            .ok_or_else(|| error::decode(format!("{key} holds no valid partition count")))?;
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Up to `options.limit` entries of `topic`'s partition streams (XRANGE from the start or
    /// from the stream id of the time), merged by time; nothing is read by a group.
    pub(crate) async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        let mut conn = self.conn.clone();
        let partitions: Option<u32> = redis::cmd("HGET")
            .arg(self.config.meta_key(topic))
            .arg("partitions")
            .query_async(&mut conn)
            .await
            .map_err(|e| error::map(e, "reading the topic's partition count"))?;
        let start = match options.from {
            busbar_core::BrowseFrom::Time(t) => format!("{}-0", t.timestamp_millis().max(0)),
            _ => "-".to_owned(),
        };
        let mut parts = Vec::new();
        for p in 0..partitions.unwrap_or(0) {
            let reply: Value = redis::cmd("XRANGE")
                .arg(self.config.stream_key(topic, p))
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(options.limit)
                .query_async(&mut conn)
                .await
                .map_err(|e| error::map(e, "browsing a partition stream"))?;
            parts.push(
                codec::entries_of(reply)?
                    .into_iter()
                    .map(|raw| {
                        let entry = subscriber::to_entry(p, raw, 1);
                        Arc::unwrap_or_clone(entry.message)
                    })
                    .collect(),
            );
        }
        Ok(busbar_core::raw::merge_by_time(parts, options.limit))
    }

    /// The group's lag on `topic`: over every partition stream, the entries the group has not
    /// read yet (XINFO GROUPS `lag`; where Redis cannot tell, counted from the group's last
    /// delivered id). Delayed messages not yet due are not counted.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let mut conn = self.conn.clone();
        let partitions: Option<u32> = redis::cmd("HGET")
            .arg(self.config.meta_key(topic))
            .arg("partitions")
            .query_async(&mut conn)
            .await
            .map_err(|e| error::map(e, "reading the topic's partition count"))?;
        let mut total = 0u64;
        for p in 0..partitions.unwrap_or(0) {
            let stream = self.config.stream_key(topic, p);
            let reply: redis::RedisResult<Value> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&stream)
                .query_async(&mut conn)
                .await;
            let groups = match reply {
                Ok(v) => codec::array_of(v)?,
                // No stream yet: nothing published to this partition.
                Err(e) if e.to_string().contains("no such key") => continue,
                Err(e) => return Err(error::map(e, "reading the group's lag")),
            };
            for g in groups {
                let info = codec::field_map(g)?;
                if info
                    .get("name")
                    .cloned()
                    .map(codec::string_of)
                    .transpose()?
                    .as_deref()
                    != Some(group)
                {
                    continue;
                }
                total += match info.get("lag").cloned() {
                    Some(Value::Nil) | None => {
                        let last = info
                            .get("last-delivered-id")
                            .cloned()
                            .map(codec::string_of)
                            .transpose()?
                            .unwrap_or_else(|| "0-0".to_owned());
                        self.count_after(&mut conn, &stream, &last).await?
                    }
                    Some(v) => u64::try_from(codec::int_of(v)?).unwrap_or(0),
                };
            }
        }
        Ok(total)
    }

    /// Entries of `stream` after `id`, counted in pages.
    async fn count_after(
        &self,
        conn: &mut ConnectionManager,
        stream: &str,
        id: &str,
    ) -> Result<u64> {
        let mut from = format!("({id}");
        let mut n = 0u64;
        loop {
            let page: Vec<Value> = redis::cmd("XRANGE")
                .arg(stream)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await
                .map_err(|e| error::map(e, "counting unread entries"))?;
            n += page.len() as u64;
            let Some(last) = page.last().cloned() else {
                return Ok(n);
            };
            if page.len() < 1000 {
                return Ok(n);
            }
            let id = codec::array_of(last)?
                .into_iter()
                .next()
                .map(codec::string_of)
                .transpose()?
                .unwrap_or_default();
            from = format!("({id}");
        }
    }

    /// Creates the consumer group on every partition stream (idempotent).
    pub(crate) async fn ensure_group(
        &self,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<u32> {
        let n = self.partitions(topic).await?;
        let start = match options.start {
            StartPosition::Latest => "$",
            StartPosition::Earliest => "0",
        };
        let mut conn = self.conn.clone();
        for p in 0..n {
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.config.stream_key(topic, p))
                .arg(&options.group)
                .arg(start)
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(error::map(e, "creating the consumer group")),
            }
        }
        Ok(n)
    }

    fn xadd(&self, pipe: &mut redis::Pipeline, stream: &str, message: &Message) {
        let cmd = pipe
            .cmd("XADD")
            .arg(stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.retention)
            .arg("*");
        for (k, v) in codec::encode(message) {
            cmd.arg(k).arg(v);
        }
    }

    fn partition_of(&self, message: &Message, n: u32) -> u32 {
        match &message.key {
            Some(k) => partition_for(k, n),
            None => self.round_robin.fetch_add(1, AtomicOrdering::Relaxed) % n,
        }
    }

    pub(crate) async fn publish_many(
        &self,
        topic: &str,
        messages: &[Message],
        delay: Option<Duration>,
    ) -> Result<()> {
        let n = self.partitions(topic).await?;
        let mut pipe = redis::pipe();
        // All or nothing (MULTI/EXEC) for a batch; one XADD is atomic on its own.
        if messages.len() > 1 || delay.is_some_and(|d| !d.is_zero()) {
            pipe.atomic();
        }
        match delay.filter(|d| !d.is_zero()) {
            None => {
                for m in messages {
                    let p = self.partition_of(m, n);
                    self.xadd(&mut pipe, &self.config.stream_key(topic, p), m);
                    pipe.ignore();
                }
            }
            Some(d) => {
                let due = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_add(d)
                    .as_millis() as u64;
                let zset = self.config.delayed_key(topic);
                for m in messages {
                    let p = self.partition_of(m, n);
                    let entry = uuid::Uuid::now_v7().to_string();
                    let list = format!("{}{entry}", self.config.delayed_entry_prefix(topic));
                    let cmd = pipe.cmd("RPUSH").arg(&list).arg(p);
                    for (k, v) in codec::encode(m) {
                        cmd.arg(k).arg(v);
                    }
                    pipe.ignore();
                    pipe.cmd("ZADD").arg(&zset).arg(due).arg(&entry).ignore();
                }
            }
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| error::map(e, "publishing"))
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2))
}

/// The Redis Streams backend (applications use it as [`RedisBus`]).
pub struct Redis {
    inner: Arc<Inner>,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Connect for Redis {
    type Config = RedisConfig;

    fn config_from_url(url: &str) -> Result<RedisConfig> {
        RedisConfig::from_url(url)
    }

    /// Connects to the Redis server and checks that it answers (and accepts the
    /// credentials). Errors: `Config`, `Connection` (unreachable), `Auth`.
    async fn connect_with(config: RedisConfig) -> Result<Self> {
        let (client, mut conn) = open(&config).await?;
        let persistent = persistence_enabled(&mut conn).await;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                conn,
                closed: AtomicBool::new(false),
                persistent,
                partitions: Mutex::new(HashMap::new()),
                round_robin: AtomicU32::new(0),
            }),
        })
    }

    fn config(&self) -> &RedisConfig {
        &self.inner.config
    }
}

/// Opens a client and a connection manager for `config` and checks that Redis answers.
/// Errors: `Config`, `Connection` (unreachable, or not Redis), `Auth`.
pub(crate) async fn open(
    config: &RedisConfig,
) -> Result<(redis::Client, redis::aio::ConnectionManager)> {
    if config.connection_url.starts_with("rediss:") {
        // redis-rs uses rustls without choosing a crypto provider; use ring. Another
        // provider installed by the application first is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = if config.tls.is_empty() {
        redis::Client::open(config.connection_url.as_str())
    } else {
        let certs = redis::TlsCertificates {
            client_tls: config
                .tls
                .read_identity(BACKEND)?
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: config.tls.read_ca(BACKEND)?,
        };
        redis::Client::build_with_tls(config.connection_url.as_str(), certs)
    }
    .map_err(|e| error::map(e, "parsing the Redis URL"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(15),
        client.get_connection_manager_with_config(manager_config()),
    )
    .await
    .map_err(|_| {
        Error::new(
            ErrorKind::Connection,
            format!(
                "no answer from Redis at {} within 15 s",
                busbar_core::raw::redact_url(&config.connection_url)
            ),
        )
        .with_backend(BACKEND)
    })?
    .map_err(|e| error::connecting(e, &config.connection_url))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| error::connecting(e, &config.connection_url))?;
    Ok((client, conn))
}

/// Whether the server keeps data across restarts (AOF on, or RDB snapshots configured).
/// Servers that forbid `CONFIG GET` are assumed not to.
async fn persistence_enabled(conn: &mut ConnectionManager) -> bool {
    let read = |name: &'static str| {
        let mut c = conn.clone();
        async move {
            let v: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut c)
                .await;
            v.ok().and_then(|v| v.into_iter().nth(1))
        }
    };
    let aof = read("appendonly").await;
    let save = read("save").await;
    aof.as_deref() == Some("yes") || save.is_some_and(|s| !s.trim().is_empty())
}

#[async_trait]
impl Backend for Redis {
    const IDENTITY: Identity = known::REDIS;

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.ordering = Ordering::PerKey;
        c.consumer_groups = true;
        c.persistent = self.inner.persistent;
        c.replay = true;
        c.nack_can_delay = true;
        c.ack_deadline_can_extend = true;
        c.exact_attempts = true;
        c.consumer_lag = true;
        c.browse = true;
        c.publish_with_delay = true;
        c.message_max_bytes = Some(self.inner.config.max_message_bytes);
        c
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
        let partitions = self.inner.ensure_group(topic, &options).await?;
        let sub = subscriber::RedisSubscriber::start(
            self.inner.clone(),
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
        self.inner.closed.store(true, AtomicOrdering::Release);
        Ok(())
    }
}
