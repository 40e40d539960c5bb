"""Load, plot and score the HTM detector's enriched records.

The detector writes one JSON object per record to a Kafka topic (key = device id) and, in demo mode,
the same objects as JSON lines. This module turns either source into a pandas DataFrame, draws one
stacked figure per device, and scores flagged anomalies against a labels file. It is kept separate
from the notebook so that every piece can be unit-tested without Jupyter or a broker.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Numbers the detector adds; null in JSON (e.g. no prediction yet) becomes NaN.
NUMERIC_COLUMNS = (
    "value",
    "prediction",
    "error",
    "anomaly",
    "predictionNext",
    "anomalyLikelihood",
    "logLikelihood",
)
BOOL_COLUMNS = ("spatialAnomaly", "isAnomaly")
INT_COLUMNS = ("partition", "offset")
# Where a record sat in the enriched topic itself; "partition"/"offset" in the record refer to the
# detector's input topic, so these get their own names.
TOPIC_POSITION_COLUMNS = ("topic_partition", "topic_offset")
BASE_COLUMNS = ("deviceId", "timestamp") + NUMERIC_COLUMNS + BOOL_COLUMNS + INT_COLUMNS

# NuPIC's log-likelihood maps likelihood L to log(1.0000000001 - L) / log(1e-10), so that the
# interesting region close to 1 spreads over 0..1; the plots use it to show the threshold.
_LOG_EPS = 1.0000000001
_LOG_DENOM = math.log(1e-10)


def log_likelihood(likelihood: float) -> float:
    """NuPIC's log-scaled anomaly likelihood (0..1) for a likelihood in 0..1."""
    return math.log(_LOG_EPS - likelihood) / _LOG_DENOM


# --------------------------------------------------------------------------------------------
# Parsing and filtering of single records
# --------------------------------------------------------------------------------------------


def parse_time(value: Any) -> pd.Timestamp:
    """Parse an RFC 3339 string, datetime or Timestamp into a UTC Timestamp (naive = UTC)."""
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        return ts.tz_localize("UTC")
    return ts.tz_convert("UTC")


def _fast_epoch_ns(text: str) -> int | None:
    """Record timestamp as epoch nanoseconds, or None if it is not a parseable time.

    datetime.fromisoformat is an order of magnitude faster than pandas per call, which matters
    when filtering hundreds of thousands of records one by one.
    """
    try:
        dt = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


@dataclass
class RecordFilter:
    """Which records to keep: a device allow-list and an inclusive UTC time range."""

    devices: frozenset[str] | None = None
    start_ns: int | None = None
    end_ns: int | None = None

    @classmethod
    def build(
        cls,
        devices: Iterable[str] | str | None = None,
        start: Any = None,
        end: Any = None,
    ) -> "RecordFilter":
        if isinstance(devices, str):
            devices = [devices]
        start_ns = None if start is None else parse_time(start).value
        end_ns = None if end is None else parse_time(end).value
        if start_ns is not None and end_ns is not None and start_ns > end_ns:
            raise ValueError(f"start ({start}) is after end ({end})")
        return cls(None if devices is None else frozenset(map(str, devices)), start_ns, end_ns)

    def keeps(self, device_id: str, ts_ns: int) -> bool:
        if self.devices is not None and device_id not in self.devices:
            return False
        if self.start_ns is not None and ts_ns < self.start_ns:
            return False
        if self.end_ns is not None and ts_ns > self.end_ns:
            return False
        return True


