//! Criterion throughput benches: `<backend>/<workload>` for every workload of
//! [`busbar_benches::WORKLOADS`], each with `busbar`, `raw` (the client crate directly) and the
//! peers where they support the broker and the workload (`omniqueue`: memory, Redis;
//! `ruststream`: NATS, Redis, Kafka; `watermill` (Go): Redis, NATS, Kafka, RabbitMQ). Brokers
//! come from `BUSBAR_<BACKEND>_URL` (defaults on 127.0.0.1); a backend whose broker is
//! unreachable is skipped with a message.
//! `BUSBAR_BENCH_QUICK=1` (CI's smoke run) uses small message counts.
#![allow(missing_docs, clippy::panic)]

use std::time::Duration;

use busbar_benches::{run_workload, subjects_for, BACKENDS, WORKLOADS};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn quick() -> bool {
    std::env::var("BUSBAR_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn counts(backend: &str) -> (usize, usize) {
    match (quick(), backend) {
        (true, _) => (200, 200),
        (false, "memory") => (20_000, 20_000),
        // An emulator over HTTP: a few thousand messages per second at best.
        (false, "sqs") => (1_000, 2_000),
        (false, _) => (2_000, 5_000),
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    for (backend, var, default) in BACKENDS {
        let url = busbar_benches::url_from_env(var, default);
        let subjects = match rt.block_on(subjects_for(&url)) {
            Ok(s) => s,
            Err(e) if std::env::var("BUSBAR_REQUIRE_BROKERS").is_ok_and(|v| v == "1") => {
                panic!("{backend}: {e:#}; BUSBAR_REQUIRE_BROKERS=1 (start brokers with scripts/brokers.sh up)")
            }
            Err(e) => {
                eprintln!(
                    "not benchmarking {backend}: {e:#} (start brokers with scripts/brokers.sh up)"
                );
                continue;
            }
        };
        let (n_publish, n_e2e) = counts(backend);
        for workload in WORKLOADS {
            let n = if workload.starts_with("e2e") {
                n_e2e
            } else {
                n_publish
            };
            let mut group = c.benchmark_group(format!("{backend}/{workload}"));
            group.throughput(Throughput::Elements(n as u64));
            group.sample_size(10);
            if quick() {
                group.warm_up_time(Duration::from_millis(100));
                group.measurement_time(Duration::from_millis(200));
            } else {
                group.warm_up_time(Duration::from_secs(1));
                group.measurement_time(Duration::from_secs(8));
            }
            for subject in subjects.iter().filter(|s| s.runs(workload)) {
                group.bench_function(subject.label(), |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                total += run_workload(subject, workload, n)
                                    .await
                                    .expect("workload failed")
                                    .expect("a workload the subject runs");
                            }
                            total
                        })
                    })
                });
            }
            group.finish();
        }
    }
}

/// `outbox/<backend>`: rows/s relayed from PostgreSQL by one and by two relays.
fn bench_outbox(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let required = std::env::var("BUSBAR_REQUIRE_BROKERS").is_ok_and(|v| v == "1");
    let pool = match rt.block_on(busbar_benches::outbox::outbox_pool()) {
        Ok(p) => p,
        Err(e) if required => panic!("outbox: {e:#}; BUSBAR_REQUIRE_BROKERS=1"),
        Err(e) => {
            eprintln!(
                "not benchmarking the outbox: {e:#} (start PostgreSQL with scripts/brokers.sh up)"
            );
            return;
        }
    };
    let n = if quick() { 500 } else { 10_000 };
    for (backend, var, default) in BACKENDS
        .iter()
        .filter(|b| matches!(b.0, "memory" | "redis"))
    {
        let url = busbar_benches::url_from_env(var, default);
        let bus = match rt.block_on(busbar::connect(&url)) {
            Ok(b) => b,
            Err(e) if required => panic!("{backend}: {e}; BUSBAR_REQUIRE_BROKERS=1"),
            Err(e) => {
                eprintln!("not benchmarking the outbox into {backend}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("outbox/{backend}"));
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(10);
        if quick() {
            group.warm_up_time(Duration::from_millis(100));
            group.measurement_time(Duration::from_millis(200));
        } else {
            group.warm_up_time(Duration::from_secs(1));
            group.measurement_time(Duration::from_secs(10));
        }
        for relays in [1usize, 2] {
            group.bench_function(
                format!("{relays}_relay{}", if relays > 1 { "s" } else { "" }),
                |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                total += busbar_benches::outbox::relay(&pool, &bus, relays, n)
                                    .await
                                    .expect("outbox workload failed");
                            }
                            total
                        })
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, bench, bench_outbox);
criterion_main!(benches);
