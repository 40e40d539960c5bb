#!/usr/bin/env bash
# The full test suite. Broker-free tests run everywhere; later stages start what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
