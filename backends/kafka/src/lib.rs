#![doc = include_str!("../README.md")]

mod codec;
pub mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod subscriber;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use busbar_core::raw::{known, Backend, Connect, Identity};
use busbar_core::{
    Bus, Capabilities, Error, ErrorKind, Message, Ordering, PublishOptions, Result, StartPosition,
    SubscribeOptions, Subscriber,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseProducer, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
};
use rdkafka::{Offset, TopicPartitionList};

pub use config::KafkaConfig;

pub(crate) const BACKEND: &str = known::KAFKA.name;

/// Bytes of a record kept for its headers and framing when declaring `message_max_bytes`.
const RECORD_OVERHEAD: usize = 1024;
/// How long a blocking metadata, admin or offset request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    /// Replaced when librdkafka reports a fatal producer error (the idempotent producer was
    /// fenced, its sequence state was lost, ...): such a producer accepts nothing more.
    producer: RwLock<FutureProducer>,
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// Topics known to exist (created or seen by this client).
    topics: Mutex<HashSet<String>>,
    closed: AtomicBool,
    subscribers: Mutex<Vec<Weak<subscriber::Shared>>>,
}

/// Runs a blocking librdkafka call off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Broker,
            format!("a blocking Kafka call failed: {e}"),
        )
        .with_backend(BACKEND)
    })?
}