@dataclass
class LoadStats:
    """Counters describing one load (or live poll) from a source."""

    messages: int = 0
    records: int = 0
    skipped_null: int = 0
    skipped_invalid: int = 0
    filtered_out: int = 0
    truncated: bool = False  # stopped at max_records
    caught_up: bool = True  # reached the end of the data (watermarks / end of file)

    def merge(self, other: "LoadStats") -> None:
        self.messages += other.messages
        self.records += other.records
        self.skipped_null += other.skipped_null
        self.skipped_invalid += other.skipped_invalid
        self.filtered_out += other.filtered_out

    def __str__(self) -> str:
        extra = " (stopped at max_records)" if self.truncated else ""
        if not self.caught_up:
            extra += " (did NOT reach the end: timed out)"
        return (
            f"{self.messages} messages -> {self.records} records kept; skipped "
            f"{self.skipped_null} null, {self.skipped_invalid} invalid, "
            f"{self.filtered_out} filtered out{extra}"
        )


def accept_raw(
    raw: bytes | str | None,
    flt: RecordFilter,
    stats: LoadStats,
    key: bytes | str | None = None,
) -> dict | None:
    """Decode one message/line into a record dict, updating stats; None when skipped.

    Null payloads (Kafka tombstones, JSON null, empty lines) and undecodable ones are counted
    rather than raised, because a long topic can legitimately contain a few of them.
    """
    stats.messages += 1
    if raw is None or len(raw) == 0:
        stats.skipped_null += 1
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        stats.skipped_invalid += 1
        return None
    if obj is None:
        stats.skipped_null += 1
        return None
    if not isinstance(obj, dict):
        stats.skipped_invalid += 1
        return None
    device = obj.get("deviceId")
    if device is None and key is not None:
        device = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        obj["deviceId"] = device
    ts = obj.get("timestamp")
    ts_ns = _fast_epoch_ns(ts) if isinstance(ts, str) else None
    if device is None or ts_ns is None:
        stats.skipped_invalid += 1
        return None
    if not flt.keeps(str(device), ts_ns):
        stats.filtered_out += 1
        return None
    stats.records += 1
    return obj


# --------------------------------------------------------------------------------------------
# Records -> DataFrame
# --------------------------------------------------------------------------------------------


def records_to_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Build the typed frame: UTC datetime64[ns] timestamps, float metrics, bool flags.

    Rows are sorted by (deviceId, timestamp) with a stable sort so equal timestamps keep their
    arrival order.
    """
    df = pd.DataFrame.from_records(list(records)) if records else pd.DataFrame()
    for col in BASE_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series([None] * len(df), dtype=object)
    df["deviceId"] = df["deviceId"].astype(str)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601").astype(
        "datetime64[ns, UTC]"
    )
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in BOOL_COLUMNS:
        # Only a real JSON true counts; missing/null means "not flagged".
        df[col] = df[col].map(lambda v: v is True or v is np.True_).astype(bool)
    for col in INT_COLUMNS + TOPIC_POSITION_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df = df.sort_values(["deviceId", "timestamp"], kind="mergesort").reset_index(drop=True)
    return df


def append_records(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Frame with extra records appended (re-sorted); used by the live view."""
    if not records:
        return frame
    new = records_to_frame(records)
    if frame.empty:
        return new
    both = pd.concat([frame, new], ignore_index=True)
    return both.sort_values(["deviceId", "timestamp"], kind="mergesort").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class JsonlSource:
    """A JSON-lines file read once to its end, then tailed for lines appended later."""

    def __init__(self, path: str | os.PathLike, flt: RecordFilter | None = None):
        self.path = Path(path)
        self.filter = flt or RecordFilter()
        self._fh = open(self.path, "rb")
        self._pending = b""

    def _read_lines(self, max_records: int | None, stats: LoadStats) -> list[dict]:
        out: list[dict] = []
        while True:
            if max_records is not None and len(out) >= max_records:
                stats.truncated = True
                return out
            line = self._fh.readline()
            if not line:
                break
            if not line.endswith(b"\n"):
                # The writer may be mid-line; keep the bytes and retry on the next read.
                self._pending += line
                break
            line = self._pending + line
            self._pending = b""
            self._take(line.strip(), stats, out)
        if self._pending:
            # A last line without newline that already parses is complete (a valid JSON object
            # cannot be the prefix of a longer valid line).
            try:
                json.loads(self._pending)
            except ValueError:
                return out
            line, self._pending = self._pending, b""
            self._take(line.strip(), stats, out)
        return out

    def _take(self, line: bytes, stats: LoadStats, out: list[dict]) -> None:
        if not line:
            return  # blank lines are layout, not messages
        rec = accept_raw(line, self.filter, stats)
        if rec is not None:
            out.append(rec)

    def read_available(self, max_records: int | None = None) -> tuple[list[dict], LoadStats]:
        """All records currently in the file (up to max_records kept records)."""
        stats = LoadStats()
        return self._read_lines(max_records, stats), stats

    def poll(self, timeout_s: float) -> tuple[list[dict], LoadStats]:
        """Records appended during the next timeout_s seconds."""
        stats = LoadStats()
        out: list[dict] = []
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            out.extend(self._read_lines(None, stats))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out, stats
            time.sleep(min(0.2, remaining))

    def close(self) -> None:
        self._fh.close()


