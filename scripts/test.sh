#!/usr/bin/env bash
# scripts/test.sh — the whole test suite, as CI runs it: brokers up, format and lint checks,
# docs, then every test with BUSBAR_REQUIRE_BROKERS=1 (a backend test fails, never skips,
# when its broker is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${CI:-}" = true ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  # Keep builds between CI runs, outside the fresh clone.
  export CARGO_TARGET_DIR=$HOME/.cache/busbar-target
fi
export CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0

step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }
# A hung test must fail the run with its output, not eat CI's whole time budget.
TEST_TIMEOUT=${BUSBAR_TEST_TIMEOUT:-50m}

step "brokers (installed and started by scripts/brokers.sh; the machine runs none)"
eval "$(scripts/brokers.sh up)"
scripts/brokers.sh versions | tee target/broker-versions.txt
export BUSBAR_REQUIRE_BROKERS=1
# Every conformance case appends its result here: the README's compatibility table.
export BUSBAR_CONFORMANCE_REPORT=$PWD/target/conformance-report.jsonl
rm -f "$BUSBAR_CONFORMANCE_REPORT"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (default features, then all features) -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "docs -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "the default build pulls no broker client"
if cargo tree -p busbar -e normal --prefix none | grep -E '^(redis|rdkafka|async-nats|lapin|aws-sdk-sqs) '; then
  echo "the default busbar build depends on a broker client" >&2
  exit 1
fi

step "busbar check memory:// (the README's first command)"
cargo run --quiet -p busbar-cli -- check memory://

step "cargo test (all features, every crate, real brokers)"
timeout --kill-after=30s "$TEST_TIMEOUT" cargo test --workspace --all-features --no-fail-fast

step "compatibility table (backend x server, from this run's conformance report)"
scripts/compat-table "$BUSBAR_CONFORMANCE_REPORT" --versions target/broker-versions.txt
scripts/compat-table "$BUSBAR_CONFORMANCE_REPORT" --versions target/broker-versions.txt \
  --readme README.md --check

# After the tests: the benches create (and leave to expire) RabbitMQ quorum queues and load
# every broker; the tests should not run under that load on a 2-core machine.
step "benchmarks, smoke mode (each workload once, small counts; speed is never asserted)"
eval "$(scripts/watermill-bench)"
BUSBAR_BENCH_QUICK=1 cargo test -p busbar-benches --benches

step "fuzz smoke (every cargo-fuzz target of fuzz/ for 5 s; scripts/fuzz.sh 600 is a real run)"
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  scripts/fuzz.sh 5
else
  echo "NOT RUN: the fuzz targets need the nightly toolchain (rustup toolchain install nightly)" >&2
fi
