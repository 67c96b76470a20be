//! The member's side of the group: membership (heartbeats on the group's announce exchange),
//! which queues to own (core's ownership rules: `share`, `verdict`), taking a queue, handing
//! it over, and reconnecting.

use super::*;

struct Owned {
    channel: Channel,
    reader: JoinHandle<()>,
    draining_since: Option<Instant>,
}

/// Reads one partition queue into the state.
async fn read_partition(
    shared: Arc<Shared>,
    p: i32,
    mut consumer: lapin::Consumer,
    queue: String,
    attempts: Channel,
) {
    while let Some(item) = consumer.next().await {
        let d = match item {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(queue, error = %e, "amqp: partition consumer ended");
                break;
            }
        };
        let redelivered = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").and_then(codec::number))
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        let tag = d.delivery_tag;
        let message = codec::decode(&d.properties, d.data);
        let attempt = shared
            .attempt_of(&attempts, p, &message, tag as i64, redelivered)
            .await;
        if shared
            .state()
            .receive_attempt(p, tag as i64, message, attempt)
        {
            shared.wake.notify_one();
        }
    }
}

/// Publishes `what:<id>` on the group's membership exchange (`hb`, `join` or `leave`).
async fn announce(control: &Channel, exchange: &str, what: &str, id: &str) -> Result<()> {
    let body = format!("{what}:{id}");
    control
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(""),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .map_err(|e| map_err(e, "announcing the member"))?;
    Ok(())
}

/// The member's control loop: membership, partition assignment and hand-over.
pub(super) struct Member {
    id: String,
    conn: Connection,
    control: Channel,
    shared: Arc<Shared>,
    owned: HashMap<u32, Owned>,
    peers: HashMap<String, Instant>,
    /// Wakes the heartbeat task at once (to answer a newcomer).
    beat_now: Arc<Notify>,
    /// The heartbeat task of the current connection.
    beater: Option<JoinHandle<()>>,
    /// Size of the group at the last view (for logging changes).
    last_view: usize,
    /// Reads and writes the attempts queues (confirm mode), on the current connection.
    attempts: Option<Channel>,
}

impl Member {
    /// A member of `shared`'s group on its own connection (`member_connection`).
    pub(super) fn new(id: String, conn: Connection, control: Channel, shared: Arc<Shared>) -> Self {
        Self {
            id,
            conn,
            control,
            shared,
            owned: HashMap::new(),
            peers: HashMap::new(),
            beat_now: Arc::new(Notify::new()),
            beater: None,
            last_view: 0,
            attempts: None,
        }
    }

    async fn announce(&self, what: &str) -> Result<()> {
        let exchange = config::members_exchange(&self.shared.topic, &self.shared.options.group);
        bounded(
            "announcing the member",
            announce(&self.control, &exchange, what, &self.id),
        )
        .await
    }

