#!/usr/bin/env bash
# Tests the anomaly notebook end to end:
#   0. creates/updates the venv .venv-nb from notebooks/requirements.txt
#   1. pytest on notebooks/tests
#   2. runs notebooks/anomalies.ipynb headless (papermill) on a JSON-lines file: $1 if given
#      (labels: optional $2), else the enriched records of `detector demo` over data/ (the
#      sample and its labels)
#   3. starts a real Kafka-protocol broker (noida-db) on a free loopback port, loads the sample
#      with `generator load`, runs `detector run` until every record is enriched, and runs the
#      notebook again with source="kafka" (+ live cell)
# Each notebook run must write one readable PNG per device and a summary holding every record.
# Outputs are kept in $NB_TEST_OUT (default out/nb-test) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${NB_TEST_OUT:-$ROOT/out/nb-test}

# ---------------------------------------------------------------- venv
source scripts/venv.sh
PY=$VENV_PY

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }

rm -rf "$OUT"
mkdir -p "$OUT"

# ---------------------------------------------------------------- binaries
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
echo "== building the generator and detector"
cargo build --release -q --bin generator --bin detector

# ---------------------------------------------------------------- unit tests
echo "== pytest notebooks/tests"
if "$PY" -m pytest -q notebooks/tests; then pass "pytest"; else fail "pytest"; fi

