//! The ownership rules on tokio's paused clock with [`MemoryLeaseStore`], including the
//! histories that broke per-key order in the backends before (each backend had its own copy).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;

const TTL: Duration = Duration::from_secs(6);
const STUCK: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Start(u32, HandOver),
    Stop(u32),
    GiveUp(u32, HandOver),
    Lost(u32),
}

/// A member's partitions as a backend would keep them: started until given up or lost.
#[derive(Default)]
struct Fake {
    parts: Mutex<BTreeMap<u32, Activity>>,
    log: Mutex<Vec<Ev>>,
}

impl Fake {
    fn set(&self, p: u32, f: impl FnOnce(&mut Activity)) {
        if let Some(a) = self.parts.lock().unwrap().get_mut(&p) {
            f(a);
        }
    }
    fn log(&self) -> Vec<Ev> {
        self.log.lock().unwrap().clone()
    }
    fn held(&self) -> Vec<u32> {
        self.parts.lock().unwrap().keys().copied().collect()
    }
}

#[async_trait]
impl Partitions for Fake {
    fn activity(&self, p: u32) -> Activity {
        self.parts
            .lock()
            .unwrap()
            .get(&p)
            .copied()
            .unwrap_or_default()
    }
    async fn start(&self, p: u32, after: HandOver) -> Result<()> {
        let recovering = after == HandOver::Hold;
        self.parts.lock().unwrap().insert(
            p,
            Activity {
                recovering,
                ..Activity::default()
            },
        );
        self.log.lock().unwrap().push(Ev::Start(p, after));
        Ok(())
    }
    fn stop(&self, p: u32) {
        self.log.lock().unwrap().push(Ev::Stop(p));
    }
    async fn give_up(&self, p: u32, how: HandOver) {
        self.parts.lock().unwrap().remove(&p);
        self.log.lock().unwrap().push(Ev::GiveUp(p, how));
    }
    fn lost(&self, p: u32) {
        self.parts.lock().unwrap().remove(&p);
        self.log.lock().unwrap().push(Ev::Lost(p));
    }
}

struct Member {
    own: Ownership<u64>,
    fake: Fake,
}

impl Member {
    fn new(id: &str, partitions: u32) -> Self {
        Self {
            own: Ownership::new(id, partitions, TTL, STUCK),
            fake: Fake::default(),
        }
    }
    async fn round(&self, store: &MemoryLeaseStore) {
        self.own.round(store, &self.fake).await.expect("round");
    }
    /// Recovery is over: the partitions taken after a hold serve like any other.
    fn recovered(&self) {
        for p in self.fake.held() {
            self.fake.set(p, |a| a.recovering = false);
        }
    }
}

/// No partition is held (started and not yet given up) by two members at once, and none is
/// served by two.
fn check_exclusive(members: &[&Member], partitions: u32) {
    let now = Instant::now();
    for p in 0..partitions {
        let held = members
            .iter()
            .filter(|m| m.fake.held().contains(&p))
            .count();
        let serving = members.iter().filter(|m| m.own.serving(p, now)).count();
        assert!(held <= 1, "partition {p} held by {held} members");
        assert!(serving <= 1, "partition {p} served by {serving} members");
    }
}

/// `n` rounds of every member in `members`, a tick apart, checking exclusivity throughout.
async fn rounds(store: &MemoryLeaseStore, members: &[&Member], partitions: u32, n: usize) {
    for _ in 0..n {
        for m in members {
            m.round(store).await;
            check_exclusive(members, partitions);
        }
        tokio::time::advance(TICK).await;
    }
}

