#!/usr/bin/env bash
# Runs the default HTM preset over the NAB corpus beside the repo and scores it with NAB's rules.
set -euo pipefail
cd "$(dirname "$0")/.."
nab="${NAB_DIR:-../shared/nab}"
out="${OUT_DIR:-out/nab}"
cargo run --release -q -p benches --bin nab -- --data "$nab/data" --out "$out" "$@"
cargo run --release -q -p benches --bin nab-score -- --data "$nab/data" \
    --labels "$nab/labels/combined_windows.json" --results "$out"
