#![doc = include_str!("../README.md")]

mod codec;
pub mod config;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod subscriber;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;
use busbar_core::raw::coalesce::Coalescer;
use busbar_core::raw::{known, Backend, Connect, Identity};
use busbar_core::{
    Bus, Capabilities, Error, ErrorKind, Message, Ordering, PublishOptions, Result,
    SubscribeOptions, Subscriber,
};

pub use config::{Credentials, SqsConfig};

pub(crate) const BACKEND: &str = known::SQS.name;

/// The largest message declared (`message_max_bytes`): a binary payload of this size still
/// fits SNS's 256 KiB once base64-encoded, with room for the attributes. Text payloads may be
/// larger on the wire; every publish checks the exact SNS size too.
pub const MESSAGE_MAX_BYTES: usize = 190_000;

/// The longest `DelaySeconds` SQS accepts (15 minutes).
pub const PUBLISH_DELAY_MAX: Duration = Duration::from_secs(900);

/// The most entries one SNS `PublishBatch` call takes.
const SNS_BATCH_MAX: usize = 10;

/// The longest visibility timeout SQS accepts (12 hours).
pub(crate) const VISIBILITY_MAX: Duration = Duration::from_secs(12 * 3600);

/// The SQS queue of one consumer group.
#[derive(Debug, Clone)]
pub(crate) struct GroupQueue {
    pub(crate) url: String,
    arn: String,
}

/// How long SQS keeps messages at most (14 days): the retention of dead-letter topics' queues.
const RETENTION_MAX_SECS: u64 = 1_209_600;

