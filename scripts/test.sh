#!/usr/bin/env bash
# The full test suite: every Rust test (the Kafka end-to-end tests run on librdkafka's in-process
# mock cluster), then the notebook, executed headless against the demo's output and against a real
# Kafka-protocol broker process (noida-db) filled by the generator and the detector.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
bash scripts/test-notebook.sh
