//! The embedded in-memory backend (`memory://`): the reference every broker backend is
//! compared against.
//!
//! One process, no persistence. A topic is an append-only log with a retention bound; a
//! consumer group is a cursor into it plus its unacked and to-be-redelivered messages.
//!
//! Per-key ordering with competing consumers: a key is *owned* by the member that holds
//! unacked deliveries of it; other members skip that key until the owner has acked (or lost,
//! by ack timeout or close) all of them. Redeliveries of a key always go out before newer
//! messages of that key, and a delayed redelivery (nack with delay) holds the key back.
//!
//! URLs: `memory://` creates a private bus; `memory://<name>` opens the named bus of this
//! process (created on first use), so several connections can share one. Query options:
//! `retention` (messages kept per topic, default 1,000,000) and `max_message_bytes`
//! (default 1 MiB).

mod state;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::bus::{Ack, Delivery, Subscriber};
use crate::capabilities::{Capabilities, Ordering};
use crate::error::{Error, ErrorKind, Result};
use crate::front::Bus;
use crate::message::Message;
use crate::options::{PublishOptions, SubscribeOptions};
use crate::raw::{known, Backend, Identity};

use state::{Handout, State};

const BACKEND: &str = known::MEMORY.name;

/// Opens a memory bus from a URL, as a trait object (the registry's
/// [`crate::raw::ConnectFn`]).
pub fn connect_boxed(
    url: String,
) -> futures::future::BoxFuture<'static, Result<Arc<dyn crate::EventBus>>> {
    Box::pin(async move { Ok(Arc::new(MemoryBus::from_url(&url)?) as Arc<dyn crate::EventBus>) })
}

/// Configuration of a [`MemoryBus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Messages kept per topic; older ones are dropped (even if a group has not read them).
    pub retention: usize,
    /// Largest accepted message ([`Message::encoded_len`]).
    pub max_message_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            retention: 1_000_000,
            max_message_bytes: 1024 * 1024,
        }
    }
}

impl MemoryConfig {
    /// Parses a `memory://[name][?retention=N&max_message_bytes=N]` URL into a config and the
    /// optional instance name.
    pub fn from_url(url: &str) -> Result<(Self, Option<String>)> {
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::new(ErrorKind::Config, format!("invalid memory URL: {e}")).with_source(e)
        })?;
        if parsed.scheme() != "memory" {
            return Err(Error::new(
                ErrorKind::Config,
                format!("expected a memory:// URL, got scheme {:?}", parsed.scheme()),
            ));
        }
        let mut cfg = Self::default();
        let options = crate::raw::UrlOptions::parse("memory", "memory", parsed.query());
        for o in options.clone() {
            match o.key() {
                "retention" => cfg.retention = o.number_as(1..=u64::MAX)?,
                "max_message_bytes" => cfg.max_message_bytes = o.number_as(1..=u64::MAX)?,
                _ => return Err(options.unknown(&o, &["retention", "max_message_bytes"])),
            }
        }
        let name = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .map(str::to_owned);
        Ok((cfg, name))
    }
}

struct Shared {
    state: Mutex<State>,
    config: MemoryConfig,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The in-memory event bus: [`Memory`] behind the checks of [`Bus`]. Cloning gives another
/// handle to the same bus.
///
/// ```
/// # tokio_test_block(async {
/// use busbar_core::{memory::MemoryBus, EventBus, Message, PublishOptions, SubscribeOptions};
/// let bus = MemoryBus::new();
/// bus.provision("orders", &SubscribeOptions::new("billing")).await?;
/// bus.publish("orders", Message::new("hello"), &PublishOptions::default()).await?;
/// let mut sub = bus.subscribe("orders", SubscribeOptions::new("billing")).await?;
/// let delivery = sub.next().await?.expect("a delivery");
/// assert_eq!(&delivery.payload()[..], b"hello");
/// delivery.ack().await?;
/// # Ok::<(), busbar_core::Error>(())
/// # });
/// # fn tokio_test_block<F: std::future::Future<Output = Result<(), busbar_core::Error>>>(f: F) {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f).unwrap()
/// # }
/// ```
pub type MemoryBus = Bus<Memory>;

/// The in-memory backend (see [`MemoryBus`]).
#[derive(Clone)]
pub struct Memory {
    shared: Arc<Shared>,
    /// Closed state of this connection (shared by its clones, not by other connections to
    /// the same named bus).
    closed: Arc<AtomicBool>,
    name: Option<Arc<str>>,
}

impl fmt::Debug for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("name", &self.name)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Default for Bus<Memory> {
    fn default() -> Self {
        Self::new()
    }
}

fn named_buses() -> &'static Mutex<HashMap<String, Weak<Shared>>> {
    static NAMED: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
    NAMED.get_or_init(Default::default)
}