pub(crate) struct Inner {
    pub(crate) config: SqsConfig,
    pub(crate) sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    closed: AtomicBool,
    /// Ends every subscriber when the bus closes.
    pub(crate) closing: tokio::sync::watch::Sender<bool>,
    topics: Mutex<HashMap<String, String>>,
    groups: Mutex<HashMap<(String, String), GroupQueue>>,
    /// Queue ARN → queue URL, for delayed publishes.
    queue_urls: Mutex<HashMap<String, String>>,
    /// Single publishes, coalesced per topic ARN ([`publish_coalescer`]).
    singles: Coalescer<String, codec::Encoded>,
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(AtomicOrdering::Acquire)
    }

    /// The ARN of the SNS topic of `topic`, created when missing (`CreateTopic` is idempotent).
    async fn topic_arn(&self, topic: &str) -> Result<String> {
        if let Some(arn) = lock(&self.topics).get(topic) {
            return Ok(arn.clone());
        }
        let mut attributes: HashMap<String, String> = HashMap::new();
        if self.config.fifo {
            attributes.insert("FifoTopic".into(), "true".into());
            attributes.insert("ContentBasedDeduplication".into(), "false".into());
        }
        let out = self
            .sns
            .create_topic()
            .name(self.config.topic_name(topic))
            .set_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| error::map(e, "creating the SNS topic"))?;
        let arn = out
            .topic_arn
            .ok_or_else(|| error::decode("CreateTopic answered without a topic ARN"))?;
        lock(&self.topics).insert(topic.to_owned(), arn.clone());
        Ok(arn)
    }

    /// Creates a queue (idempotent while its attributes stay the same; an existing queue with
    /// other attributes is used as it is) and returns its URL and ARN.
    async fn queue(
        &self,
        name: &str,
        mut attributes: HashMap<QueueAttributeName, String>,
    ) -> Result<(String, String)> {
        if self.config.fifo {
            attributes.insert(QueueAttributeName::FifoQueue, "true".into());
            attributes.insert(
                QueueAttributeName::ContentBasedDeduplication,
                "false".into(),
            );
        }
        let created = self
            .sqs
            .create_queue()
            .queue_name(name)
            .set_attributes(Some(attributes))
            .send()
            .await;
        let url = match created {
            Ok(out) => out.queue_url,
            Err(e)
                if e.code() == Some("QueueAlreadyExists")
                    || e.code() == Some("QueueNameExists") =>
            {
                tracing::warn!(
                    queue = name,
                    "sqs: the queue exists with other attributes; using it as it is"
                );
                self.sqs
                    .get_queue_url()
                    .queue_name(name)
                    .send()
                    .await
                    .map_err(|e| error::map(e, "looking up the SQS queue"))?
                    .queue_url
            }
            Err(e) => return Err(error::map(e, "creating the SQS queue")),
        }
        .ok_or_else(|| error::decode("CreateQueue answered without a queue URL"))?;
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| error::map(e, "reading the SQS queue's ARN"))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .ok_or_else(|| error::decode("GetQueueAttributes answered without QueueArn"))?;
        Ok((url, arn))
    }

    /// The group's lag: `ApproximateNumberOfMessages` of its queue (visible messages; those
    /// received and not yet deleted, and delayed ones, are not counted). No queue: no lag.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        let name = self.config.queue_name(topic, group);
        let url = match self.sqs.get_queue_url().queue_name(&name).send().await {
            Ok(out) => out.queue_url.unwrap_or_default(),
            Err(e)
                if e.code() == Some("AWS.SimpleQueueService.NonExistentQueue")
                    || e.code() == Some("QueueDoesNotExist") =>
            {
                return Ok(0)
            }
            Err(e) => return Err(error::map(e, "looking up the group's queue")),
        };
        let count = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| error::map(e, "reading the group's queue depth"))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::ApproximateNumberOfMessages))
            .ok_or_else(|| {
                error::decode("GetQueueAttributes answered without ApproximateNumberOfMessages")
            })?;
        count
            .parse()
            .map_err(|_| error::decode(format!("ApproximateNumberOfMessages is {count:?}")))
    }

    /// Creates the group: its queue (with its dead-letter queue and redrive policy when native
    /// redrive is on) subscribed to the topic with raw message delivery. Idempotent.
    pub(crate) async fn ensure_group(
        &self,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<GroupQueue> {
        let id = (topic.to_owned(), options.group.clone());
        if let Some(g) = lock(&self.groups).get(&id) {
            return Ok(g.clone());
        }
        let topic_arn = self.topic_arn(topic).await?;
        let name = self.config.queue_name(topic, &options.group);
        let dead_letters = busbar_core::dead_letter::is_dead_letter_topic(topic);
        let retention = if dead_letters {
            RETENTION_MAX_SECS
        } else {
            self.config.retention.as_secs()
        };
        let mut attributes = HashMap::from([(
            QueueAttributeName::MessageRetentionPeriod,
            retention.to_string(),
        )]);
        if let Some(max) = self.config.max_receive_count.filter(|_| !dead_letters) {
            // Native redrive lands where busbar's dead letters do: the queue of the group
            // `busbar-redrive` of `<topic>.dlq`, readable (and redrivable) through busbar.
            let keep = SubscribeOptions::new(busbar_core::dead_letter::GROUP);
            let dlq_topic = busbar_core::dead_letter::default_topic(topic);
            let target = Box::pin(self.ensure_group(&dlq_topic, &keep)).await?;
            attributes.insert(
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({ "deadLetterTargetArn": target.arn, "maxReceiveCount": max })
                    .to_string(),
            );
        }
        let (url, arn) = self.queue(&name, attributes).await?;
        // Real AWS delivers from SNS only where the queue policy allows it.
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "busbar-sns-fan-out",
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } }
            }]
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| error::map(e, "allowing the topic to send to the group's queue"))?;
        self.sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| error::map(e, "subscribing the group's queue to the topic"))?;
        let group = GroupQueue { url, arn };
        lock(&self.groups).insert(id, group.clone());
        Ok(group)
    }

    /// The URLs of the SQS queues subscribed to `topic` (every consumer group).
    async fn subscribed_queues(&self, topic: &str) -> Result<Vec<String>> {
        let arn = self.topic_arn(topic).await?;
        let mut queue_arns = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(&arn)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| error::map(e, "listing the topic's subscriptions"))?;
            queue_arns.extend(
                out.subscriptions
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|s| s.protocol.as_deref() == Some("sqs"))
                    .filter_map(|s| s.endpoint),
            );
            token = out.next_token;
            if token.is_none() {
                break;
            }
        }
        let mut urls = Vec::with_capacity(queue_arns.len());
        for queue_arn in queue_arns {
            if let Some(url) = lock(&self.queue_urls).get(&queue_arn) {
                urls.push(url.clone());
                continue;
            }
            // arn:aws:sqs:<region>:<account>:<name>
            let mut parts = queue_arn.rsplitn(3, ':');
            let (Some(name), Some(account)) = (parts.next(), parts.next()) else {
                return Err(error::decode(format!(
                    "a subscription endpoint {queue_arn:?} is not a queue ARN"
                )));
            };
            let url = self
                .sqs
                .get_queue_url()
                .queue_name(name)
                .queue_owner_aws_account_id(account)
                .send()
                .await
                .map_err(|e| error::map(e, "looking up a subscribed queue"))?
                .queue_url
                .ok_or_else(|| error::decode("GetQueueUrl answered without a URL"))?;
            lock(&self.queue_urls).insert(queue_arn, url.clone());
            urls.push(url);
        }
        Ok(urls)
    }

    /// A delayed publish: SNS cannot delay, so the messages are sent to every subscribed
    /// queue with `DelaySeconds` (standard queues only), in batches of 10. Not atomic across
    /// groups: after an error, publishing again may duplicate in the groups that got it.
    async fn publish_delayed(
        &self,
        topic: &str,
        messages: &[Message],
        delay: Duration,
    ) -> Result<()> {
        let encoded = messages
            .iter()
            .map(codec::encode)
            .collect::<Result<Vec<_>>>()?;
        let seconds = delay.as_millis().div_ceil(1000).min(900) as i32;
        for url in self.subscribed_queues(topic).await? {
            for chunk in encoded.chunks(SNS_BATCH_MAX) {
                let entries = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(&e.body)
                            .set_message_attributes(Some(codec::sqs_attributes(e)?))
                            .delay_seconds(seconds)
                            .build()
                            .map_err(|err| {
                                Error::new(
                                    ErrorKind::InvalidInput,
                                    format!("batch entry {i}: {err}"),
                                )
                                .with_backend(BACKEND)
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let out = self
                    .sqs
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| error::map(e, "sending delayed messages to a group's queue"))?;
                if let Some(f) = out.failed.first() {
                    return Err(Error::new(
                        if f.sender_fault {
                            ErrorKind::Broker
                        } else {
                            ErrorKind::Connection
                        },
                        format!(
                            "SQS refused a delayed message [{}]: {}",
                            f.code,
                            f.message.as_deref().unwrap_or("no message")
                        ),
                    )
                    .with_backend(BACKEND));
                }
            }
        }
        Ok(())
    }

    /// Publishes in order, in `PublishBatch` calls of at most 10 entries and 256 KiB. A
    /// single message joins the single messages other tasks publish at the same moment to
    /// the same topic ([`publish_coalescer`]): one call for up to 10 of them.
    pub(crate) async fn publish_many(&self, topic: &str, messages: &[Message]) -> Result<()> {
        let encoded = messages
            .iter()
            .map(codec::encode)
            .collect::<Result<Vec<_>>>()?;
        let arn = self.topic_arn(topic).await?;
        if encoded.len() == 1 {
            let one = encoded.into_iter().next().ok_or_else(|| {
                Error::new(ErrorKind::InvalidInput, "nothing to publish").with_backend(BACKEND)
            })?;
            return self.singles.submit(arn, one).await;
        }
        let mut published = 0;
        for chunk in sns_chunks(&encoded) {
            let entries = &encoded[chunk.clone()];
            let outcomes = publish_batch(&self.sns, self.config.fifo, &arn, entries).await?;
            if let Some((i, failed)) = outcomes
                .into_iter()
                .enumerate()
                .find_map(|(i, o)| o.err().map(|e| (i, e)))
            {
                let entry = chunk.start + i;
                return Err(Error::new(
                    failed.kind(),
                    format!(
                        "{} (batch entry {entry}; {} of {} messages published; publishing the batch again is safe{})",
                        failed.message(),
                        published + i,
                        messages.len(),
                        if self.config.fifo { ": FIFO de-duplication drops the repeats" } else { " but may duplicate" },
                    ),
                )
                .with_backend(BACKEND));
            }
            published += entries.len();
        }
        Ok(())
    }
}