# ---------------------------------------------------------------- input data
if [ $# -ge 1 ]; then
  DATA=$(realpath "$1")
  LABELS=${2:+$(realpath "$2")}
else
  echo "== detector demo (enriched records of the sample data)"
  mkdir -p "$OUT/demo"
  DATA=$OUT/demo/enriched.jsonl
  LABELS=$ROOT/data/sample-labels.json
  # Exactly README's first command (plus output options), so it stays true.
  if cargo run --release -q -p detector -- demo --out "$DATA" --labels none >"$OUT/demo/demo.log" 2>&1; then
    pass "demo ($(tail -1 "$OUT/demo/demo.log"))"
  else
    tail -20 "$OUT/demo/demo.log" >&2
    fail "demo"
    exit 1
  fi
fi
# Independent count of what the notebook must load: non-null JSON objects with a device and a time.
EXPECTED=$("$PY" - "$DATA" <<'EOF'
import json, sys
n = 0
for line in open(sys.argv[1], "rb"):
    try:
        o = json.loads(line)
    except ValueError:
        continue
    n += isinstance(o, dict) and "deviceId" in o and "timestamp" in o
print(n)
EOF
)
echo "== data: $DATA ($EXPECTED records)${LABELS:+, labels: $LABELS}"
label_args=()
if [ -n "${LABELS:-}" ]; then label_args=(-p labels "$LABELS"); fi

run_notebook() { # name, papermill -p args...
  local name=$1
  shift
  mkdir -p "$OUT/$name"
  echo "== notebook ($name)"
  if "$PY" -m papermill -k python3 --cwd "$ROOT" notebooks/anomalies.ipynb "$OUT/$name/executed.ipynb" \
    -p output_dir "$OUT/$name/plots" -p expected_records "$EXPECTED" "${label_args[@]}" "$@" \
    >"$OUT/$name/papermill.log" 2>&1; then
    pass "notebook ran ($name)"
  else
    tail -40 "$OUT/$name/papermill.log" >&2
    fail "notebook ran ($name), log: $OUT/$name/papermill.log"
    return 1
  fi
}

check_outputs() { # name, extra check ("live" to require the live cell's output)
  local name=$1 extra=${2:-}
  if "$PY" - "$OUT/$name" "$DATA" "$EXPECTED" "$extra" <<'EOF'; then pass "outputs ($name)"; else fail "outputs ($name)"; fi
import csv, json, os, sys
sys.path.insert(0, "notebooks")
from PIL import Image
import anomaly_plots as ap

out, data, expected, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
plots = os.path.join(out, "plots")
devices = set()
for line in open(data, "rb"):
    try:
        o = json.loads(line)
    except ValueError:
        continue
    if isinstance(o, dict) and "deviceId" in o and "timestamp" in o:
        devices.add(str(o["deviceId"]))
problems = []
for dev in sorted(devices):
    png = os.path.join(plots, ap.png_name(dev))
    if not os.path.isfile(png):
        problems.append(f"missing {png}")
        continue
    size = os.path.getsize(png)
    with Image.open(png) as img:
        w, h = img.size
    print(f"  {os.path.basename(png)}: {size} bytes, {w}x{h}")
    if size <= 20_000 or w < 800 or h < 600:
        problems.append(f"{png}: {size} bytes, {w}x{h} is too small")
extra_pngs = {f for f in os.listdir(plots) if f.endswith(".png")} - {ap.png_name(d) for d in devices}
if extra_pngs:
    problems.append(f"unexpected figures (records that should not exist?): {sorted(extra_pngs)}")
rows = {r["deviceId"]: r for r in csv.DictReader(open(os.path.join(plots, "summary.csv")))}
if set(rows) - {"ALL"} != devices:
    problems.append(f"summary devices {sorted(rows)} != data devices {sorted(devices)}")
if int(rows.get("ALL", {}).get("records", -1)) != expected:
    problems.append(f"summary holds {rows.get('ALL', {}).get('records')} records, expected {expected}")
nb = json.load(open(os.path.join(out, "executed.ipynb")))
text = "".join(
    "".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
)
if f"{expected} records" not in text:
    problems.append("the load cell did not report the expected record count")
if extra == "live" and "live view ended" not in text:
    problems.append("the live cell did not finish")
for p in problems:
    print("  " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
}

# ---------------------------------------------------------------- (1) JSON-lines file
if run_notebook file -p source "$DATA"; then check_outputs file; fi

# ---------------------------------------------------------------- (2) real broker
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
DATA_DIR=$(mktemp -d)
NOIDA_PID=
cleanup() {
  if [ -n "$NOIDA_PID" ]; then
    kill "$NOIDA_PID" 2>/dev/null || true
    wait "$NOIDA_PID" 2>/dev/null || true
  fi
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT
echo "== broker: noida-db kafka on 127.0.0.1:$PORT"
"$NOIDA_DB_BIN" start --only kafka --kafka-port "$PORT" --data-dir "$DATA_DIR" >"$OUT/noida.log" 2>&1 &
NOIDA_PID=$!
if "$PY" - "$PORT" "$NOIDA_PID" <<'EOF'; then
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("broker exited early")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("broker did not accept connections within 30 s")
EOF
  pass "broker up"
  BOOT=127.0.0.1:$PORT
  if "$TARGET/generator" load "$ROOT/data/sample-epa.csv" --bootstrap-servers "$BOOT" --topic telemetry \
    --partitions 4 --no-progress >"$OUT/load.log" 2>&1; then
    pass "generator load"
  else
    cat "$OUT/load.log" >&2
    fail "generator load"
  fi
  SENT=$(grep -o 'sent: *[0-9]*' "$OUT/load.log" | grep -o '[0-9]*' || echo 0)
  CKPT=$(mktemp -d)
  "$TARGET/detector" run --config detector/detector.example.toml --bootstrap-servers "$BOOT" \
    --checkpoint-dir "$CKPT" --metrics-addr "" \
    >"$OUT/detector.log" 2>&1 &
  DETECTOR_PID=$!
  # The detector is a service: wait until the enriched topic holds every loaded record.
  if "$PY" - "$BOOT" "$SENT" <<'EOF'; then
import sys, time
from confluent_kafka import Consumer, TopicPartition
boot, want = sys.argv[1], int(sys.argv[2])
c = Consumer({"bootstrap.servers": boot, "group.id": "nb-test-watch"})
deadline = time.monotonic() + 180
have = 0
while time.monotonic() < deadline:
    md = c.list_topics("telemetry-enriched", timeout=5).topics.get("telemetry-enriched")
    if md is not None and not md.error:
        have = sum(c.get_watermark_offsets(TopicPartition("telemetry-enriched", p), timeout=5)[1]
                   for p in md.partitions)
        if have >= want:
            sys.exit(0)
    time.sleep(0.5)
sys.exit(f"enriched topic holds {have} of {want} records after 180 s")
EOF
    pass "detector enriched $SENT records"
  else
    tail -20 "$OUT/detector.log" >&2
    fail "detector enriched the loaded records"
  fi
  kill -TERM "$DETECTOR_PID" 2>/dev/null || true
  if wait "$DETECTOR_PID"; then pass "detector stopped cleanly on SIGTERM"; else fail "detector exit status"; fi
  rm -rf "$CKPT"
  EXPECTED=$SENT
  if run_notebook kafka -p source kafka -p bootstrap_servers "$BOOT" \
    -p topic telemetry-enriched -p poll_timeout_s 20 -p live_seconds 4 -p live_refresh_s 2; then
    check_outputs kafka live
  fi
else
  cat "$OUT/noida.log" >&2
  fail "broker up"
fi

echo "notebook: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