fn members(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn share_is_disjoint_complete_and_only_for_members() {
    let all = members(&["c", "a", "b"]);
    let shares: Vec<Vec<u32>> = ["a", "b", "c"].iter().map(|m| share(&all, m, 8)).collect();
    assert_eq!(shares, vec![vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
    assert!(share(&all, "d", 8).is_empty());
    assert_eq!(share(&members(&["a", "a"]), "a", 3), vec![0, 1, 2]);
    assert!(share(&all, "a", 0).is_empty());
}

#[test]
fn verdicts() {
    let idle = Activity::default();
    let busy = Activity {
        in_flight: 2,
        ..idle
    };
    let reading = Activity {
        reading: true,
        ..idle
    };
    let recovering = Activity {
        recovering: true,
        ..busy
    };
    let s = Duration::from_secs(1);
    assert_eq!(verdict(idle, Duration::ZERO, STUCK), Some(HandOver::Clean));
    assert_eq!(verdict(busy, s, STUCK), None);
    assert_eq!(verdict(busy, STUCK, STUCK), Some(HandOver::Hold));
    assert_eq!(verdict(reading, s, STUCK), None);
    assert_eq!(verdict(reading, STUCK, STUCK), Some(HandOver::Hold));
    assert_eq!(verdict(recovering, s, STUCK), Some(HandOver::Hold));
}

#[tokio::test(start_paused = true)]
async fn members_joining_share_every_partition_and_never_hold_one_twice() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b, c) = (
        Member::new("a", 8),
        Member::new("b", 8),
        Member::new("c", 8),
    );
    rounds(&store, &[&a], 8, 3).await;
    assert_eq!(a.fake.held(), (0..8).collect::<Vec<_>>());
    a.recovered();
    rounds(&store, &[&a, &b], 8, 5).await;
    rounds(&store, &[&a, &b, &c], 8, 5).await;
    assert_eq!(a.fake.held(), vec![0, 3, 6]);
    assert_eq!(b.fake.held(), vec![1, 4, 7]);
    assert_eq!(c.fake.held(), vec![2, 5]);
    // a had nothing in flight: every hand-over was clean, and b and c started at once.
    assert!(b.fake.log().contains(&Ev::Start(1, HandOver::Clean)));
    assert!(!a
        .fake
        .log()
        .iter()
        .any(|e| matches!(e, Ev::GiveUp(_, HandOver::Hold))));
}

#[tokio::test(start_paused = true)]
async fn a_hand_over_waits_for_deliveries_in_flight_then_is_clean() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 2), Member::new("b", 2));
    rounds(&store, &[&a], 2, 2).await;
    a.recovered();
    a.fake.set(1, |x| x.in_flight = 1);
    rounds(&store, &[&a, &b], 2, 10).await;
    assert_eq!(
        a.fake.held(),
        vec![0, 1],
        "partition 1 went while a delivery was out"
    );
    assert!(a.fake.log().contains(&Ev::Stop(1)));
    assert!(!a.own.serving(1, Instant::now()));
    assert_eq!(store.holder(1).as_deref(), Some("a"));
    a.fake.set(1, |x| x.in_flight = 0);
    rounds(&store, &[&a, &b], 2, 2).await;
    assert!(a.fake.log().contains(&Ev::GiveUp(1, HandOver::Clean)));
    assert_eq!(b.fake.log(), vec![Ev::Start(1, HandOver::Clean)]);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_drain_is_handed_over_with_a_hold() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 2), Member::new("b", 2));
    rounds(&store, &[&a], 2, 2).await;
    a.recovered();
    a.fake.set(1, |x| x.in_flight = 3);
    // Just short of the stuck limit: still waiting.
    let ticks = (STUCK.as_millis() / TICK.as_millis()) as usize;
    rounds(&store, &[&a, &b], 2, ticks - 2).await;
    assert!(b.fake.held().is_empty());
    rounds(&store, &[&a, &b], 2, 4).await;
    assert!(a.fake.log().contains(&Ev::GiveUp(1, HandOver::Hold)));
    assert_eq!(b.fake.log(), vec![Ev::Start(1, HandOver::Hold)]);
}

#[tokio::test(start_paused = true)]
async fn a_read_in_progress_blocks_the_hand_over() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 2), Member::new("b", 2));
    rounds(&store, &[&a], 2, 2).await;
    a.recovered();
    // Nothing in flight, but a read started before the hand-over may still bring entries.
    a.fake.set(1, |x| x.reading = true);
    rounds(&store, &[&a, &b], 2, 10).await;
    assert!(
        b.fake.held().is_empty(),
        "taken while a read was in progress"
    );
    a.fake.set(1, |x| x.reading = false);
    rounds(&store, &[&a, &b], 2, 2).await;
    assert_eq!(b.fake.log(), vec![Ev::Start(1, HandOver::Clean)]);
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_recovery_makes_the_next_owner_wait_too() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 2), Member::new("b", 2));
    rounds(&store, &[&a], 2, 1).await;
    // a took both after nobody (a hold) and is still recovering when it dies: no more rounds.
    assert_eq!(
        a.fake.log(),
        vec![Ev::Start(0, HandOver::Hold), Ev::Start(1, HandOver::Hold)]
    );
    rounds(&store, &[&b], 2, 2).await;
    assert!(
        b.fake.held().is_empty(),
        "taken while a's leases were alive"
    );
    tokio::time::advance(TTL).await;
    rounds(&store, &[&b], 2, 2).await;
    assert_eq!(
        b.fake.log(),
        vec![Ev::Start(0, HandOver::Hold), Ev::Start(1, HandOver::Hold)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rebalance_during_the_recovery_wait_hands_over_with_a_hold() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 2), Member::new("b", 2));
    rounds(&store, &[&a], 2, 1).await;
    // a waits for what the previous owner left on partition 1 (nothing in flight yet) when
    // b joins: handing it over clean would let b hand out newer entries first.
    rounds(&store, &[&a, &b], 2, 3).await;
    assert!(a.fake.log().contains(&Ev::GiveUp(1, HandOver::Hold)));
    assert_eq!(b.fake.log(), vec![Ev::Start(1, HandOver::Hold)]);
}