/// `PublishBatch` calls in flight at once per topic for coalesced single publishes.
const PUBLISHES_IN_FLIGHT: usize = 4;

/// Single publishes through core's [`Coalescer`]: what concurrent publishers send to one
/// topic while a call is in flight goes together, up to 10 per `PublishBatch` and
/// [`PUBLISHES_IN_FLIGHT`] calls at once; a lone publish goes out at once, and each publisher
/// gets its own entry's outcome. A publisher awaiting each publish still sends one at a time,
/// so its messages keep their order.
fn publish_coalescer(sns: aws_sdk_sns::Client, fifo: bool) -> Coalescer<String, codec::Encoded> {
    Coalescer::spawn_per_entry(
        SNS_BATCH_MAX,
        PUBLISHES_IN_FLIGHT,
        move |arn: String, items| {
            let sns = sns.clone();
            async move {
                let mut out = Vec::with_capacity(items.len());
                for chunk in sns_chunks(&items) {
                    let n = chunk.len();
                    match publish_batch(&sns, fifo, &arn, &items[chunk]).await {
                        Ok(outcomes) => out.extend(outcomes),
                        Err(e) => out.extend((0..n).map(|_| Err(error::copy(&e)))),
                    }
                }
                out
            }
        },
    )
}

/// The `PublishBatch` calls of `encoded`, in order: at most 10 entries and
/// [`codec::SNS_MAX_BYTES`] each (a message alone may use the whole limit).
fn sns_chunks(encoded: &[codec::Encoded]) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < encoded.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < encoded.len()
            && end - start < SNS_BATCH_MAX
            && (end == start || bytes + encoded[end].size <= codec::SNS_MAX_BYTES)
        {
            bytes += encoded[end].size;
            end += 1;
        }
        chunks.push(start..end);
        start = end;
    }
    chunks
}

