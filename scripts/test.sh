#!/usr/bin/env bash
# The full test suite: every Rust test (the Kafka end-to-end tests run on librdkafka's in-process
# mock cluster; the exactly-once tests on a real Kafka-protocol broker process, noida-db, from the
# venv), then the notebook, executed headless against the demo's output and against noida-db
# filled by the generator and the detector, then the exactly-once chaos harness.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh # exports NOIDA_DB_BIN for detector/tests/eos.rs
cargo test --workspace --release
bash scripts/test-notebook.sh
bash scripts/chaos.sh
