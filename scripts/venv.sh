#!/usr/bin/env bash
# Creates/updates the Python environment .venv-nb from notebooks/requirements.txt (notebook
# tools, confluent-kafka, and the noida-db broker that the exactly-once tests and the chaos
# harness run against). Source it: it sets VENV_PY and exports NOIDA_DB_BIN.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv-nb
REQ=$ROOT/notebooks/requirements.txt
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
VENV_PY=$VENV/bin/python
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
  echo "== installing $REQ into $VENV"
  "$VENV_PY" -m pip install -q --disable-pip-version-check -r "$REQ"
  echo "$want" >"$VENV/.requirements.sha256"
fi
# The `noida-db` command is a wrapper; tests run the broker binary itself so its PID is the
# broker's.
NOIDA_DB_BIN="$("$VENV_PY" -c 'import noida_db,os;print(os.path.dirname(noida_db.__file__))')/noida-db"
chmod +x "$NOIDA_DB_BIN"
export NOIDA_DB_BIN