/// One `PublishBatch` call: `Err` when the call failed, else each entry's outcome, in order.
async fn publish_batch(
    sns: &aws_sdk_sns::Client,
    fifo: bool,
    arn: &str,
    entries: &[codec::Encoded],
) -> Result<Vec<Result<()>>> {
    let requests = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut b = PublishBatchRequestEntry::builder()
                .id(i.to_string())
                .message(&e.body)
                .set_message_attributes(Some(codec::sns_attributes(e)?));
            if fifo {
                b = b
                    .message_group_id(&e.group_id)
                    .message_deduplication_id(&e.dedup_id);
            }
            b.build().map_err(|err| {
                Error::new(ErrorKind::InvalidInput, format!("batch entry {i}: {err}"))
                    .with_backend(BACKEND)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let out = sns
        .publish_batch()
        .topic_arn(arn)
        .set_publish_batch_request_entries(Some(requests))
        .send()
        .await
        .map_err(|e| error::map(e, "publishing to SNS"))?;
    let mut outcomes: Vec<Result<()>> = entries
        .iter()
        .map(|_| {
            Err(Error::new(
                ErrorKind::Broker,
                "SNS answered neither success nor failure for this entry",
            )
            .with_backend(BACKEND))
        })
        .collect();
    for ok in out.successful.unwrap_or_default() {
        if let Some(slot) = ok
            .id
            .and_then(|id| id.parse::<usize>().ok())
            .and_then(|i| outcomes.get_mut(i))
        {
            *slot = Ok(());
        }
    }
    for failed in out.failed.unwrap_or_default() {
        if let Some(slot) = failed
            .id
            .parse::<usize>()
            .ok()
            .and_then(|i| outcomes.get_mut(i))
        {
            *slot = Err(Error::new(
                if failed.sender_fault {
                    ErrorKind::Broker
                } else {
                    ErrorKind::Connection
                },
                format!(
                    "SNS refused the message [{}]: {}",
                    failed.code,
                    failed.message.as_deref().unwrap_or("no message")
                ),
            )
            .with_backend(BACKEND));
        }
    }
    Ok(outcomes)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The AWS SDK configuration of `config`: endpoint override, region (us-east-1 when only an
/// endpoint is given), static credentials from the URL or the standard chain, time-outs above
/// the longest long poll. Errors: `Config` when no region can be found for real AWS.
pub async fn sdk_config(config: &SqsConfig) -> Result<aws_config::SdkConfig> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            // Above the longest long poll (20 s).
            .operation_attempt_timeout(Duration::from_secs(25))
            .operation_timeout(Duration::from_secs(60))
            .build(),
    );
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(ca) = config.tls_files.read_ca(BACKEND)? {
        // The SDK's default HTTPS client (rustls on aws-lc) with the CA added to the
        // platform's roots.
        use aws_smithy_http_client::tls;
        let context = tls::TlsContext::builder()
            .with_trust_store(tls::TrustStore::default().with_pem_certificate(ca))
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Config, format!("the SQS URL option tls_ca: {e}"))
                    .with_backend(BACKEND)
            })?;
        loader = loader.http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(context)
                .build_https(),
        );
    }
    if let Credentials::Static {
        access_key_id,
        secret_access_key,
    } = &config.credentials
    {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "busbar-url",
        ));
    }
    let mut sdk = loader.load().await;
    if sdk.region().is_none() {
        if config.endpoint.is_none() {
            return Err(Error::new(
                ErrorKind::Config,
                "no AWS region: add ?region=... to the sqs:// URL or set AWS_REGION",
            )
            .with_backend(BACKEND));
        }
        // An emulator ignores the region, but requests must be signed for one.
        sdk = sdk
            .into_builder()
            .region(aws_config::Region::from_static("us-east-1"))
            .build();
    }
    Ok(sdk)
}

