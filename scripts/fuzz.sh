#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ (busbar's wire decoders and URL parsers) for SECONDS
# each (default 600), growing the corpus kept in fuzz/corpus/<target>/. CI runs it with a few
# seconds per target (a smoke run); before closing fuzzing work run it for 600 and, with
# --minimize, shrink the corpus to what covers the same code before committing it.
#
#   scripts/fuzz.sh [SECONDS] [--minimize]      FUZZ_TARGETS="redis_decode nats_decode" to pick
#
# Needs the nightly toolchain (rustup) and cargo-fuzz (installed under ~/.cache/busbar-tools
# when missing). Builds in ~/.cache/busbar-fuzz-target (FUZZ_TARGET_DIR), apart from the
# main workspace: sanitizer builds share nothing with it.
set -euo pipefail
seconds=600
minimize=false
for arg in "$@"; do
  case "$arg" in
    --minimize) minimize=true ;;
    *[!0-9]*|'') echo "usage: scripts/fuzz.sh [SECONDS] [--minimize]" >&2; exit 2 ;;
    *) seconds=$arg ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$HOME/.cache/busbar-tools"
export PATH="$tools/bin:$PATH"
target_dir=${FUZZ_TARGET_DIR:-$HOME/.cache/busbar-fuzz-target}
targets=${FUZZ_TARGETS:-"url_parsers redis_decode nats_decode amqp_decode kafka_decode sqs_decode"}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo +stable install cargo-fuzz --locked --version 0.13.2 --root "$tools"

cd "$root/fuzz"
cargo +nightly fuzz build --target-dir "$target_dir" -O
for t in $targets; do
  mkdir -p "corpus/$t"
  echo "== $t: ${seconds} s" >&2
  log="$target_dir/$t.log"
  if ! cargo +nightly fuzz run --target-dir "$target_dir" -O "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$log" >&2 || true
  if $minimize; then
    cargo +nightly fuzz cmin --target-dir "$target_dir" -O "$t" "corpus/$t" >/dev/null 2>&1
  fi
done
echo "fuzzing done: $targets ($seconds s each)" >&2
