#!/usr/bin/env bash
# Exactly-once chaos harness.
#
#   scripts/chaos.sh [--devices N] [--days N] [--kills N] [--store dir|kafka] [--seed N]
#
# 1. Starts a noida-db broker (Kafka protocol, from the venv) on a free loopback port and
#    builds the release binaries.
# 2. Synthesises telemetry (default 24 devices x 90 days hourly, about 51,000 records) and loads
#    it into a 6-partition input topic with 1 % garbage mixed in (non-JSON, missing value, wrong
#    key, empty value).
# 3. Golden run: one exactly-once instance, uninterrupted, until its group committed the whole
#    input.
# 4. Chaos run over the same input into other topics: instances i1 (static member) and i2
#    (dynamic member, so that stopping it gracefully hands its partitions over at once); while
#    they work, in random order and at random moments: kill -9 of i1 (restarted with the same
#    instance id) --kills times, one broker restart (SIGTERM, same port and data), and two
#    graceful stop/start cycles of i2 (each stop and each start is a rebalance). An instance
#    that exits on its own is restarted too (and reported).
# 5. Reads both outputs read_committed and compares them per input (partition, offset).
#
# The last line is
#   chaos: records=R enriched=E lost=L duplicated=D mismatched=M dead_letters=G kills=K broker_restarts=B rebalances=N
# and the exit status is non-zero unless L = D = M = 0 and G equals the garbage loaded.
# Logs and data stay in $CHAOS_OUT (default out/chaos).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DEVICES=24
DAYS=90
KILLS=5
BROKER_RESTARTS_WANTED=${CHAOS_BROKER_RESTARTS:-1}
STORE=dir
SEED=${CHAOS_SEED:-$(date +%s)}
PARTITIONS=6
GARBAGE_EVERY=100
INTERVAL=${CHAOS_CHECKPOINT_SECS:-5}
while [ $# -gt 0 ]; do
  case $1 in
    --devices) DEVICES=$2; shift 2 ;;
    --days) DAYS=$2; shift 2 ;;
    --kills) KILLS=$2; shift 2 ;;
    --store) STORE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case $STORE in dir|kafka) ;; *) echo "--store must be dir or kafka" >&2; exit 2 ;; esac
RANDOM=$SEED

OUT=${CHAOS_OUT:-$ROOT/out/chaos}
source scripts/venv.sh
echo "== building release binaries"
cargo build --release -q --bin generator --bin detector --bin detector-chaos
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
rm -rf "$OUT"
mkdir -p "$OUT"
# Checkpoints are large (a network is megabytes): keep them in memory when possible.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  CKPT=$(mktemp -d /dev/shm/chaos-ckpt.XXXXXX)
else
  CKPT=$OUT/ckpt