class KafkaSource:
    """A read_committed consumer on the enriched topic.

    `read_available` reads every partition up to the high watermark taken when it starts, then
    returns; the consumer stays open so that `poll` can follow new records for the live view.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str | None = None,
        flt: RecordFilter | None = None,
        poll_timeout_s: float = 10.0,
        batch_size: int = 500,
        extra_config: Mapping[str, Any] | None = None,
    ):
        from confluent_kafka import Consumer  # imported lazily: file mode needs no librdkafka

        self.topic = topic
        self.filter = flt or RecordFilter()
        self.poll_timeout_s = float(poll_timeout_s)
        self.batch_size = int(batch_size)
        self.group_id = group_id or f"anomaly-notebook-{uuid.uuid4()}"
        conf = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": self.group_id,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # EOF events tell us a partition is drained even when its last offsets are
            # transaction markers that never reach the application.
            "enable.partition.eof": True,
        }
        conf.update(extra_config or {})
        self._consumer = Consumer(conf)
        self._subscribed = False

    def partitions(self) -> list[int]:
        md = self._consumer.list_topics(self.topic, timeout=self.poll_timeout_s)
        tmd = md.topics.get(self.topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            reason = tmd.error if tmd is not None else "no metadata"
            raise RuntimeError(f"topic {self.topic!r} is not available: {reason}")
        return sorted(tmd.partitions)

    def watermarks(self) -> dict[int, tuple[int, int]]:
        """(low, high) offsets per partition as the broker reports them now."""
        from confluent_kafka import TopicPartition

        return {
            p: self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=self.poll_timeout_s
            )
            for p in self.partitions()
        }

    def _subscribe(self) -> None:
        if not self._subscribed:
            self._consumer.subscribe([self.topic])
            self._subscribed = True

    def _handle(self, msgs: list, stats: LoadStats, out: list[dict], eof: set[int], pos: dict):
        from confluent_kafka import KafkaError

        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                raise RuntimeError(f"Kafka consumer error: {err}")
            pos[m.partition()] = m.offset() + 1
            rec = accept_raw(m.value(), self.filter, stats, key=m.key())
            if rec is not None:
                rec["topic_partition"] = m.partition()
                rec["topic_offset"] = m.offset()
                out.append(rec)

    def read_available(self, max_records: int | None = None) -> tuple[list[dict], LoadStats]:
        """Consume in batches until every partition reached its start-time high watermark.

        Stops early at max_records kept records, or when nothing arrives for poll_timeout_s
        (then stats.caught_up is False) so a broken broker never blocks the notebook forever.
        """
        stats = LoadStats()
        out: list[dict] = []
        targets = {p: high for p, (low, high) in self.watermarks().items() if high > low}
        self._subscribe()
        pos: dict[int, int] = {}
        eof: set[int] = set()
        last_progress = time.monotonic()
        while True:
            pending = [p for p, high in targets.items() if pos.get(p, -1) < high and p not in eof]
            if not pending:
                break
            if max_records is not None and len(out) >= max_records:
                stats.truncated = True
                break
            if time.monotonic() - last_progress > self.poll_timeout_s:
                stats.caught_up = False
                break
            msgs = self._consumer.consume(self.batch_size, timeout=min(1.0, self.poll_timeout_s))
            if msgs:
                last_progress = time.monotonic()
            self._handle(msgs, stats, out, eof, pos)
        if max_records is not None and len(out) > max_records:
            # The last batch may overshoot; the unused tail is simply not shown.
            del out[max_records:]
            stats.records = max_records
            stats.truncated = True
        return out, stats

    def poll(self, timeout_s: float) -> tuple[list[dict], LoadStats]:
        """Records that arrive during the next timeout_s seconds."""
        self._subscribe()
        stats = LoadStats()
        out: list[dict] = []
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out, stats
            msgs = self._consumer.consume(self.batch_size, timeout=min(1.0, remaining))
            self._handle(msgs, stats, out, set(), {})

    def close(self) -> None:
        self._consumer.close()


def open_source(
    source: str,
    *,
    bootstrap_servers: str = "localhost:9092",
    topic: str = "telemetry-enriched",
    group_id: str | None = None,
    devices: Iterable[str] | str | None = None,
    start: Any = None,
    end: Any = None,
    poll_timeout_s: float = 10.0,
) -> JsonlSource | KafkaSource:
    """ "kafka" opens the topic; anything else is a path to a JSON-lines file."""
    flt = RecordFilter.build(devices, start, end)
    if source == "kafka":
        return KafkaSource(bootstrap_servers, topic, group_id, flt, poll_timeout_s)
    return JsonlSource(source, flt)


def load_jsonl(
    path: str | os.PathLike,
    devices: Iterable[str] | str | None = None,
    start: Any = None,
    end: Any = None,
    max_records: int | None = None,
) -> tuple[pd.DataFrame, LoadStats]:
    """Read a JSON-lines file of enriched records into a typed frame."""
    src = JsonlSource(path, RecordFilter.build(devices, start, end))
    try:
        records, stats = src.read_available(max_records)
    finally:
        src.close()
    return records_to_frame(records), stats


def load_kafka(
    bootstrap_servers: str,
    topic: str,
    group_id: str | None = None,
    devices: Iterable[str] | str | None = None,
    start: Any = None,
    end: Any = None,
    max_records: int | None = None,
    poll_timeout_s: float = 10.0,
) -> tuple[pd.DataFrame, LoadStats]:
    """Read the enriched topic up to its current high watermarks into a typed frame."""
    src = KafkaSource(
        bootstrap_servers, topic, group_id, RecordFilter.build(devices, start, end), poll_timeout_s
    )
    try:
        records, stats = src.read_available(max_records)
    finally:
        src.close()
    return records_to_frame(records), stats


# --------------------------------------------------------------------------------------------
# Flags, labels and scoring
# --------------------------------------------------------------------------------------------


def flag_anomalies(frame: pd.DataFrame, likelihood_threshold: float | None = None) -> pd.Series:
    """Boolean flags: the detector's isAnomaly, or anomalyLikelihood >= the given threshold."""
    if likelihood_threshold is None:
        return frame["isAnomaly"].astype(bool)
    return frame["anomalyLikelihood"].ge(float(likelihood_threshold)).fillna(False).astype(bool)