impl Inner {
    /// Creates `topic` with the configured partition count unless it exists.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<()> {
        if self
            .topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(topic)
        {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication),
        );
        let opts = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| error::map(e, "creating the topic"))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::new(
                        error::kind_of_code(code),
                        format!("creating topic {name}: {code}"),
                    )
                    .with_backend(BACKEND))
                }
            }
        }
        self.wait_for_leaders(topic).await?;
        self.topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned());
        Ok(())
    }

    /// Waits until every partition of `topic` has a leader: a real broker answers
    /// `CreateTopics` before its controller elected them, and offset requests in between
    /// fail with `NotLeaderForPartition`.
    async fn wait_for_leaders(&self, topic: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            let (admin, name) = (self.admin.clone(), topic.to_owned());
            let ready = blocking(move || {
                let meta = admin
                    .inner()
                    .fetch_metadata(Some(&name), REQUEST_TIMEOUT)
                    .map_err(|e| error::map(e, "reading the topic's partitions"))?;
                Ok(meta.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0)
                }))
            })
            .await?;
            if ready {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "topic {topic} was created but its partitions had no leader within {REQUEST_TIMEOUT:?}"
                    ),
                )
                .with_backend(BACKEND));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Turns a publish failure into the error returned, replacing the producer when the
    /// failure leaves it unusable (a fatal error, or its idempotent-producer identity was
    /// fenced or lost): the publish can then be retried on the new one.
    fn publish_error(&self, used: &FutureProducer, e: KafkaError, id: &str) -> Error {
        let fatal = used.client().fatal_error();
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        );
        if fatal.is_none() && !fenced {
            return error::map(e, &format!("publishing {id}"));
        }
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.client().native_ptr() == used.client().native_ptr() {
            match new_producer(&self.config) {
                Ok(p) => *current = p,
                Err(err) => return err,
            }
            tracing::warn!(error = %e, ?fatal, "kafka: the producer became unusable and was replaced");
        }
        Error::new(
            ErrorKind::Connection,
            format!("publishing {id}: {e}; the producer was replaced, retry the publish"),
        )
        .with_backend(BACKEND)
        .with_source(e)
    }

    /// Publishes in order and returns once the broker acknowledged every record (acks=all).
    pub(crate) async fn publish_many(&self, topic: &str, messages: &[Message]) -> Result<()> {
        self.ensure_topic(topic).await?;
        let producer = self.producer();
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let headers = codec::encode_headers(m);
            let key = codec::record_key(m);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .payload(&m.payload[..])
                .headers(headers)
                .timestamp(m.time.timestamp_millis());
            if let Some(k) = &key {
                record = record.key(k.as_ref());
            }
            // Enqueue strictly in order: on a full local queue, wait and retry this record
            // before any later one.
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((m, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(self.publish_error(&producer, e, &m.id)),
                }
            }
        }
        for (m, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(self.publish_error(&producer, e, &m.id)),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!("publishing {}: the producer was shut down", m.id),
                    )
                    .with_backend(BACKEND))
                }
            }
        }
        Ok(())
    }

    /// A consumer client of `group` that does not join it (for offset requests).
    fn group_client(&self, group: &str) -> Result<BaseConsumer> {
        self.config
            .base()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| error::map(e, "creating a Kafka consumer"))
    }

    /// The group's lag: over the partitions of `topic`, the high watermark less the group's
    /// committed offset (records read but not yet committed — acked but not yet contiguous,
    /// or in a handler — count). A partition without a committed offset (no group, no topic)
    /// has no lag.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let client = self.group_client(group)?;
        let topic = topic.to_owned();
        blocking(move || {
            let Some(committed) = committed_offsets(&client, &topic)? else {
                return Ok(0);
            };
            let mut total = 0u64;
            for e in committed.elements() {
                let Offset::Offset(at) = e.offset() else {
                    continue;
                };
                let (_, high) = watermarks(&client, &topic, e.partition())?;
                total += u64::try_from(high.saturating_sub(at)).unwrap_or(0);
            }
            Ok(total)
        })
        .await
    }

    /// Up to `options.limit` records of `topic`: a consumer that is assigned the partitions
    /// (it joins no group and commits nothing, so no group appears) reads each from its low
    /// watermark, or from the offset of the time (`offsetsForTimes`), up to the high
    /// watermark seen at the start; partitions merged by time.
    pub(crate) async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        use rdkafka::Message as _;
        let client = self.group_client("busbar-browse")?;
        let (topic, options) = (topic.to_owned(), *options);
        blocking(move || {
            let (assign, ends) = browse_plan(&client, &topic, &options)?;
            let mut parts: std::collections::BTreeMap<i32, Vec<Message>> = assign
                .elements()
                .iter()
                .map(|e| (e.partition(), Vec::new()))
                .collect();
            if assign.count() == 0 {
                return Ok(Vec::new());
            }
            client
                .assign(&assign)
                .map_err(|e| error::map(e, "assigning the partitions to browse"))?;
            let deadline = std::time::Instant::now() + REQUEST_TIMEOUT * 3;
            let mut open: HashSet<i32> = parts.keys().copied().collect();
            while !open.is_empty() && std::time::Instant::now() < deadline {
                let Some(record) = client.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let record = record.map_err(|e| error::map(e, "browsing the topic"))?;
                let p = record.partition();
                let end = ends.get(&p).copied().unwrap_or(0);
                if let Some(list) = parts.get_mut(&p) {
                    if record.offset() < end && list.len() < options.limit {
                        list.push(codec::decode(&record));
                    }
                    if record.offset() + 1 >= end || list.len() >= options.limit {
                        open.remove(&p);
                    }
                }
            }
            if !open.is_empty() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("browsing {topic}: partitions {open:?} did not answer in time"),
                )
                .with_backend(BACKEND));
            }
            Ok(busbar_core::raw::merge_by_time(
                parts.into_values().collect(),
                options.limit,
            ))
        })
        .await
    }

    /// Makes the group exist: every partition of `topic` without a committed offset gets
    /// one at the start position (the end for `Latest`, the beginning for `Earliest`), so
    /// records published from now on are kept for the group even before a member joined.
    pub(crate) async fn provision_group(
        &self,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<()> {
        self.ensure_topic(topic).await?;
        let client = self.group_client(&options.group)?;
        let (topic, start) = (topic.to_owned(), options.start);
        blocking(move || {
            let committed = committed_offsets(&client, &topic)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Broker,
                    format!("the broker reports no partitions for topic {topic}"),
                )
                .with_backend(BACKEND)
            })?;
            let mut missing = TopicPartitionList::new();
            for e in committed.elements() {
                if matches!(e.offset(), Offset::Offset(_)) {
                    continue;
                }
                let (low, high) = watermarks(&client, &topic, e.partition())?;
                let at = match start {
                    StartPosition::Latest => high,
                    StartPosition::Earliest => low,
                };
                missing
                    .add_partition_offset(&topic, e.partition(), Offset::Offset(at))
                    .map_err(|e| error::map(e, "building the group's start offsets"))?;
            }
            if missing.count() == 0 {
                return Ok(());
            }
            match error::retry_while_leader_moves(REQUEST_TIMEOUT, || {
                client.commit(&missing, CommitMode::Sync)
            }) {
                Ok(()) => Ok(()),
                // Members are active: they already resolved their start positions.
                Err(e) if error::is_active_group(&e) => Ok(()),
                Err(e) => Err(error::map(e, "creating the consumer group's start offsets")),
            }
        })
        .await
    }
}

/// The group's committed offsets (`Offset::Invalid` where it has none) on every partition of
/// `topic`; `None` when the broker knows no partition of it. Blocking.
fn committed_offsets(client: &BaseConsumer, topic: &str) -> Result<Option<TopicPartitionList>> {
    let meta = client
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| error::map(e, "reading the topic's partitions"))?;
    let mut tpl = TopicPartitionList::new();
    for t in meta.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    if tpl.count() == 0 {
        return Ok(None);
    }
    error::retry_while_leader_moves(REQUEST_TIMEOUT, || {
        client.committed_offsets(tpl.clone(), REQUEST_TIMEOUT)
    })
    .map(Some)
    .map_err(|e| error::map(e, "reading the group's committed offsets"))
}