fi
PORT=$("$VENV_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
BOOT=127.0.0.1:$PORT
CHAOS() { "$BIN/detector-chaos" --bootstrap-servers "$BOOT" "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[$(date +%T)] $*"; }

BROKER_PID=
declare -A PIDS=()
cleanup() {
  for name in "${!PIDS[@]}"; do
    kill -TERM "${PIDS[$name]}" 2>/dev/null || true
  done
  for name in "${!PIDS[@]}"; do
    wait "${PIDS[$name]}" 2>/dev/null || true
  done
  if [ -n "$BROKER_PID" ]; then
    kill -TERM "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
  fi
  case $CKPT in /dev/shm/*) rm -rf "$CKPT" ;; esac
}
trap cleanup EXIT

start_broker() {
  "$NOIDA_DB_BIN" start --only kafka --kafka-port "$PORT" --data-dir "$OUT/broker" >>"$OUT/broker.log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "broker did not start; see $OUT/broker.log" >&2
  return 1
}
stop_broker() {
  if ! kill -TERM "$BROKER_PID" 2>/dev/null; then
    log "the broker had exited on its own; see $OUT/broker.log"
  fi
  wait "$BROKER_PID" || true
  BROKER_PID=
}

# config NAME GROUP OUTPUT DEAD STATIC WORKERS INTERVAL
config() {
  cat >"$OUT/$1.toml" <<EOF
group_id = "$2"
instance_id = "$1"
processing = "exactly_once"
static_membership = $5
workers = $6
[batch]
max_records = 1000
[kafka]
"bootstrap.servers" = "$BOOT"
[topics]
input = "chaos-in"
output = "$3"
dead_letter = "$4"
[checkpoint]
store = "$STORE"
dir = "$CKPT/$2"
interval_secs = $7
[metrics]
addr = ""
[htm]
probation = 168
[htm.ranges.44201]
min = 0.0
max = 0.1
[htm.ranges.42101]
min = 0.0
max = 2.0
[htm.ranges.88101]
min = 0.0
max = 40.0
EOF
}

start() { # instance
  "$BIN/detector" run --config "$OUT/$1.toml" >>"$OUT/$1.log" 2>&1 &
  PIDS[$1]=$!
}
CRASHES=0
# Restarts an instance that exited on its own (a real deployment's supervisor would).
supervise() {
  for name in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
      local rc=0
      wait "${PIDS[$name]}" || rc=$?
      CRASHES=$((CRASHES + 1))
      log "$name exited on its own (status $rc); restarting it"
      start "$name"
    fi
  done
}
pause_ms() { # random pause in [min, max) milliseconds, supervising meanwhile
  local ms=$(($1 + RANDOM % ($2 - $1)))
  local until=$(($(date +%s%3N) + ms))
  while [ "$(date +%s%3N)" -lt "$until" ]; do
    supervise
    sleep 0.1
  done
}
stop_instance() { # instance: graceful stop, must exit 0
  local rc=0
  kill -TERM "${PIDS[$1]}"
  wait "${PIDS[$1]}" || rc=$?
  unset "PIDS[$1]"
  if [ "$rc" -ne 0 ]; then
    log "$1 exited with status $rc on SIGTERM"
    CRASHES=$((CRASHES + 1))
  fi
}

log "seed $SEED, store $STORE, work dir $OUT, broker $BOOT"
start_broker

# ---------------------------------------------------------------- input
"$BIN/generator" synth --devices "$DEVICES" --days "$DAYS" --out "$OUT/data.csv" --labels "$OUT/labels.json" >"$OUT/synth.log"
LOADED=$(CHAOS load --data "$OUT/data.csv" --topic chaos-in --partitions "$PARTITIONS" --garbage-every "$GARBAGE_EVERY" 2>>"$OUT/load.log")
GARBAGE=$(echo "$LOADED" | sed -n 's/.*garbage=\([0-9]*\).*/\1/p')
log "$LOADED"
CHAOS topics --partitions "$PARTITIONS" golden-out golden-dead chaos-out chaos-dead

# ---------------------------------------------------------------- golden run
config golden chaos-golden golden-out golden-dead true 0 100000
t0=$(now)
start golden
CHAOS wait --group chaos-golden --topic chaos-in --timeout-secs 900 >>"$OUT/wait.log" 2>&1
stop_instance golden
log "golden run: $(elapsed "$t0") s"

# ---------------------------------------------------------------- chaos run
config i1 chaos chaos-out chaos-dead true 1 "$INTERVAL"
config i2 chaos chaos-out chaos-dead false 1 "$INTERVAL"
t0=$(now)
KILLED=0
BROKER_RESTARTS=0
REBALANCES=0
start i1
pause_ms 1500 3000
start i2
REBALANCES=$((REBALANCES + 1))
events=()
for _ in $(seq "$KILLS"); do events+=(kill); done
for _ in $(seq "$BROKER_RESTARTS_WANTED"); do events+=(broker); done
events+=(cycle cycle)
# Fisher-Yates shuffle with the seeded RANDOM.
for ((i = ${#events[@]} - 1; i > 0; i--)); do
  j=$((RANDOM % (i + 1)))
  tmp=${events[i]}
  events[i]=${events[j]}
  events[j]=$tmp
done
log "events: ${events[*]}"
for e in "${events[@]}"; do
  pause_ms 2000 6000
  case $e in
    kill)
      kill -KILL "${PIDS[i1]}"
      wait "${PIDS[i1]}" 2>/dev/null || true
      KILLED=$((KILLED + 1))
      log "kill -9 i1 (#$KILLED)"
      start i1
      ;;
    broker)
      log "restarting the broker (SIGTERM)"
      stop_broker
      sleep 1
      start_broker
      BROKER_RESTARTS=$((BROKER_RESTARTS + 1))
      ;;
    cycle)
      log "stopping i2 gracefully"
      stop_instance i2
      REBALANCES=$((REBALANCES + 1))
      pause_ms 2000 4000
      log "starting i2"
      start i2
      REBALANCES=$((REBALANCES + 1))
      ;;
  esac
done
log "events done; waiting for the group to commit the whole input"
deadline=$(($(date +%s) + 900))
until CHAOS wait --group chaos --topic chaos-in --timeout-secs 5 >>"$OUT/wait.log" 2>&1; do
  supervise
  if [ "$(date +%s)" -gt "$deadline" ]; then
    log "the chaos group did not commit the whole input in time"
    break
  fi
done
stop_instance i1
stop_instance i2
log "chaos run: $(elapsed "$t0") s; instances that exited on their own: $CRASHES"
grep -h "corrupt checkpoint" "$OUT"/i?.log | head -5 || true
log "snapshot restores: $(cat "$OUT"/i?.log | grep -c 'restored snapshot' || true)"

# ---------------------------------------------------------------- verdict (last line)
CHAOS verify --input chaos-in --golden-output golden-out --output chaos-out --dead-letter chaos-dead \
  --expected-dead-letters "$GARBAGE" --kills "$KILLED" --broker-restarts "$BROKER_RESTARTS" \
  --rebalances "$REBALANCES" 2>>"$OUT/verify.log"