/// An event bus on Sqs: [`Sqs`] behind the checks of [`Bus`]. Connect with
/// `SqsBus::connect(url)` or `SqsBus::with_config(config)`.
pub type SqsBus = Bus<Sqs>;

/// The backend (applications use it as [`SqsBus`]).
pub struct Sqs {
    inner: Arc<Inner>,
}

impl fmt::Debug for Sqs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The URL of the SQS queue of `group` on `topic`, creating the group if needed (through the
/// bus's front door, which checks the names), for tools that look at the queue directly.
pub async fn group_queue_url(bus: &SqsBus, topic: &str, group: &str) -> Result<String> {
    use busbar_core::EventBus;
    let options = SubscribeOptions::new(group);
    bus.provision(topic, &options).await?;
    Ok(bus.raw().inner.ensure_group(topic, &options).await?.url)
}

/// The ARN of the SNS topic of `topic`, creating it if needed (through the bus's front door,
/// which checks the name), for tools that publish to it directly.
pub async fn topic_arn(bus: &SqsBus, topic: &str) -> Result<String> {
    busbar_core::limits::validate_topic(topic)?;
    bus.raw().inner.topic_arn(topic).await
}

impl Sqs {
    /// The SQS client, for what busbar does not cover: `bus.raw().sqs_client()`.
    pub fn sqs_client(&self) -> &aws_sdk_sqs::Client {
        &self.inner.sqs
    }
}

#[async_trait]
impl Connect for Sqs {
    type Config = SqsConfig;

    fn config_from_url(url: &str) -> Result<SqsConfig> {
        SqsConfig::from_url(url)
    }

    /// Builds the SQS and SNS clients for `url` and checks that SQS answers.
    ///
    /// Errors: `Config` (malformed URL, no region), `Connection` (endpoint unreachable),
    /// `Auth` (credentials refused), `Timeout`.
    async fn connect_with(config: SqsConfig) -> Result<Self> {
        let sdk = sdk_config(&config).await?;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let sns = aws_sdk_sns::Client::new(&sdk);
        sqs.list_queues()
            .max_results(1)
            .send()
            .await
            .map_err(|e| error::map(e, "reaching SQS"))?;
        let (closing, _) = tokio::sync::watch::channel(false);
        Ok(Self {
            inner: Arc::new(Inner {
                singles: publish_coalescer(sns.clone(), config.fifo),
                config,
                sqs,
                sns,
                closed: AtomicBool::new(false),
                closing,
                topics: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
                queue_urls: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn config(&self) -> &SqsConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Backend for Sqs {
    const IDENTITY: Identity = known::SQS;

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::none();
        c.ordering = if self.inner.config.fifo {
            Ordering::PerKey
        } else {
            Ordering::None
        };
        c.consumer_groups = true;
        c.consumer_lag = true;
        c.persistent = true;
        c.nack_can_delay = true;
        c.native_dead_letter = self.inner.config.max_receive_count.is_some();
        c.ack_deadline_can_extend = true;
        c.message_max_bytes = Some(MESSAGE_MAX_BYTES);
        // SNS has no delay; FIFO queues take no per-message delay either.
        c.publish_with_delay = !self.inner.config.fifo;
        c.publish_delay_max = c.publish_with_delay.then_some(PUBLISH_DELAY_MAX);
        c
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()> {
        match options.delay.filter(|d| !d.is_zero()) {
            Some(delay) => self.inner.publish_delayed(topic, &messages, delay).await,
            None => self.inner.publish_many(topic, &messages).await,
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let queue = self.inner.ensure_group(topic, &options).await?;
        Ok(Box::new(subscriber::SqsSubscriber::start(
            self.inner.clone(),
            queue,
            topic,
            options,
        )))
    }

    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.inner.ensure_group(topic, options).await.map(|_| ())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        self.inner.lag(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        if !self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            self.inner.closing.send_replace(true);
        }
        Ok(())
    }
}