/// Where browsing starts: the partitions of `topic` that hold records (from their low
/// watermark, or the offset of the time) and, per partition, the high watermark to stop at.
fn browse_plan(
    client: &BaseConsumer,
    topic: &str,
    options: &busbar_core::BrowseOptions,
) -> Result<(TopicPartitionList, std::collections::BTreeMap<i32, i64>)> {
    let meta = client
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| error::map(e, "reading the topic's partitions"))?;
    let ids: Vec<i32> = meta
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut wanted = TopicPartitionList::new();
    let mut ends = std::collections::BTreeMap::new();
    for &p in &ids {
        let (low, high) = watermarks(client, topic, p)?;
        if high > low {
            let at = match options.from {
                busbar_core::BrowseFrom::Time(t) => Offset::Offset(t.timestamp_millis()),
                _ => Offset::Offset(low),
            };
            wanted
                .add_partition_offset(topic, p, at)
                .map_err(|e| error::map(e, "building the partitions to browse"))?;
            ends.insert(p, high);
        }
    }
    if let busbar_core::BrowseFrom::Time(_) = options.from {
        if wanted.count() > 0 {
            wanted = client
                .offsets_for_times(wanted, REQUEST_TIMEOUT)
                .map_err(|e| error::map(e, "finding the offsets of the time"))?;
        }
    }
    let mut assign = TopicPartitionList::new();
    for e in wanted.elements() {
        let Offset::Offset(at) = e.offset() else {
            continue; // past the end (no record at or after the time)
        };
        if ends.get(&e.partition()).is_some_and(|end| at < *end) {
            assign
                .add_partition_offset(topic, e.partition(), Offset::Offset(at))
                .map_err(|e| error::map(e, "building the partitions to browse"))?;
        }
    }
    Ok((assign, ends))
}

/// The low and high watermarks of a partition. Blocking.
fn watermarks(client: &BaseConsumer, topic: &str, partition: i32) -> Result<(i64, i64)> {
    error::retry_while_leader_moves(REQUEST_TIMEOUT, || {
        client.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
    })
    .map_err(|e| error::map(e, "reading the partition's offsets"))
}

/// The idempotent producer: acks from all in-sync replicas, the configured partitioner (the
/// Java client's by default).
fn new_producer(config: &KafkaConfig) -> Result<FutureProducer> {
    config
        .producer_config()
        .create()
        .map_err(|e| error::map(e, "creating the Kafka producer"))
}

/// The last global error librdkafka reported to a client: how [`probe_cluster`] tells a
/// refused handshake or login from a broker that does not answer.
#[derive(Default)]
struct ProbeContext {
    last: Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "busbar::kafka", %error, reason, "librdkafka error while connecting");
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((error.rdkafka_error_code(), reason.to_owned()));
    }
}

