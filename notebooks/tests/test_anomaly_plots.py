"""Unit tests for notebooks/anomaly_plots.py on small synthetic data (no broker, no Jupyter)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import anomaly_plots as ap  # noqa: E402
import fixture  # noqa: E402

T0 = pd.Timestamp("2024-03-01T00:00:00Z")


def hours(*idx):
    return [T0 + pd.Timedelta(hours=i) for i in idx]


def window(a, b, kind="spike"):
    return ap.Window(T0 + pd.Timedelta(hours=a), T0 + pd.Timedelta(hours=b), kind)


def record(device, hour, value, **extra):
    rec = {
        "deviceId": device,
        "timestamp": (T0 + pd.Timedelta(hours=hour)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "value": value,
        "prediction": value + 0.5,
        "error": 0.5,
        "anomaly": 0.1,
        "predictionNext": value,
        "anomalyLikelihood": 0.5,
        "logLikelihood": ap.log_likelihood(0.5),
        "spatialAnomaly": False,
        "isAnomaly": False,
        "partition": 0,
        "offset": hour,
    }
    rec.update(extra)
    return rec


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# ---------------------------------------------------------------- precision / recall arithmetic


def test_precision_recall_counts_flags_and_windows():
    ts = hours(*range(10))
    flags = [i in (2, 3, 7) for i in range(10)]
    pr = ap.precision_recall(ts, flags, [window(2, 4), window(8, 9)])
    assert (pr.flags, pr.flags_in_windows, pr.windows, pr.detected) == (3, 2, 2, 1)
    assert pr.precision == pytest.approx(2 / 3)
    assert pr.recall == pytest.approx(0.5)


def test_precision_recall_window_bounds_are_inclusive():
    ts = hours(*range(10))
    flags = [i in (2, 4) for i in range(10)]
    pr = ap.precision_recall(ts, flags, [window(2, 4)])
    assert pr.flags_in_windows == 2 and pr.detected == 1
    # Just outside on both sides: nothing counts.
    pr = ap.precision_recall(ts, [i in (1, 5) for i in range(10)], [window(2, 4)])
    assert pr.flags_in_windows == 0 and pr.detected == 0 and pr.precision == 0.0


def test_precision_recall_margin_rows_widen_windows():
    ts = hours(*range(10))
    flags = [i in (2, 3, 7) for i in range(10)]
    pr = ap.precision_recall(ts, flags, [window(2, 4), window(8, 9)], margin_rows=1)
    assert (pr.flags_in_windows, pr.detected) == (3, 2)
    assert pr.precision == 1.0 and pr.recall == 1.0
    # A window between rows holds no row; a margin reaches the neighbours of its position.
    ts2 = hours(0, 1, 2, 5, 6)
    pr = ap.precision_recall(ts2, [False, False, True, False, False], [window(3, 4)])
    assert pr.detected == 0
    pr = ap.precision_recall(ts2, [False, False, True, False, False], [window(3, 4)], margin_rows=1)
    assert pr.detected == 1 and pr.flags_in_windows == 1
    with pytest.raises(ValueError):
        ap.precision_recall(ts, flags, [], margin_rows=-1)


def test_precision_recall_overlapping_windows_count_flag_once():
    ts = hours(*range(10))
    flags = [i == 5 for i in range(10)]
    pr = ap.precision_recall(ts, flags, [window(3, 6), window(5, 8)])
    assert (pr.flags, pr.flags_in_windows, pr.windows, pr.detected) == (1, 1, 2, 2)


def test_precision_recall_order_independent_and_nan_when_undefined():
    rng = np.random.default_rng(3)
    idx = list(range(12))
    flags = [i in (1, 6, 10) for i in idx]
    wins = [window(0, 2), window(9, 11), window(4, 4)]
    ref = ap.precision_recall(hours(*idx), flags, wins)
    perm = rng.permutation(12)
    shuffled = ap.precision_recall([hours(*idx)[i] for i in perm], [flags[i] for i in perm], wins)
    assert shuffled == ref
    assert (ref.flags_in_windows, ref.detected) == (2, 2)
    none = ap.precision_recall(hours(*idx), [False] * 12, [])
    assert math.isnan(none.precision) and math.isnan(none.recall)
    total = ref + ap.PrecisionRecall(flags=1, flags_in_windows=1, windows=1, detected=1)
    assert total.precision == pytest.approx(3 / 4) and total.recall == pytest.approx(3 / 4)


def test_summary_per_device_and_micro_averaged_total():
    recs = [record("a", h, float(h), isAnomaly=h in (1, 5)) for h in range(8)]
    recs += [record("b", h, float(h), isAnomaly=h == 2) for h in range(4)]
    df = ap.records_to_frame(recs)
    labels = {"a": [window(0, 1), window(3, 4)], "b": [window(2, 2)], "zzz": [window(0, 9)]}
    table = ap.summary(df, ap.flag_anomalies(df), labels).set_index("deviceId")
    assert list(table.index) == ["a", "b", "ALL"]
    assert table.loc["a", "records"] == 8 and table.loc["a", "flagged"] == 2
    assert table.loc["a", "precision"] == pytest.approx(0.5)  # hour 1 in, hour 5 out
    assert table.loc["a", "recall"] == pytest.approx(0.5)  # window 3..4 missed
    assert table.loc["b", "precision"] == 1.0 and table.loc["b", "recall"] == 1.0
    assert table.loc["ALL", "records"] == 12 and table.loc["ALL", "flagged"] == 3
    assert table.loc["ALL", "precision"] == pytest.approx(2 / 3)
    assert table.loc["ALL", "recall"] == pytest.approx(2 / 3)
    assert table.loc["a", "first"] == T0 and table.loc["a", "last"] == T0 + pd.Timedelta(hours=7)
    no_labels = ap.summary(df, ap.flag_anomalies(df), None, include_total=False)
    assert "precision" not in no_labels.columns and len(no_labels) == 2


def test_flags_from_records_or_threshold_and_inferred_threshold():
    recs = [
        record("a", 0, 1.0, anomalyLikelihood=0.2),
        record("a", 1, 1.0, anomalyLikelihood=0.99995, isAnomaly=True),
        record("a", 2, 1.0, anomalyLikelihood=0.9999, isAnomaly=True),
        record("a", 3, 9.0, anomalyLikelihood=0.3, isAnomaly=True, spatialAnomaly=True),
        record("a", 4, 1.0, anomalyLikelihood=None),
    ]
    df = ap.records_to_frame(recs)
    assert ap.flag_anomalies(df).tolist() == [False, True, True, True, False]
    assert ap.flag_anomalies(df, 0.99991).tolist() == [False, True, False, False, False]
    assert ap.flag_anomalies(df, 0.25).tolist() == [False, True, True, True, False]
    # The spatial flag (likelihood 0.3) must not drag the inferred threshold down.
    assert ap.infer_threshold(df) == pytest.approx(0.9999)
    assert ap.infer_threshold(ap.records_to_frame([record("a", 0, 1.0)])) is None


def test_log_likelihood_matches_nupic_scale():
    assert ap.log_likelihood(0.9999) == pytest.approx(0.4, abs=1e-6)
    assert ap.log_likelihood(0.99999) == pytest.approx(0.5, abs=1e-6)
    assert ap.log_likelihood(0.5) == pytest.approx(math.log(0.5) / math.log(1e-10), abs=1e-9)


# ---------------------------------------------------------------- loading


def test_load_jsonl_types_sorting_and_skips(tmp_path):
    path = write_jsonl(
        tmp_path / "e.jsonl",
        [
            record("b", 1, 2.5),
            record("a", 2, 1.5, isAnomaly=True),
            "",
            "null",
            "{not json",
            json.dumps({"deviceId": "a", "value": 1}),  # no timestamp
            "[1, 2]",
            record("a", 1, 1.0, prediction=None, error=None, spatialAnomaly=None),
        ],
    )
    df, stats = ap.load_jsonl(path)
    assert len(df) == 3
    assert (stats.records, stats.skipped_null, stats.skipped_invalid) == (3, 1, 3)
    assert stats.messages == 7  # the blank line is layout, not a message
    assert str(df["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert df["value"].dtype == np.float64 and df["isAnomaly"].dtype == bool
    assert df["spatialAnomaly"].dtype == bool and not df["spatialAnomaly"].any()
    assert list(zip(df["deviceId"], df["value"], strict=True)) == [("a", 1.0), ("a", 1.5), ("b", 2.5)]
    assert math.isnan(df.loc[0, "prediction"]) and df.loc[1, "prediction"] == 2.0
    assert df["isAnomaly"].tolist() == [False, True, False]
    assert df.loc[0, "timestamp"] == T0 + pd.Timedelta(hours=1)


def test_load_jsonl_keeps_epa_string_fields(tmp_path):
    recs, _ = fixture.epa_records(n=30)
    df, stats = ap.load_jsonl(write_jsonl(tmp_path / "epa.jsonl", recs))
    assert len(df) == 30 and stats.skipped_invalid == 0
    assert df.loc[0, "sampleMeasurement"] == recs[0]["sampleMeasurement"]
    assert df.loc[0, "stateCode"] == "10" and df.loc[0, "parameterName"] == "Ozone"
    assert df["offset"].dtype == "Int64" and df["offset"].tolist() == list(range(30))


def test_load_jsonl_device_time_filters_and_max_records(tmp_path):
    recs = [record(d, h, float(h)) for h in range(10) for d in ("a", "b")]
    path = write_jsonl(tmp_path / "e.jsonl", recs)
    df, stats = ap.load_jsonl(path, devices=["b"])
    assert set(df["deviceId"]) == {"b"} and len(df) == 10 and stats.filtered_out == 10
    df, _ = ap.load_jsonl(path, devices="a", start=T0 + pd.Timedelta(hours=3), end="2024-03-01T05:00:00Z")
    assert df["value"].tolist() == [3.0, 4.0, 5.0]
    df, stats = ap.load_jsonl(path, max_records=7)
    assert len(df) == 7 and stats.truncated
    with pytest.raises(ValueError):
        ap.load_jsonl(path, start="2024-03-02", end="2024-03-01")


def test_jsonl_source_tails_appended_lines_and_waits_for_partial_ones(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [record("a", 0, 1.0)])
    src = ap.JsonlSource(path)
    try:
        recs, stats = src.read_available()
        assert len(recs) == 1 and stats.caught_up
        line = json.dumps(record("a", 1, 2.0))
        with open(path, "a") as fh:
            fh.write(line[:20])
        recs, _ = src.poll(0.05)
        assert recs == []  # half a line is not a record yet
        with open(path, "a") as fh:
            fh.write(line[20:] + "\n" + json.dumps(record("b", 2, 3.0)) + "\n")
        recs, stats = src.poll(0.05)
        assert [r["value"] for r in recs] == [2.0, 3.0] and stats.skipped_invalid == 0
    finally:
        src.close()


def test_append_records_resorts_and_types():
    df = ap.records_to_frame([record("a", 0, 1.0), record("a", 5, 5.0)])
    grown = ap.append_records(df, [record("a", 3, 3.0), record("0", 9, 0.0)])
    assert grown["value"].tolist() == [0.0, 1.0, 3.0, 5.0]
    assert str(grown["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert ap.append_records(df, []) is df


def test_load_labels_parses_sorts_and_rejects_bad_windows(tmp_path):
    good = tmp_path / "labels.json"
    good.write_text(
        json.dumps(
            {
                "dev": [
                    {"kind": "dropout", "start": "2024-03-02T00:00:00Z", "end": "2024-03-02T03:00:00Z"},
                    {"kind": "spike", "start": "2024-03-01T01:00:00Z", "end": "2024-03-01T02:00:00Z"},
                ]
            }
        )
    )
    labels = ap.load_labels(good)
    assert [w.kind for w in labels["dev"]] == ["spike", "dropout"]
    assert labels["dev"][0].start == T0 + pd.Timedelta(hours=1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dev": [{"start": "2024-03-02T00:00:00Z", "end": "2024-03-01T00:00:00Z"}]}))
    with pytest.raises(ValueError, match="ends before it starts"):
        ap.load_labels(bad)
    bad.write_text(json.dumps({"dev": [{"start": "2024-03-02T00:00:00Z"}]}))
    with pytest.raises(ValueError, match="bad window 0"):
        ap.load_labels(bad)


# ---------------------------------------------------------------- plotting


def test_plot_device_writes_readable_png(tmp_path):
    records, labels = fixture.fixture()
    df = ap.records_to_frame(records)
    dev = fixture.EPA_DEVICE
    wins = ap.load_labels(_dump(tmp_path / "l.json", labels))[dev]
    out = tmp_path / "plots" / ap.png_name(dev)
    fig = ap.plot_device(
        df, dev, flags=ap.flag_anomalies(df), windows=wins, threshold=0.9999, output_path=out
    )
    assert out.stat().st_size > 20_000
    with Image.open(out) as img:
        assert img.size == (1200, 1000)
        pixels = np.asarray(img.convert("RGB"))
    # Red flag markers and orange window shading are really drawn.
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    orange = (pixels[..., 0] > 240) & (abs(pixels[..., 1].astype(int) - 225) < 20) & (pixels[..., 2] < 215)
    assert red.sum() > 100 and orange.sum() > 1000
    assert dev in fig._suptitle.get_text() and "Ozone (Parts per million)" in fig._suptitle.get_text()
    assert len(fig.axes) == 5
    ax_lik = fig.axes[3]
    dotted = [ln for ln in ax_lik.get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_ydata()[0] for ln in dotted] == [pytest.approx(0.9999)]


def test_plot_device_generic_device_without_predictions(tmp_path):
    recs = [record("pump-1", h, float(h % 5), prediction=None, error=None) for h in range(48)]
    df = ap.records_to_frame(recs)
    out = tmp_path / "p.png"
    fig = ap.plot_device(df, output_path=out)
    assert out.stat().st_size > 20_000
    assert fig._suptitle.get_text() == "pump-1"
    with pytest.raises(ValueError):
        ap.plot_device(ap.records_to_frame(recs + [record("other", 0, 1.0)]))


def test_png_name_is_path_safe():
    assert ap.png_name("10-001-0002-44201-1") == "10-001-0002-44201-1.png"
    assert ap.png_name("../a b/c") == ".._a_b_c.png"


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------- live view


class FakeSource:
    """Hands out prepared batches and advances a fake clock by the requested poll time."""

    def __init__(self, batches, clock):
        self.batches = list(batches)
        self.clock = clock
        self.polls = []

    def poll(self, timeout_s):
        self.polls.append(timeout_s)
        self.clock.now += timeout_s
        recs = self.batches.pop(0) if self.batches else []
        return recs, ap.LoadStats(messages=len(recs), records=len(recs))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_live_view_follows_latest_device_and_stops_on_time():
    clock = FakeClock()
    df = ap.records_to_frame([record("a", h, float(h)) for h in range(5)])
    src = FakeSource([[record("b", 10, 1.0), record("b", 11, 2.0)], [], [record("a", 12, 3.0)]], clock)
    rendered = []
    wins = {"a": [window(0, 1), window(11, 12)], "b": [window(10, 10)]}
    res = ap.live_view(
        src,
        df,
        seconds=10,
        refresh_s=3,
        points=4,
        clock=clock,
        windows=wins,
        render=lambda fig, status: rendered.append((fig, status)),
    )
    assert src.polls == [3, 3, 3, 1]  # the last poll only gets the time that is left
    assert res.new_records == 3 and len(res.frame) == 8 and res.refreshes == 4
    titles = [fig._suptitle.get_text().splitlines()[0] for fig, _ in rendered]
    assert titles == ["b", "b", "a", "a"]
    # At most `points` rows of the followed device are drawn.
    assert len(rendered[-1][0].axes[0].get_lines()[0].get_xdata()) == 4
    assert rendered[-1][1].startswith("live: +3 records, 8 total")
    # Only windows overlapping the drawn rows are shaded (a's hours 2..12 drawn: 11-12 only).
    assert len(rendered[0][0].axes[0].patches) == 1
    assert len(rendered[-1][0].axes[0].patches) == 1


def test_live_view_with_nothing_to_draw_and_zero_seconds():
    clock = FakeClock()
    empty = ap.records_to_frame([])
    rendered = []
    res = ap.live_view(
        FakeSource([], clock),
        empty,
        seconds=2,
        refresh_s=5,
        clock=clock,
        render=lambda fig, status: rendered.append((fig, status)),
    )
    assert rendered == [(None, "live: +0 records, 0 total (nothing to draw yet)")]
    assert res.refreshes == 1
    res = ap.live_view(FakeSource([], clock), empty, seconds=0, clock=clock, render=rendered.append)
    assert res.refreshes == 0


def test_find_root_locates_repository(tmp_path):
    assert (ap.find_root(HERE) / "notebooks" / "anomaly_plots.py").is_file()
    assert ap.find_root(tmp_path) == tmp_path.resolve()


# ---------------------------------------------------------------- the notebook file itself


def test_notebook_has_papermill_parameters_and_no_stored_outputs():
    nb = json.loads((HERE.parent / "anomalies.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    namespace: dict = {}
    exec("".join(params[0]["source"]), namespace)  # plain literals only, as papermill needs
    expected = {
        "source": "kafka",
        "bootstrap_servers": "localhost:9092",
        "topic": "telemetry-enriched",
        "group_id": None,
        "devices": None,
        "max_records": None,
        "start": None,
        "end": None,
        "likelihood_threshold": None,
        "labels": None,
        "output_dir": "out/plots",
        "live_seconds": 0,
        "expected_records": None,
    }
    for name, value in expected.items():
        assert namespace[name] == value, name
    assert namespace["poll_timeout_s"] > 0
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