def infer_threshold(frame: pd.DataFrame) -> float | None:
    """Best guess of the detector's configured likelihood threshold from its isAnomaly flags.

    isAnomaly = likelihood >= T or spatialAnomaly, so the lowest likelihood among non-spatial
    flags is the tightest known value at or above T. None when no such flag exists.
    """
    sel = frame["isAnomaly"] & ~frame["spatialAnomaly"]
    vals = frame.loc[sel, "anomalyLikelihood"].dropna()
    return None if vals.empty else float(vals.min())


@dataclass(frozen=True)
class Window:
    """A labelled anomaly window, inclusive on both ends."""

    start: pd.Timestamp
    end: pd.Timestamp
    kind: str = ""


def load_labels(path: str | os.PathLike) -> dict[str, list[Window]]:
    """Read `{deviceId: [{"kind", "start", "end"}, ...]}` into sorted Windows per device."""
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: labels must be a JSON object keyed by deviceId")
    labels: dict[str, list[Window]] = {}
    for device, items in raw.items():
        wins = []
        for i, item in enumerate(items):
            try:
                w = Window(parse_time(item["start"]), parse_time(item["end"]), str(item.get("kind", "")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: bad window {i} for device {device!r}: {exc}") from exc
            if w.start > w.end:
                raise ValueError(f"{path}: window {i} for device {device!r} ends before it starts")
            wins.append(w)
        labels[str(device)] = sorted(wins, key=lambda w: (w.start, w.end))
    return labels


@dataclass
class PrecisionRecall:
    """Window-based detection score for one device (or summed over devices)."""

    flags: int = 0
    flags_in_windows: int = 0
    windows: int = 0
    detected: int = 0

    @property
    def precision(self) -> float:
        """Flags inside windows / flags; NaN when nothing was flagged."""
        return self.flags_in_windows / self.flags if self.flags else float("nan")

    @property
    def recall(self) -> float:
        """Windows with at least one flag / windows; NaN when there are no windows."""
        return self.detected / self.windows if self.windows else float("nan")

    def __add__(self, other: "PrecisionRecall") -> "PrecisionRecall":
        return PrecisionRecall(
            self.flags + other.flags,
            self.flags_in_windows + other.flags_in_windows,
            self.windows + other.windows,
            self.detected + other.detected,
        )


def precision_recall(
    timestamps: Sequence[Any] | pd.Series,
    flags: Sequence[bool] | pd.Series,
    windows: Sequence[Window],
    margin_rows: int = 0,
) -> PrecisionRecall:
    """Score one device's flags against its windows.

    A flag is a true positive when its row falls inside a window widened by `margin_rows` rows
    of this device on each side; a window counts as detected when it holds at least one flag.
    """
    if margin_rows < 0:
        raise ValueError("margin_rows must be >= 0")
    ts = pd.to_datetime(pd.Series(timestamps), utc=True).astype("datetime64[ns, UTC]")
    ts_ns = ts.dt.tz_localize(None).to_numpy().view("int64")
    fl = np.asarray(flags, dtype=bool)
    if len(fl) != len(ts_ns):
        raise ValueError("timestamps and flags differ in length")
    order = np.argsort(ts_ns, kind="stable")
    ts_ns, fl = ts_ns[order], fl[order]
    n = len(ts_ns)
    inside = np.zeros(n, dtype=bool)
    detected = 0
    for w in windows:
        lo = int(np.searchsorted(ts_ns, w.start.value, side="left"))
        hi = int(np.searchsorted(ts_ns, w.end.value, side="right"))
        lo, hi = max(0, lo - margin_rows), min(n, hi + margin_rows)
        inside[lo:hi] = True
        if fl[lo:hi].any():
            detected += 1
    return PrecisionRecall(int(fl.sum()), int((fl & inside).sum()), len(windows), detected)


def _first_value(frame: pd.DataFrame, col: str) -> str | None:
    if col not in frame.columns:
        return None
    vals = frame[col].dropna()
    return None if vals.empty else str(vals.iloc[0])


def summary(
    frame: pd.DataFrame,
    flags: pd.Series,
    labels: Mapping[str, Sequence[Window]] | None = None,
    margin_rows: int = 0,
    include_total: bool = True,
) -> pd.DataFrame:
    """Per-device table: records, flags, time span and (with labels) precision/recall.

    With include_total, a last row "ALL" sums the counts and gives micro-averaged
    precision/recall over all devices.
    """
    rows = []
    total = PrecisionRecall()
    for device, d in frame.groupby("deviceId", sort=True):
        f = flags.loc[d.index]
        row: dict[str, Any] = {
            "deviceId": device,
            "parameter": _first_value(d, "parameterName") or "",
            "units": _first_value(d, "unitsOfMeasure") or "",
            "records": len(d),
            "flagged": int(f.sum()),
            "first": d["timestamp"].min(),
            "last": d["timestamp"].max(),
        }
        if labels is not None:
            pr = precision_recall(d["timestamp"], f, labels.get(str(device), []), margin_rows)
            total = total + pr
            row.update(
                windows=pr.windows,
                detected=pr.detected,
                flags_in_windows=pr.flags_in_windows,
                precision=pr.precision,
                recall=pr.recall,
            )
        rows.append(row)
    columns = ["deviceId", "parameter", "units", "records", "flagged", "first", "last"]
    if labels is not None:
        columns += ["windows", "detected", "flags_in_windows", "precision", "recall"]
    table = pd.DataFrame(rows, columns=columns)
    if include_total and rows:
        all_row: dict[str, Any] = {
            "deviceId": "ALL",
            "parameter": "",
            "units": "",
            "records": int(table["records"].sum()),
            "flagged": int(table["flagged"].sum()),
            "first": table["first"].min(),
            "last": table["last"].max(),
        }
        if labels is not None:
            all_row.update(
                windows=total.windows,
                detected=total.detected,
                flags_in_windows=total.flags_in_windows,
                precision=total.precision,
                recall=total.recall,
            )
        table = pd.concat([table, pd.DataFrame([all_row], columns=columns)], ignore_index=True)
    return table


# --------------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def png_name(device_id: str) -> str:
    """File name for a device's figure; anything unsafe in a path becomes '_'."""
    return _SAFE_NAME.sub("_", str(device_id)) + ".png"


def _naive_utc(ts: pd.Series) -> np.ndarray:
    # Matplotlib's date axis wants naive values; the axis label says they are UTC.
    return ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()


def _title(d: pd.DataFrame, device_id: str) -> str:
    param = _first_value(d, "parameterName")
    units = _first_value(d, "unitsOfMeasure")
    title = str(device_id)
    if param:
        title += f" — {param}" + (f" ({units})" if units else "")
    place = ", ".join(v for v in (_first_value(d, "countyName"), _first_value(d, "stateName")) if v)
    return title + (f"\n{place}" if place else "")


def plot_device(
    frame: pd.DataFrame,
    device_id: str | None = None,
    *,
    flags: pd.Series | None = None,
    windows: Sequence[Window] = (),
    threshold: float | None = None,
    threshold_note: str = "",
    subtitle: str = "",
    output_path: str | os.PathLike | None = None,
    figsize: tuple[float, float] = (12.0, 10.0),
    dpi: int = 100,
) -> Figure:
    """One figure for one device: five stacked panels on a shared UTC time axis.

    Panels: value with prediction and flagged anomalies (red), prediction error, raw anomaly
    score, anomaly likelihood with the threshold, log likelihood with the same threshold on the
    log scale. Labelled windows are shaded on every panel. Saved as PNG when output_path is set.
    The figure is not registered with pyplot, so building many of them leaks nothing.
    """
    if device_id is None:
        ids = frame["deviceId"].unique()
        if len(ids) != 1:
            raise ValueError("frame holds several devices: pass device_id")
        device_id = str(ids[0])
    sel = frame["deviceId"] == device_id
    d = frame.loc[sel]
    f = (flags.loc[d.index] if flags is not None else d["isAnomaly"]).to_numpy(dtype=bool)
    t = _naive_utc(d["timestamp"])

    title = _title(d, device_id)
    if subtitle:
        title += f"\n{subtitle}"
    # Fixed margins instead of constrained layout: that would double the rendering time, which
    # matters for the live view and for topics with hundreds of devices.
    fig = Figure(figsize=figsize, dpi=dpi)
    top_in = 0.45 + 0.25 * (title.count("\n") + 1)
    fig.subplots_adjust(
        left=0.9 / figsize[0],
        right=1 - 0.25 / figsize[0],
        bottom=0.6 / figsize[1],
        top=1 - top_in / figsize[1],
        hspace=0.3,
    )
    axes = fig.subplots(5, 1, sharex=True, height_ratios=[3.0, 1.3, 1.3, 1.5, 1.5])
    ax_val, ax_err, ax_raw, ax_lik, ax_log = axes
    fig.suptitle(title, fontsize=13, y=1 - 0.12 / figsize[1], va="top")

    units = _first_value(d, "unitsOfMeasure")
    ax_val.plot(t, d["value"], color="C0", lw=1.0, label="value")
    ax_val.plot(t, d["prediction"], color="C1", lw=1.0, ls="--", alpha=0.85, label="prediction")
    if f.any():
        ax_val.scatter(
            t[f],
            d["value"].to_numpy()[f],
            s=36,
            color="red",
            zorder=5,
            label=f"flagged anomaly ({int(f.sum())})",
        )
    ax_val.set_ylabel(f"value\n({units})" if units else "value")

    ax_err.plot(t, d["error"], color="C2", lw=0.9, label="prediction error")
    ax_err.set_ylabel("error")

    ax_raw.plot(t, d["anomaly"], color="C4", lw=0.8, label="raw anomaly score")
    ax_raw.set_ylim(-0.03, 1.05)
    ax_raw.set_ylabel("anomaly")

    ax_lik.plot(t, d["anomalyLikelihood"], color="C3", lw=0.9, label="anomaly likelihood")
    ax_log.plot(t, d["logLikelihood"], color="C5", lw=0.9, label="log likelihood")
    if f.any():
        ax_lik.scatter(t[f], d["anomalyLikelihood"].to_numpy()[f], s=14, color="red", zorder=5)
        ax_log.scatter(t[f], d["logLikelihood"].to_numpy()[f], s=14, color="red", zorder=5)
    if threshold is not None:
        note = f" {threshold_note}" if threshold_note else ""
        ax_lik.axhline(threshold, color="black", ls=":", lw=1.2, label=f"threshold {threshold:g}{note}")
        if threshold < _LOG_EPS:
            ax_log.axhline(
                log_likelihood(threshold),
                color="black",
                ls=":",
                lw=1.2,
                label=f"threshold {threshold:g} (log scale)",
            )
    ax_lik.set_ylim(-0.03, 1.05)
    ax_lik.set_ylabel("likelihood")
    ax_log.set_ylim(-0.03, 1.05)
    ax_log.set_ylabel("log\nlikelihood")

    # A window covers whole samples: widen it by half a sampling step on each side (and to at
    # least 0.4% of the time range) so that a one-sample spike window stays visible.
    pad = np.timedelta64(0, "ns")
    if len(t) > 1:
        step = np.median(np.diff(t).astype("int64"))
        span = int((t.max() - t.min()).astype("int64"))
        pad = np.timedelta64(int(max(step / 2, span * 0.002)), "ns")
    for i, w in enumerate(windows):
        lo = w.start.tz_convert("UTC").tz_localize(None).to_datetime64() - pad
        hi = w.end.tz_convert("UTC").tz_localize(None).to_datetime64() + pad
        for ax in axes:
            ax.axvspan(
                lo,
                hi,
                color="orange",
                alpha=0.22,
                lw=0,
                label="labelled window" if (i == 0 and ax is ax_val) else None,
            )

    for ax in axes:
        ax.grid(True, alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if handles:
            # One row just above each panel: never hides data, and costs nothing to place
            # (loc="best" is slow on long series).
            ax.legend(
                handles,
                names,
                loc="lower left",
                bbox_to_anchor=(0.0, 1.0),
                ncol=len(handles),
                fontsize="small",
                frameon=False,
                borderaxespad=0.1,
                handlelength=1.8,
            )
    if len(t) == 0:
        ax_val.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax_val.transAxes)
    else:
        locator = mdates.AutoDateLocator()
        ax_log.xaxis.set_major_locator(locator)
        ax_log.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax_log.set_xlabel("time (UTC)")

    if output_path is not None:
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output_path, dpi=dpi, format="png")
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure, for IPython.display.Image in the live view."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Live view
# --------------------------------------------------------------------------------------------


@dataclass
class LiveResult:
    """What the live view saw: the grown frame, how many records arrived, refresh count."""

    frame: pd.DataFrame
    new_records: int = 0
    refreshes: int = 0
    stats: LoadStats = field(default_factory=LoadStats)


def live_view(
    source: Any,
    frame: pd.DataFrame,
    *,
    seconds: float,
    render: Callable[[Figure | None, str], None],
    device: str | None = None,
    refresh_s: float = 3.0,
    points: int = 500,
    likelihood_threshold: float | None = None,
    threshold: float | None = None,
    threshold_note: str = "",
    windows: Mapping[str, Sequence[Window]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LiveResult:
    """Poll `source` for new records and re-render one device's figure until `seconds` pass.

    `device` None follows the device of the most recent record. Each poll is bounded by the
    time left, so the loop always ends (also headless under papermill). `render` receives the
    figure (None while there is nothing to draw) and a one-line status.
    """
    result = LiveResult(frame)
    deadline = clock() + max(0.0, float(seconds))
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        records, stats = source.poll(min(refresh_s, remaining))
        result.stats.merge(stats)
        result.new_records += len(records)
        result.frame = append_records(result.frame, records)
        df = result.frame
        follow = device
        if follow is None and records:
            follow = str(records[-1].get("deviceId"))
        elif follow is None and not df.empty:
            follow = str(df.loc[df["timestamp"].idxmax(), "deviceId"])
        status = f"live: +{result.new_records} records, {len(df)} total"
        if follow is None or df.empty or not (df["deviceId"] == follow).any():
            render(None, status + " (nothing to draw yet)")
        else:
            d = df.loc[df["deviceId"] == follow].tail(points)
            fig = plot_device(
                d,
                follow,
                flags=flag_anomalies(d, likelihood_threshold),
                windows=[
                    w
                    for w in (windows or {}).get(follow, [])
                    if w.end >= d["timestamp"].iloc[0] and w.start <= d["timestamp"].iloc[-1]
                ],
                threshold=threshold,
                threshold_note=threshold_note,
                subtitle=f"live, last {len(d)} records, updated {pd.Timestamp.now(tz='UTC'):%H:%M:%S} UTC",
            )
            render(fig, status + f", showing {follow}")
        result.refreshes += 1
    return result


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root: the nearest directory (upwards) holding notebooks/anomaly_plots.py.

    The notebook resolves relative paths against it, so it behaves the same whether Jupyter
    starts in notebooks/ or papermill runs from the repository root.
    """
    here = Path(start or os.getcwd()).resolve()
    for cand in (here, *here.parents):
        if (cand / "notebooks" / "anomaly_plots.py").is_file():
            return cand
    return here


__all__ = [
    "JsonlSource",
    "KafkaSource",
    "LiveResult",
    "LoadStats",
    "PrecisionRecall",
    "RecordFilter",
    "Window",
    "accept_raw",
    "append_records",
    "figure_png",
    "find_root",
    "flag_anomalies",
    "infer_threshold",
    "live_view",
    "load_jsonl",
    "load_kafka",
    "load_labels",
    "log_likelihood",
    "open_source",
    "parse_time",
    "plot_device",
    "png_name",
    "precision_recall",
    "records_to_frame",
    "summary",
]
