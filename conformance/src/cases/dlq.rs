//! Retry, dead-letter and redrive through the consumer runner.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use busbar_core::dead_letter::{headers as dlq_headers, redrive, RedriveOptions};
use busbar_core::{Consumer, Event, RetryPolicy, StartPosition};

use crate::support::{keyed, latest, parse_keyed, publish_all, wait_for, Ctx};
use crate::Outcome;

#[derive(Debug, Clone)]
struct Record {
    key: String,
    n: usize,
    attempt: u32,
    started: Instant,
    ended: Instant,
    ok: bool,
}

/// A poison message is retried per policy while other keys keep flowing, then lands in the
/// dead-letter topic with its error metadata; later messages of its key follow it; redrive
/// brings it back to the topic.
pub async fn runner_retry_then_dlq(ctx: Ctx) -> Result<Outcome> {
    let topic = ctx.topic("t");
    let dlq_topic = busbar_core::dead_letter::default_topic(&topic);
    let group = ctx.group("g");
    let bus = ctx.bus.clone();
    bus.provision(&topic, &latest(&group)).await?;
    bus.provision(&dlq_topic, &latest("inspect")).await?;
    let mut redrive_options = RedriveOptions::default();
    redrive_options.max_messages = Some(1);
    redrive_options.idle_timeout = Duration::from_secs(10);
    bus.provision(&dlq_topic, &latest(&redrive_options.group))
        .await?;

    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let r = records.clone();
    let consumer = Consumer::new(bus.clone(), &topic)
        .group(&group)
        .start(StartPosition::Latest)
        .concurrency(4)
        .retry(
            RetryPolicy::builder()
                .max_attempts(3)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_millis(100))
                .build()?,
        );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run_until(
        move |e: Event| {
            let r = r.clone();
            async move {
                let started = Instant::now();
                let (key, n) = parse_keyed(e.payload()).map_err(|e| e.to_string())?;
                let poison = key == "poison" && n == 1;
                tokio::time::sleep(Duration::from_millis(if poison { 200 } else { 5 })).await;
                r.lock().map_err(|_| "poisoned lock")?.push(Record {
                    key: key.clone(),
                    n,
                    attempt: e.attempt(),
                    started,
                    ended: Instant::now(),
                    ok: !poison,
                });
                if poison {
                    Err(format!("cannot process {key}/{n}: poison"))
                } else {
                    Ok(())
                }
            }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let mut msgs = vec![keyed("poison", 0), keyed("poison", 1), keyed("poison", 2)];
    for k in 0..4 {
        for n in 0..10 {
            msgs.push(keyed(&format!("ok{k}"), n));
        }
    }
    let ids = publish_all(bus.as_ref(), &topic, msgs).await?;
    let poison_id = ids[1].clone();
    let rc = records.clone();
    let waited = wait_for(
        Duration::from_secs(60),
        "poison/2 and every ok message",
        move || {
            let r = rc.lock().map(|r| r.clone()).unwrap_or_default();
            let ok_done: HashSet<(String, usize)> = r
                .iter()
                .filter(|x| x.ok)
                .map(|x| (x.key.clone(), x.n))
                .collect();
            ok_done.len() >= 42
        },
    )
    .await;
    let _ = stop_tx.send(());
    let report = run.await.context("runner task")??;
    waited?;
    let recs = records.lock().map_err(|_| anyhow!("poisoned"))?.clone();

    let poison: Vec<&Record> = recs
        .iter()
        .filter(|x| x.key == "poison" && x.n == 1)
        .collect();
    let attempts: Vec<u32> = poison.iter().map(|x| x.attempt).collect();
    for a in 1..=3 {
        ensure!(
            attempts.contains(&a),
            "attempt {a} of the poison message missing: {attempts:?}"
        );
    }
    ensure!(
        attempts.iter().all(|a| *a <= 3),
        "the poison message was tried beyond max_attempts: {attempts:?}"
    );
    let first_try = poison
        .iter()
        .map(|x| x.started)
        .min()
        .context("no poison attempt")?;
    let gave_up = poison
        .iter()
        .map(|x| x.ended)
        .max()
        .context("no poison attempt")?;
    let flowing = recs
        .iter()
        .filter(|x| x.key.starts_with("ok") && x.ended > first_try && x.ended < gave_up)
        .count();
    ensure!(
        flowing > 0,
        "no other key was handled while the poison message was retried"
    );
    let before = recs
        .iter()
        .find(|x| x.key == "poison" && x.n == 0)
        .context("poison/0 never handled")?;
    ensure!(
        before.ended <= first_try,
        "poison/1 started before poison/0 finished"
    );
    let after = recs
        .iter()
        .find(|x| x.key == "poison" && x.n == 2)
        .context("poison/2 never handled")?;
    ensure!(
        after.started >= gave_up,
        "poison/2 started before poison/1 was given up"
    );
    ensure!(report.dead_lettered >= 1, "runner report: {report:?}");

    // The dead-letter topic holds the message with its metadata.
    let mut inspect = bus.subscribe(&dlq_topic, latest("inspect")).await?;
    let dead = tokio::time::timeout(Duration::from_secs(30), inspect.next())
        .await
        .map_err(|_| anyhow!("nothing arrived in {dlq_topic}"))??
        .ok_or_else(|| anyhow!("the subscription ended early"))?;
    ensure!(
        dead.id() == poison_id,
        "the DLQ holds {} instead of the poison message",
        dead.id()
    );
    ensure!(dead.key() == Some("poison"), "key lost in the DLQ");
    ensure!(
        parse_keyed(dead.payload())? == ("poison".into(), 1),
        "payload changed in the DLQ"
    );
    let h = dead.headers();
    let error = h.get(dlq_headers::ERROR).unwrap_or_default();
    ensure!(error.contains("poison"), "DLQ error header is {error:?}");
    ensure!(
        h.get(dlq_headers::ATTEMPTS) == Some("3"),
        "attempts header {:?}",
        h.get(dlq_headers::ATTEMPTS)
    );
    ensure!(
        h.get(dlq_headers::ORIGINAL_TOPIC) == Some(topic.as_str()),
        "original topic header missing"
    );
    ensure!(
        h.get(dlq_headers::GROUP) == Some(group.as_str()),
        "group header missing"
    );
    let time = h.get(dlq_headers::TIME).context("time header missing")?;
    chrono::DateTime::parse_from_rfc3339(time).context("time header is not RFC 3339")?;
    dead.ack().await?;
    inspect.close().await?;

    // Redrive brings it back to the topic.
    let report = redrive(bus.as_ref(), &dlq_topic, &redrive_options)
        .await
        .context("redrive")?;
    ensure!(
        report.redriven == 1,
        "redrive moved {} messages",
        report.redriven
    );
    let mut again = bus.subscribe(&topic, latest(&group)).await?;
    let back = loop {
        let d = tokio::time::timeout(Duration::from_secs(30), again.next())
            .await
            .map_err(|_| anyhow!("the redriven message never arrived"))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        let is_poison = d.id() == poison_id;
        let body = d.message().clone();
        d.ack().await?;
        if is_poison {
            break body;
        }
    };
    ensure!(
        back.headers
            .get(busbar_core::dead_letter::REDRIVEN_FROM_HEADER)
            == Some(dlq_topic.as_str()),
        "redriven message lacks its origin header"
    );
    ensure!(
        back.headers.get(dlq_headers::ERROR).is_none(),
        "DLQ headers kept after redrive"
    );
    again.close().await?;
    Ok(Outcome::ok().note(format!(
        "poison attempts {attempts:?}; {flowing} other messages handled meanwhile"
    )))
}

/// Reads the dead letter `id` from `dlq_topic` the way `redrive` does (group
/// `busbar-redrive`, from the earliest retained message where the backend can replay),
/// checks its payload and error metadata, and hands it back for the redrive that follows.
async fn read_dead_letter(
    bus: &Arc<dyn busbar_core::EventBus>,
    dlq_topic: &str,
    id: &str,
    payload: &[u8],
    reason: &str,
) -> Result<()> {
    let start = if bus.capabilities().replay {
        StartPosition::Earliest
    } else {
        StartPosition::Latest
    };
    let group = RedriveOptions::default().group;
    let mut sub = bus
        .subscribe(
            dlq_topic,
            busbar_core::SubscribeOptions::new(group).start(start),
        )
        .await?;
    let dead = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .map_err(|_| anyhow!("the dead letter of {id} is not in {dlq_topic}: it was lost"))??
        .ok_or_else(|| anyhow!("the subscription ended early"))?;
    ensure!(
        dead.id() == id,
        "{dlq_topic} holds {} instead of {id}",
        dead.id()
    );
    ensure!(
        dead.payload().as_ref() == payload,
        "the dead letter's payload changed"
    );
    let error = dead.headers().get(dlq_headers::ERROR).unwrap_or_default();
    ensure!(
        error.contains(reason),
        "the dead letter's error header {error:?} does not name {reason:?}"
    );
    dead.release().await?;
    sub.close().await?;
    Ok(())
}

/// With NOTHING created on the dead-letter topics beforehand, a message dead-lettered by
/// `nack(DeadLetter)` (to the default `<topic>.dlq`, and to the topic of the subscription's
/// `DeadLetterPolicy`) and one given up on by the consumer runner (to its policy's topic) are
/// all kept, readable through busbar with their payload and error, and redriven.
pub async fn dead_letters_kept_without_provisioning(ctx: Ctx) -> Result<Outcome> {
    let bus = ctx.bus.clone();
    let group = ctx.group("g");
    let back_topic = ctx.topic("back");
    let check = ctx.group("check");
    bus.provision(&back_topic, &latest(&check)).await?;
    let mut redriven = bus.subscribe(&back_topic, latest(&check)).await?;
    let mut ids = Vec::new();

    // 1. nack(DeadLetter) on a raw subscriber.
    let raw_topic = ctx.topic("raw");
    bus.provision(&raw_topic, &latest(&group)).await?;
    let mut sub = bus.subscribe(&raw_topic, latest(&group)).await?;
    let m = busbar_core::Message::new("nacked to the DLQ").with_key("k");
    let raw_id = m.id.clone();
    bus.publish(&raw_topic, m, &busbar_core::PublishOptions::default())
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .map_err(|_| anyhow!("nothing arrived"))??
        .ok_or_else(|| anyhow!("the subscription ended early"))?;
    d.nack(busbar_core::NackAction::DeadLetter {
        reason: "raw nack: not an order".into(),
    })
    .await
    .context("nack(DeadLetter)")?;
    sub.close().await?;
    let raw_dlq = busbar_core::dead_letter::default_topic(&raw_topic);
    read_dead_letter(
        &bus,
        &raw_dlq,
        &raw_id,
        b"nacked to the DLQ",
        "raw nack: not an order",
    )
    .await?;
    ids.push((raw_dlq, raw_id));

    // 2. nack(DeadLetter) under a DeadLetterPolicy naming a topic of the user's.
    let own_topic = ctx.topic("own");
    let own_dlq = ctx.topic("own-rejected");
    let own_options =
        latest(&group).dead_letter(busbar_core::DeadLetterPolicy::to_topic(own_dlq.clone()));
    bus.provision(&own_topic, &own_options).await?;
    let mut sub = bus.subscribe(&own_topic, own_options).await?;
    let m = busbar_core::Message::new("rejected by policy").with_key("k");
    let own_id = m.id.clone();
    bus.publish(&own_topic, m, &busbar_core::PublishOptions::default())
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .map_err(|_| anyhow!("nothing arrived"))??
        .ok_or_else(|| anyhow!("the subscription ended early"))?;
    d.nack(busbar_core::NackAction::DeadLetter {
        reason: "policy nack: rejected".into(),
    })
    .await
    .context("nack(DeadLetter) under a DeadLetterPolicy")?;
    sub.close().await?;
    read_dead_letter(
        &bus,
        &own_dlq,
        &own_id,
        b"rejected by policy",
        "policy nack: rejected",
    )
    .await
    .context("the policy's dead-letter topic")?;
    ids.push((own_dlq, own_id));

    // 3. The consumer runner gives up after its retries, under a policy topic of the user's.
    let run_topic = ctx.topic("run");
    bus.provision(&run_topic, &latest(&group)).await?;
    let m = busbar_core::Message::new("given up on").with_key("k");
    let run_id = m.id.clone();
    let run_dlq = ctx.topic("run-failed");
    let consumer = Consumer::new(bus.clone(), &run_topic)
        .group(&group)
        .start(StartPosition::Latest)
        .dead_letter(busbar_core::DeadLetterPolicy::to_topic(run_dlq.clone()))
        .retry(
            RetryPolicy::builder()
                .max_attempts(2)
                .initial_delay(Duration::from_millis(50))
                .build()?,
        );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t = tries.clone();
    let run = tokio::spawn(consumer.run_until(
        move |_e: Event| {
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Err::<(), _>("runner: always fails".to_string()) }
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    bus.publish(&run_topic, m, &busbar_core::PublishOptions::default())
        .await?;
    wait_for(Duration::from_secs(30), "the runner's two attempts", || {
        tries.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await?;
    // The runner finishes the failed delivery (dead-letters it) before it stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    let report = run.await.context("runner task")??;
    ensure!(report.dead_lettered == 1, "runner report: {report:?}");
    read_dead_letter(
        &bus,
        &run_dlq,
        &run_id,
        b"given up on",
        "runner: always fails",
    )
    .await?;
    ids.push((run_dlq, run_id));

    // Both redrive to a topic of our own.
    for (dlq, id) in &ids {
        let mut options = RedriveOptions::default();
        options.target_topic = Some(back_topic.clone());
        options.max_messages = Some(1);
        options.idle_timeout = Duration::from_secs(10);
        let report = redrive(bus.as_ref(), dlq, &options)
            .await
            .context("redrive")?;
        ensure!(
            report.redriven == 1,
            "redrive of {dlq} moved {}",
            report.redriven
        );
        let d = tokio::time::timeout(Duration::from_secs(30), redriven.next())
            .await
            .map_err(|_| anyhow!("the redriven {id} never arrived"))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        ensure!(d.id() == id, "redrive brought {} instead of {id}", d.id());
        d.ack().await?;
    }
    redriven.close().await?;
    let expected: HashSet<&str> = ids.iter().map(|(_, id)| id.as_str()).collect();
    Ok(Outcome::ok().note(format!("{} dead letters kept and redriven", expected.len())))
}

/// The library calls behind `busbar dlq redrive ID…` and `busbar dlq purge`: of three dead
/// letters (three keys), redriving one id moves only it (the others are handed back
/// untouched), purging one id drops only it, and a redrive of the rest moves the last one.
pub async fn selective_redrive_and_purge(ctx: Ctx) -> Result<Outcome> {
    use busbar_core::dead_letter::purge;
    use busbar_core::{Message, NackAction, PublishOptions};
    let bus = ctx.bus.clone();
    let topic = ctx.topic("t");
    let dlq_topic = busbar_core::dead_letter::default_topic(&topic);
    let group = ctx.group("g");
    bus.provision(&topic, &latest(&group)).await?;
    bus.provision(&dlq_topic, &latest(&RedriveOptions::default().group))
        .await?;
    let mut sub = bus.subscribe(&topic, latest(&group)).await?;
    // Three keys, then three messages of one key (their order must survive the round trip).
    let sent: Vec<Message> = (1..=3)
        .map(|i| Message::new(format!("poison {i}")).with_key(format!("k{i}")))
        .chain((1..=3).map(|i| Message::new(format!("same {i}")).with_key("same")))
        .collect();
    let ids: Vec<String> = sent.iter().map(|m| m.id.clone()).collect();
    for m in sent {
        bus.publish(&topic, m, &PublishOptions::default()).await?;
    }
    for _ in 0..6 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| anyhow!("a poison message never arrived"))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        d.nack(NackAction::DeadLetter {
            reason: "poison".into(),
        })
        .await?;
    }
    let options = |only: &[&String]| {
        let mut o = RedriveOptions::default();
        o.idle_timeout = Duration::from_secs(5);
        o.only = (!only.is_empty()).then(|| only.iter().map(|s| (*s).clone()).collect());
        o
    };
    let moved = redrive(bus.as_ref(), &dlq_topic, &options(&[&ids[1]])).await?;
    ensure!(
        moved.ids == [ids[1].clone()],
        "redrive of {} moved {:?}",
        ids[1],
        moved.ids
    );
    let back = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .map_err(|_| anyhow!("the redriven message never came back"))??
        .ok_or_else(|| anyhow!("the subscription ended early"))?;
    ensure!(
        back.id() == ids[1],
        "{} came back instead of {}",
        back.id(),
        ids[1]
    );
    back.ack().await?;
    let dropped = purge(bus.as_ref(), &dlq_topic, &options(&[&ids[0]])).await?;
    ensure!(
        dropped.ids == [ids[0].clone()],
        "purge of {} dropped {:?}",
        ids[0],
        dropped.ids
    );
    let rest = redrive(bus.as_ref(), &dlq_topic, &options(&[])).await?;
    let mut moved_rest = rest.ids.clone();
    moved_rest.sort();
    let mut want: Vec<String> = ids[2..].to_vec();
    want.sort();
    ensure!(
        moved_rest == want,
        "the dead-letter topic held {:?} at the end, expected {:?}",
        rest.ids,
        &ids[2..]
    );
    let of_one_key = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter(|id| ids[3..].contains(id))
            .cloned()
            .collect()
    };
    // Order per key is kept where the backend orders per key (not SQS standard queues).
    let ordered = bus.capabilities().ordering == busbar_core::Ordering::PerKey;
    ensure!(
        !ordered || of_one_key(&rest.ids) == ids[3..],
        "redrive moved one key's dead letters out of order: {:?}, sent {:?}",
        of_one_key(&rest.ids),
        &ids[3..]
    );
    let mut back_again = Vec::new();
    while back_again.len() < 4 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .map_err(|_| anyhow!("only {} of 4 redriven messages came back", back_again.len()))??
            .ok_or_else(|| anyhow!("the subscription ended early"))?;
        back_again.push(d.id().to_owned());
        d.ack().await?;
    }
    ensure!(
        !ordered || of_one_key(&back_again) == ids[3..],
        "one key's redriven messages arrived out of order: {:?}, sent {:?}",
        of_one_key(&back_again),
        &ids[3..]
    );
    sub.close().await?;
    Ok(Outcome::ok().note(format!(
        "redrive of one id skipped {}, purge of one id skipped {}",
        moved.skipped, dropped.skipped
    )))
}