impl Bus<Memory> {
    /// A private bus with the default configuration.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A private bus with `config`.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self::from_backend(Memory::with_config(config))
    }

    /// Opens a bus from a `memory://` URL: a private one, or a new connection to the named
    /// one of this process (closing it closes only that connection). A named bus lives while
    /// any connection to it does.
    pub fn from_url(url: &str) -> Result<Self> {
        Memory::from_url(url).map(Self::from_backend)
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.raw().shared.config
    }

    /// The capabilities of every memory bus with `config`.
    pub fn capabilities_for(config: &MemoryConfig) -> Capabilities {
        Memory::capabilities_for(config)
    }
}

impl Memory {
    fn with_config(config: MemoryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                config,
            }),
            closed: Arc::new(AtomicBool::new(false)),
            name: None,
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(AtomicOrdering::Acquire) {
            Err(Error::closed("memory bus connection").with_backend(BACKEND))
        } else {
            Ok(())
        }
    }

    fn from_url(url: &str) -> Result<Self> {
        let (config, name) = MemoryConfig::from_url(url)?;
        let Some(name) = name else {
            return Ok(Self::with_config(config));
        };
        let mut named = named_buses().lock().unwrap_or_else(PoisonError::into_inner);
        named.retain(|_, w| w.strong_count() > 0);
        if let Some(shared) = named.get(&name).and_then(Weak::upgrade) {
            return Ok(Self {
                shared,
                closed: Arc::new(AtomicBool::new(false)),
                name: Some(name.into()),
            });
        }
        let bus = Self::with_config(config);
        named.insert(name.clone(), Arc::downgrade(&bus.shared));
        Ok(Self {
            name: Some(name.into()),
            ..bus
        })
    }

    fn capabilities_for(config: &MemoryConfig) -> Capabilities {
        let mut c = Capabilities::none();
        c.ordering = Ordering::PerKey;
        c.consumer_groups = true;
        c.replay = true;
        c.nack_can_delay = true;
        c.ack_deadline_can_extend = true;
        c.exact_attempts = true;
        c.consumer_lag = true;
        c.browse = true;
        c.publish_with_delay = true;
        c.message_max_bytes = Some(config.max_message_bytes);
        c
    }

    fn append(&self, topic: &str, messages: Vec<Message>, delay: Option<Duration>) {
        let now = Instant::now();
        let notify = {
            let mut state = self.shared.lock();
            let t = state.topic_mut(topic);
            match delay {
                Some(d) if !d.is_zero() => {
                    for m in messages {
                        t.schedule(now + d, m);
                    }
                }
                _ => {
                    for m in messages {
                        t.append(Arc::new(m), self.shared.config.retention);
                    }
                }
            }
            t.notify.clone()
        };
        notify.notify_waiters();
    }
}

#[async_trait]
impl Backend for Memory {
    const IDENTITY: Identity = known::MEMORY;

    fn capabilities(&self) -> Capabilities {
        Self::capabilities_for(&self.shared.config)
    }

    async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
        options: &PublishOptions,
    ) -> Result<()> {
        self.append(topic, messages, options.delay);
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscriber>> {
        let (member, notify, group) = {
            let mut state = self.shared.lock();
            let member = state.next_id();
            let t = state.topic_mut(topic);
            let group = t.group(&options.group, options.start);
            state::lock(&group).join(member, options.max_in_flight);
            (member, t.notify.clone(), group)
        };
        Ok(Box::new(MemorySubscriber {
            bus: self.clone(),
            topic: topic.into(),
            group,
            options,
            member,
            notify,
            closed: Arc::new(AtomicBool::new(false)),
        }))
    }

    async fn provision(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        let mut state = self.shared.lock();
        state.topic_mut(topic).group(&options.group, options.start);
        Ok(())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        Ok(self.shared.lock().lag(topic, group))
    }

    async fn browse(&self, topic: &str, options: &crate::BrowseOptions) -> Result<Vec<Message>> {
        Ok(self.shared.lock().browse(topic, options))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        let notifies = self.shared.lock().all_notifies();
        for n in notifies {
            n.notify_waiters();
        }
        Ok(())
    }
}