impl ProbeContext {
    /// The error to give up with at once: an untrusted server certificate or refused
    /// credentials (`Auth`), another TLS failure (`Connection`, e.g. the broker wanted a
    /// client certificate); `None` while the broker may still answer.
    fn refusal(&self, servers: &str) -> Option<Error> {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let (code, reason) = last.as_ref()?;
        let kind = match code {
            Some(RDKafkaErrorCode::SSL) if busbar_core::raw::tls::is_tls_trust_failure(reason) => {
                ErrorKind::Auth
            }
            Some(RDKafkaErrorCode::SSL) => ErrorKind::Connection,
            Some(code) if error::kind_of_code(*code) == ErrorKind::Auth => ErrorKind::Auth,
            _ => return None,
        };
        Some(
            Error::new(kind, format!("connecting to Kafka at {servers}: {reason}"))
                .with_backend(BACKEND),
        )
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Asks the cluster for its metadata until a broker answers, for at most
/// [`REQUEST_TIMEOUT`]; an untrusted certificate, refused credentials or a failed TLS
/// handshake end the wait at once (librdkafka itself would retry them until the timeout).
fn probe_cluster(config: &KafkaConfig) -> Result<()> {
    let servers = &config.bootstrap_servers;
    // A producer only to be polled: polling serves librdkafka's error events to the context.
    let probe: BaseProducer<ProbeContext> = config
        .base()
        .create_with_context(ProbeContext::default())
        .map_err(|e| error::map(e, "creating the Kafka client"))?;
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        let step = deadline
            .saturating_duration_since(std::time::Instant::now())
            .min(Duration::from_millis(500));
        let e = match probe.client().fetch_metadata(None, step) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        probe.poll(Duration::ZERO);
        if let Some(refused) = probe.context().refusal(servers) {
            return Err(refused);
        }
        let err = error::map(e, &format!("connecting to Kafka at {servers}"));
        let waiting = matches!(
            err.kind(),
            ErrorKind::Broker | ErrorKind::Timeout | ErrorKind::Connection
        );
        if !waiting {
            return Err(err);
        }
        if std::time::Instant::now() >= deadline {
            let last = probe
                .context()
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map(|(_, reason)| format!(" (last error: {reason})"))
                .unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Connection,
                format!("no Kafka broker answered at {servers} within {REQUEST_TIMEOUT:?}{last}"),
            )
            .with_backend(BACKEND));
        }
        // fetch_metadata may fail at once (broker transport failure): not a busy loop.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long connecting to one bootstrap server may take before the next is tried.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Fails at once, with a `Connection` error, when no bootstrap server accepts a TCP
/// connection: librdkafka itself retries a refused connection until its request timeout
/// (15 s) before it reports anything.
async fn probe_bootstrap(servers: &str) -> Result<()> {
    let mut why = String::from("no bootstrap server given");
    for addr in servers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => why = format!("{addr}: {e}"),
            Err(_) => why = format!("{addr}: no answer within {PROBE_TIMEOUT:?}"),
        }
    }
    Err(Error::new(
        ErrorKind::Connection,
        format!("no Kafka bootstrap server at {servers} accepts connections ({why})"),
    )
    .with_backend(BACKEND))
}

/// An event bus on Kafka: [`Kafka`] behind the checks of [`Bus`]. Connect with
/// `KafkaBus::connect(url)` or `KafkaBus::with_config(config)`.
pub type KafkaBus = Bus<Kafka>;

/// The backend (applications use it as [`KafkaBus`]).
pub struct Kafka {
    inner: Arc<Inner>,
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Connect for Kafka {
    type Config = KafkaConfig;

    fn config_from_url(url: &str) -> Result<KafkaConfig> {
        KafkaConfig::from_url(url)
    }

    /// Connects to the Kafka cluster of `url` and checks that a broker answers.
    ///
    /// Errors: `Config` (malformed URL, librdkafka setting or TLS file), `Connection` (no
    /// broker answered within 15 s, or the TLS handshake failed), `Auth` (credentials
    /// refused, or a server certificate the client does not trust).
    async fn connect_with(config: KafkaConfig) -> Result<Self> {
        // Unreadable TLS files are Config errors naming the option (librdkafka's own
        // message would not).
        config.tls.read_ca(BACKEND)?;
        config.tls.read_identity(BACKEND)?;
        probe_bootstrap(&config.bootstrap_servers).await?;
        let producer = new_producer(&config)?;
        let admin: AdminClient<DefaultClientContext> = config
            .base()
            .create()
            .map_err(|e| error::map(e, "creating the Kafka admin client"))?;
        let probe_config = config.clone();
        blocking(move || probe_cluster(&probe_config)).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer: RwLock::new(producer),
                admin: Arc::new(admin),
                topics: Mutex::new(HashSet::new()),
                closed: AtomicBool::new(false),
                subscribers: Mutex::new(Vec::new()),
            }),
        })
    }

    fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Backend for Kafka {
    const IDENTITY: Identity = known::KAFKA;

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
        c.message_max_bytes = Some(
            self.inner
                .config
                .max_message_bytes
                .saturating_sub(RECORD_OVERHEAD),
        );
        c
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
        _options: &PublishOptions,
    ) -> Result<()> {
        // No delay to honour: the bus in front refuses one (capability off).
        self.inner.publish_many(topic, &messages).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        self.inner.provision_group(topic, &options).await?;
        let sub = subscriber::KafkaSubscriber::start(self.inner.clone(), topic, options)?;
        Ok(Box::new(sub))
    }

    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.inner.provision_group(topic, options).await
    }

    async fn browse(
        &self,
        topic: &str,
        options: &busbar_core::BrowseOptions,
    ) -> Result<Vec<Message>> {
        self.inner.browse(topic, options).await
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        self.inner.lag(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        let subs = std::mem::take(
            &mut *self
                .inner
                .subscribers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for s in subs.iter().filter_map(Weak::upgrade) {
            s.shut_down();
        }
        let producer = self.inner.producer();
        blocking(move || {
            producer
                .flush(REQUEST_TIMEOUT)
                .map_err(|e| error::map(e, "flushing the producer"))
        })
        .await
    }
}