#[tokio::test(start_paused = true)]
async fn wanted_back_while_draining_finishes_the_hand_over_first() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 2), Member::new("b", 2));
    rounds(&store, &[&a], 2, 2).await;
    a.recovered();
    a.fake.set(1, |x| x.in_flight = 1);
    rounds(&store, &[&a, &b], 2, 3).await;
    assert!(a.own.draining(1));
    // b dies before it got partition 1; once its member entry expires a wants 1 again.
    tokio::time::advance(TTL).await;
    rounds(&store, &[&a], 2, 3).await;
    assert!(a.own.draining(1), "the hand-over was called off");
    a.fake.set(1, |x| x.in_flight = 0);
    rounds(&store, &[&a], 2, 3).await;
    let log = a.fake.log();
    let tail: Vec<Ev> = log
        .iter()
        .copied()
        .filter(|e| matches!(e, Ev::GiveUp(1, _) | Ev::Start(1, _)))
        .collect();
    assert_eq!(
        tail,
        vec![
            Ev::Start(1, HandOver::Hold),
            Ev::GiveUp(1, HandOver::Clean),
            Ev::Start(1, HandOver::Clean)
        ]
    );
    assert!(a.own.serving(1, Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_member_stops_serving_and_drops_a_lost_lease() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 1), Member::new("b", 1));
    rounds(&store, &[&a], 1, 1).await;
    a.recovered();
    assert!(a.own.serving(0, Instant::now()));
    // a stalls (a long pause, a cut connection): it stops serving before its lease expires.
    tokio::time::advance(TTL * 2 / 3).await;
    assert!(!a.own.serving(0, Instant::now()));
    tokio::time::advance(TTL).await;
    b.round(&store).await;
    assert_eq!(b.fake.log(), vec![Ev::Start(0, HandOver::Hold)]);
    a.round(&store).await;
    assert!(a.fake.log().contains(&Ev::Lost(0)));
    assert!(a.own.owned().is_empty());
    assert_eq!(store.holder(0).as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn leaving_releases_as_told_and_the_others_take_over_at_once() {
    let store = MemoryLeaseStore::new(TTL);
    let (a, b) = (Member::new("a", 4), Member::new("b", 4));
    rounds(&store, &[&a, &b], 4, 3).await;
    a.recovered();
    b.recovered();
    assert_eq!((a.fake.held(), b.fake.held()), (vec![0, 2], vec![1, 3]));
    a.own
        .leave(&store, |p| {
            if p == 0 {
                HandOver::Clean
            } else {
                HandOver::Hold
            }
        })
        .await
        .expect("leave");
    b.round(&store).await;
    assert_eq!(b.fake.held(), vec![0, 1, 2, 3]);
    let log = b.fake.log();
    assert!(log.contains(&Ev::Start(0, HandOver::Clean)));
    assert!(log.contains(&Ev::Start(2, HandOver::Hold)));
}

#[tokio::test(start_paused = true)]
async fn a_partition_the_member_drains_itself_is_handed_over_then_taken_again() {
    let store = MemoryLeaseStore::new(TTL);
    let a = Member::new("a", 1);
    rounds(&store, &[&a], 1, 1).await;
    a.recovered();
    a.fake.set(0, |x| x.in_flight = 1);
    assert!(a.own.drain(0));
    assert!(!a.own.drain(0), "already draining");
    assert!(!a.own.serving(0, Instant::now()));
    rounds(&store, &[&a], 1, 3).await;
    assert!(a.own.draining(0), "released with a delivery out");
    a.fake.set(0, |x| x.in_flight = 0);
    rounds(&store, &[&a], 1, 2).await;
    assert_eq!(
        a.fake.log(),
        vec![
            Ev::Start(0, HandOver::Hold),
            Ev::GiveUp(0, HandOver::Clean),
            Ev::Start(0, HandOver::Clean)
        ]
    );
}