struct MemorySubscriber {
    bus: Memory,
    topic: Arc<str>,
    /// The group's state, shared with the deliveries' ackers.
    group: state::SharedGroup,
    options: SubscribeOptions,
    member: u64,
    notify: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicBool>,
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1).await?.pop())
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let mut handed = Vec::new();
        loop {
            if self.closed.load(AtomicOrdering::Acquire)
                || self.bus.closed.load(AtomicOrdering::Acquire)
            {
                return Ok(Vec::new());
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let wait = {
                let mut state = self.bus.shared.lock();
                let retention = self.bus.shared.config.retention;
                let t = state.topic_mut(&self.topic);
                t.promote_due(now, retention);
                let ack_timeout = self.options.ack_timeout;
                t.dispatch(&self.group, self.member, now, ack_timeout, max, &mut handed)
            };
            if !handed.is_empty() {
                return Ok(handed.drain(..).map(|h| self.delivery(h)).collect());
            }
            match wait {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        if !self.closed.swap(true, AtomicOrdering::AcqRel) {
            self.leave(true);
        }
        Ok(())
    }
}

impl Drop for MemorySubscriber {
    fn drop(&mut self) {
        if self.closed.load(AtomicOrdering::Acquire) {
            return;
        }
        // A dropped subscriber of an open connection behaves like a crashed process: it
        // leaves the group, but its unacked deliveries come back only after their ack
        // timeout. After the connection was closed, they are handed back at once.
        let release = self.bus.closed.load(AtomicOrdering::Acquire);
        self.leave(release);
    }
}

impl MemorySubscriber {
    fn delivery(&self, h: Handout) -> Delivery {
        let event = crate::bus::Event::from_shared(self.topic.clone(), h.message, h.attempt);
        let acker = MemoryAck {
            bus: self.bus.clone(),
            group: self.group.clone(),
            notify: self.notify.clone(),
            offset: h.offset,
            tag: h.tag,
            subscriber_closed: self.closed.clone(),
        };
        crate::raw::delivery(event, Box::new(acker))
    }

    fn leave(&self, release: bool) {
        state::lock(&self.group).leave(self.member, release);
        self.notify.notify_waiters();
    }
}

struct MemoryAck {
    bus: Memory,
    group: state::SharedGroup,
    /// The topic's wake-up for waiting subscribers.
    notify: Arc<tokio::sync::Notify>,
    offset: u64,
    tag: u64,
    subscriber_closed: Arc<AtomicBool>,
}

impl MemoryAck {
    fn check_open(&self) -> Result<()> {
        self.bus.check_open()?;
        if self.subscriber_closed.load(AtomicOrdering::Acquire) {
            return Err(Error::closed("subscriber").with_backend(BACKEND));
        }
        Ok(())
    }

    /// Runs `f` on the group under its own lock; wakes the topic's waiting subscribers when
    /// `f` says so.
    fn with_group<T>(&self, f: impl FnOnce(&mut state::Group, &mut bool) -> T) -> T {
        let mut wake = false;
        let out = f(&mut state::lock(&self.group), &mut wake);
        if wake {
            self.notify.notify_waiters();
        }
        out
    }
}

#[async_trait]
impl Ack for MemoryAck {
    async fn ack(&self) -> Result<()> {
        self.check_open()?;
        self.with_group(|g, wake| *wake = g.ack(self.offset, self.tag));
        Ok(())
    }

    async fn redeliver(&self, after: Duration) -> Result<()> {
        self.check_open()?;
        let at = (!after.is_zero()).then(|| Instant::now() + after);
        self.with_group(|g, wake| *wake = g.nack(self.offset, self.tag, at));
        Ok(())
    }

    async fn release(&self) -> Result<()> {
        self.check_open()?;
        self.with_group(|g, wake| *wake = g.hand_back_unseen(self.offset, self.tag));
        Ok(())
    }

    async fn extend_deadline(&self, by: Duration) -> Result<()> {
        self.check_open()?;
        let at = Instant::now() + by;
        if self.with_group(|g, _| g.extend(self.offset, self.tag, at)) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Timeout,
                "the delivery is no longer held: its ack timeout expired and it was handed back",
            )
            .with_backend(BACKEND))
        }
    }
}

#[cfg(test)]
mod tests;