    /// Starts announcing the member every [`HEARTBEAT`] on the current connection, from a
    /// task of its own: a control loop busy with a slow broker call must not look dead to
    /// the others (they would take its queues, and hand them back when it reappears).
    fn start_heartbeat(&mut self) {
        self.stop_heartbeat();
        let control = self.control.clone();
        let exchange = config::members_exchange(&self.shared.topic, &self.shared.options.group);
        let id = self.id.clone();
        let now = self.beat_now.clone();
        self.beater = Some(tokio::spawn(async move {
            loop {
                let beat = announce(&control, &exchange, "hb", &id);
                match tokio::time::timeout(BROKER_CALL, beat).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(member = %id, error = %e, "amqp: heartbeat failed")
                    }
                    Err(_) => tracing::debug!(member = %id, "amqp: heartbeat timed out"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = now.notified() => {}
                }
            }
        }));
    }

    fn stop_heartbeat(&mut self) {
        if let Some(b) = self.beater.take() {
            b.abort();
        }
    }

    fn hear(&mut self, body: &[u8]) {
        let text = String::from_utf8_lossy(body);
        match text.split_once(':') {
            Some(("hb", id)) if id != self.id => {
                self.peers.insert(id.to_owned(), Instant::now());
            }
            Some(("join", id)) if id != self.id => {
                // A newcomer: answer at once, so it learns the group before taking queues.
                self.peers.insert(id.to_owned(), Instant::now());
                self.beat_now.notify_one();
            }
            Some(("leave", id)) => {
                self.peers.remove(id);
            }
            _ => {}
        }
    }

    /// The partitions this member should own now.
    fn target(&mut self) -> Vec<u32> {
        let now = Instant::now();
        self.peers
            .retain(|_, seen| now.duration_since(*seen) < MEMBER_TTL);
        let mut live: Vec<String> = self.peers.keys().cloned().collect();
        live.push(self.id.clone());
        let target = ownership::share(&live, &self.id, self.shared.inner.config.partitions);
        if live.len() != self.last_view {
            tracing::debug!(member = %self.id, members = live.len(), ?target, "amqp: group view changed");
            self.last_view = live.len();
        }
        target
    }

    /// Starts consuming partition `p` on a channel of its own. Every broker call is bounded,
    /// and a half-done take closes its channel again: a consumer left registered there could
    /// be the queue's single active consumer with nobody reading it. A channel that cannot
    /// be closed either is a [`busbar_core::ErrorKind::Connection`] error: the member
    /// reconnects, which removes it for sure.
    /// The member's attempts channel, opened on first use (and again after a reconnect).
    async fn attempts_channel(&mut self) -> Result<Channel> {
        if let Some(ch) = self.attempts.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let ch = bounded(
            "opening the attempts channel",
            attempts::open_channel(&self.conn),
        )
        .await?;
        self.attempts = Some(ch.clone());
        Ok(ch)
    }

    /// Writes partition `p`'s attempts record before its channel closes (see `attempts`):
    /// a failure is logged, and the next owner counts from RabbitMQ's delivery count.
    async fn write_attempts(&mut self, p: u32) {
        let Some(ledger) = self.shared.ledgers().remove(&(p as i32)) else {
            return;
        };
        let Some(ch) = self.attempts.clone() else {
            return;
        };
        let held = self.shared.state().unsettled(p as i32);
        let s = &self.shared;
        let _io = s.attempts_io.lock().await;
        let written = bounded(
            "writing the attempts record",
            attempts::write(&ch, &s.topic, &s.options.group, p, &ledger, &held),
        )
        .await;
        if let Err(e) = written {
            tracing::warn!(partition = p, error = %e, "amqp: writing the attempts record failed; the next owner counts hand-backs as deliveries");
        }
    }

    async fn take(&mut self, p: u32) -> Result<()> {
        let attempts = self.attempts_channel().await?;
        let ch = bounded("opening a channel", crate::create_channel(&self.conn)).await?;
        tracing::debug!(member = %self.id, partition = p, "amqp: taking a queue");
        let consumed = bounded(&format!("consuming partition {p}"), self.consume(&ch, p)).await;
        let (epoch, consumer, queue) = match consumed {
            Ok(c) => c,
            Err(e) => {
                self.shared.state().drop_partition(p as i32);
                let close = ch.close(200, ShortString::from("not taken"));
                if tokio::time::timeout(BROKER_CALL, close).await.is_err() {
                    return Err(Error::new(
                        busbar_core::ErrorKind::Connection,
                        format!("{e}; closing its channel got no answer either"),
                    )
                    .with_backend(BACKEND));
                }
                return Err(e);
            }
        };
        let s = &self.shared;
        s.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(p as i32, (epoch, ch.clone()));
        s.ledgers().insert(p as i32, Ledger::default());
        let reader = tokio::spawn(read_partition(
            s.clone(),
            p as i32,
            consumer,
            queue,
            attempts,
        ));
        self.owned.insert(
            p,
            Owned {
                channel: ch,
                reader,
                draining_since: None,
            },
        );
        Ok(())
    }

    /// Sets the prefetch on `ch`, assigns partition `p` a fresh epoch and consumes its queue.
    async fn consume(&self, ch: &Channel, p: u32) -> Result<(u64, lapin::Consumer, String)> {
        let s = &self.shared;
        let queue = config::queue(&s.topic, &s.options.group, p);
        let prefetch = s.options.max_in_flight.clamp(16, 1000) as u16;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| map_err(e, "setting the prefetch"))?;
        s.state().assign(p as i32);
        let epoch = s.state().epoch_of(p as i32).unwrap_or(0);
        let consumer = ch
            .basic_consume(
                ShortString::from(queue.as_str()),
                ShortString::from(format!("{}-{p}", self.id).as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(e, &format!("consuming {queue}")))?;
        Ok((epoch, consumer, queue))
    }

    async fn release(&mut self, p: u32) -> Result<()> {
        if let Some(o) = self.owned.remove(&p) {
            tracing::debug!(member = %self.id, partition = p, "amqp: handing a queue over");
            self.write_attempts(p).await;
            // The channel is closed before the reader is dropped: dropping lapin's consumer
            // cancels it, which would make the next member active while this channel still
            // holds unacked messages — it would receive later messages first. Closing the
            // channel returns its unacked messages to the head of the queue. If
            // RabbitMQ does not confirm the close, the member leaves altogether (closing its
            // connection returns everything too) rather than keep a queue nobody serves.
            // The partition is forgotten first: a late ack (racing the hand-over) then changes
            // nothing instead of failing on a closing channel, and its message comes back.
            self.shared
                .channels
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(p as i32));
            self.shared.state().drop_partition(p as i32);
            let closed = bounded(&format!("closing partition {p}'s channel"), async {
                // An error here means the channel is closed already: what the hand-over wants.
                let _ = o.channel.close(200, ShortString::from("handed over")).await;
                Ok(())
            })
            .await;
            o.reader.abort();
            closed?;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    async fn reconcile(&mut self) -> Result<()> {
        // A queue whose consumer the broker ended (a channel error, a cancel) while this
        // member still owns it would be served by nobody: give it up and take it again.
        let ended: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.draining_since.is_none() && o.reader.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            tracing::warn!(member = %self.id, partition = p, "amqp: the consumer of an owned queue ended; taking the queue again");
            self.release(p).await?;
        }
        let target = self.target();
        for &p in &target {
            match self.owned.get_mut(&p) {
                None => {
                    if let Err(e) = self.take(p).await {
                        // A refused channel (lapin can still be closing one with the same
                        // id) is retried on the next tick; a lost connection ends the member.
                        if !self.conn.status().connected()
                            || e.kind() == busbar_core::ErrorKind::Connection
                        {
                            return Err(e);
                        }
                        tracing::debug!(partition = p, error = %e, "amqp: taking a queue failed; retrying");
                    }
                }
                Some(o) if o.draining_since.is_some() => {
                    // Wanted again while draining: finish the hand-over first.
                }
                Some(_) => {}
            }
        }
        let now = Instant::now();
        let limit = self.shared.options.ack_timeout.min(DRAIN_MAX);
        let owned: Vec<u32> = self.owned.keys().copied().collect();
        for p in owned {
            let draining = self.owned.get(&p).and_then(|o| o.draining_since);
            match draining {
                None if !target.contains(&p) => {
                    self.shared.state().start_draining(p as i32);
                    if let Some(o) = self.owned.get_mut(&p) {
                        o.draining_since = Some(now);
                    }
                }
                Some(since) => {
                    // RabbitMQ fences the queue itself (single active consumer): the hand-over
                    // is closing the channel, which returns what is unacked to the queue's
                    // head, so either verdict releases.
                    let live = self.shared.state().live_in_flight(p as i32, now);
                    let activity = Activity {
                        in_flight: live,
                        ..Activity::default()
                    };
                    if ownership::verdict(activity, now.duration_since(since), limit).is_some() {
                        if live > 0 {
                            tracing::warn!(partition = p, live, "amqp: handing a partition over with deliveries unsettled; they come back");
                        }
                        self.release(p).await?;
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Joins: announces itself and listens for the members' answers before taking any
    /// queue, so a starting group does not shuffle queues (and prefetched messages) around.
    async fn join(&mut self, heard: &mut lapin::Consumer) -> Result<()> {
        self.announce("join").await?;
        let listen_until = Instant::now() + JOIN_LISTEN;
        while Instant::now() < listen_until && !self.shared.is_stopped() {
            match tokio::time::timeout_at(listen_until, heard.next()).await {
                Ok(Some(Ok(d))) => self.hear(&d.data),
                Ok(_) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Forgets every queue (their channels died with the connection; RabbitMQ returns their
    /// unacked messages) and reconnects, with backoff, until it works or the member stops.
    async fn recover(&mut self) -> Option<lapin::Consumer> {
        self.stop_heartbeat();
        let _ = tokio::time::timeout(
            BROKER_CALL,
            self.conn.close(200, ShortString::from("reconnecting")),
        )
        .await;
        for (p, o) in self.owned.drain() {
            o.reader.abort();
            self.shared.state().drop_partition(p as i32);
        }
        self.shared
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.peers.clear();
        self.attempts = None;
        self.shared.ledgers().clear();
        self.shared.wake.notify_one();
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.shared.is_stopped() {
                return None;
            }
            let s = self.shared.clone();
            match member_connection(&s.inner, &s.topic, &s.options.group, &self.id).await {
                Ok((conn, control, heard)) => {
                    tracing::info!(group = %s.options.group, "amqp: member reconnected");
                    self.conn = conn;
                    self.control = control;
                    return Some(heard);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        busbar_core::ErrorKind::Auth | busbar_core::ErrorKind::Config
                    ) =>
                {
                    s.fail(e);
                    return None;
                }
                Err(e) => {
                    tracing::warn!(group = %s.options.group, error = %e, ?backoff, "amqp: member reconnect failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = s.stopped.notified() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub(super) async fn run(mut self, mut heard: lapin::Consumer) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut joined = false;
        loop {
            if self.shared.is_stopped() {
                break;
            }
            let mut lost = !self.conn.status().connected();
            if !lost && !joined {
                lost = self.join(&mut heard).await.is_err();
                joined = !lost;
                if joined {
                    self.start_heartbeat();
                }
            }
            if !lost {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = self.shared.stopped.notified() => break,
                    m = heard.next() => match m {
                        Some(Ok(d)) => self.hear(&d.data),
                        Some(Err(_)) | None => lost = true,
                    },
                }
            }
            if !lost {
                if let Err(e) = self.reconcile().await {
                    tracing::warn!(group = %self.shared.options.group, error = %e, "amqp: member lost its footing; reconnecting");
                    lost = true;
                }
            }
            if lost {
                match self.recover().await {
                    Some(h) => {
                        heard = h;
                        joined = false;
                    }
                    None => break,
                }
            }
        }
        tracing::debug!(member = %self.id, "amqp: member leaving");
        self.stop_heartbeat();
        let _ = self.announce("leave").await;
        self.let_acks_settle().await;
        // The partition channels are closed (and answered) before the connection, each behind
        // its own acks and its attempts record.
        let owned: Vec<u32> = self.owned.keys().copied().collect();
        for p in owned {
            self.write_attempts(p).await;
        }
        for (p, o) in &self.owned {
            let close = o.channel.close(200, ShortString::from("member left"));
            if tokio::time::timeout(BROKER_CALL, close).await.is_err() {
                tracing::warn!(partition = p, "amqp: RabbitMQ did not confirm closing a partition channel; acks on it may not count");
            }
        }
        // Closing the connection returns every unacked message to its queue, in order. The
        // readers are dropped only afterwards (dropping one cancels its consumer first).
        let close = self.conn.close(200, ShortString::from("member left"));
        if tokio::time::timeout(BROKER_CALL, close).await.is_err() {
            tracing::warn!("amqp: RabbitMQ did not confirm closing the member's connection");
        }
        for (_, o) in self.owned.drain() {
            o.reader.abort();
        }
        self.shared.wake.notify_one();
    }
}

impl Member {
    /// Waits (at most [`ACK_SETTLE_MAX`]) until no ack went out for [`ACK_SETTLE_QUIET`]. A
    /// quorum queue's channel client sends settlements as Raft commands and, with more than
    /// a few dozen of them unapplied, stashes further ones until earlier ones are applied; a
    /// channel closed meanwhile drops the stash, and RabbitMQ hands those acked messages out
    /// again (seen on 3.10.8 and 4.0.5: up to 420 of 5,000 messages after clean closes under
    /// load, with every `basic.ack` frame written to the socket). AMQP 0-9-1 has no
    /// confirmation for an ack, so this is a grace period, not a proof: a broker too busy to
    /// apply acks within it can still redeliver them (at least once, never lost).
    async fn let_acks_settle(&self) {
        let started = Instant::now();
        loop {
            let quiet = self.shared.last_ack_age();
            if quiet >= ACK_SETTLE_QUIET || started.elapsed() >= ACK_SETTLE_MAX {
                return;
            }
            tokio::time::sleep(ACK_SETTLE_QUIET - quiet).await;
        }
    }
}

/// Opens a member's connection: its control channel and its inbox on the group's
/// membership exchange.
pub(super) async fn member_connection(
    inner: &Inner,
    topic: &str,
    group: &str,
    id: &str,
) -> Result<(Connection, Channel, lapin::Consumer)> {
    let conn = crate::open(&inner.config).await?;
    let control = bounded("opening the control channel", crate::create_channel(&conn)).await?;
    // Declared again (idempotent) in case the broker lost it.
    bounded(
        "declaring the group's membership exchange",
        crate::declare_members_exchange(&control, topic, group),
    )
    .await?;
    let inbox = bounded("declaring the member's inbox", async {
        control
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(e, "declaring the member's inbox"))
    })
    .await?;
    bounded("binding the member's inbox", async {
        control
            .queue_bind(
                inbox.name().clone(),
                ShortString::from(config::members_exchange(topic, group).as_str()),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(e, "binding the member's inbox"))
    })
    .await?;
    let heard = bounded("reading the group's members", async {
        control
            .basic_consume(
                inbox.name().clone(),
                ShortString::from(format!("{id}-members").as_str()),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(e, "reading the group's members"))
    })
    .await?;
    Ok((conn, control, heard))
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}
