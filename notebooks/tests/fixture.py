"""Realistic enriched records for two devices, with anomalies and a matching labels file.

Stands in for generator + detector output until those exist: one EPA ozone monitor (all 24 EPA
string fields, hourly) and one generic device (timestamp/deviceId/value, every 5 minutes). Both
get a daily/slow cycle, injected anomalies, detector-like scores and one false alarm each.

    python fixture.py OUT.jsonl LABELS.json     # writes both files, prints the record count
"""

from __future__ import annotations

import json
import math
import random
import sys
from datetime import datetime, timedelta, timezone

EPA_DEVICE = "10-001-0002-44201-1"
GENERIC_DEVICE = "pump-7"
THRESHOLD = 0.9999


def _rfc3339(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_likelihood(lik: float) -> float:
    return math.log(1.0000000001 - lik) / math.log(1e-10)


def _detector_fields(values, anomalous, spatial, rng):
    """Detector-like prediction/error/scores for a value series.

    Scores rise at anomalous rows and decay afterwards, like a likelihood fed by a moving average
    of raw scores; a couple of false alarms keep precision below 1.
    """
    out = []
    lik = 0.5
    pred_next = None
    false_alarm = {int(len(values) * 0.18)}
    for i, v in enumerate(values):
        prediction = pred_next
        error = None if prediction is None else abs(v - prediction)
        if anomalous[i]:
            raw = rng.uniform(0.8, 1.0)
            lik = min(0.999999, max(lik, 0.9) + (1 - lik) * 0.95)
        elif i in false_alarm:
            raw = 0.9
            lik = 0.99995
        else:
            raw = rng.choice([0.0, 0.0, 0.0, 0.025, 0.05, 0.1, rng.uniform(0.1, 0.45)])
            lik = 0.5 + (lik - 0.5) * 0.6 + rng.uniform(-0.12, 0.12)
            lik = min(max(lik, 0.02), 0.98) if lik < 0.99 else lik
        # Next-step prediction: a smoothed persistence forecast, as a classifier would lag.
        pred_next = v if prediction is None else 0.6 * v + 0.4 * prediction
        out.append(
            {
                "prediction": None if prediction is None else round(prediction, 6),
                "error": None if error is None else round(error, 6),
                "anomaly": round(raw, 4),
                "predictionNext": round(pred_next, 6),
                "anomalyLikelihood": round(lik, 8),
                "logLikelihood": round(_log_likelihood(lik), 6),
                "spatialAnomaly": bool(spatial[i]),
                "isAnomaly": bool(lik >= THRESHOLD or spatial[i]),
            }
        )
    return out


def epa_records(n: int = 480, seed: int = 7):
    """Hourly ozone readings with a spike and a level shift."""
    rng = random.Random(seed)
    t0 = datetime(2014, 1, 1, tzinfo=timezone.utc)
    spike = range(200, 203)
    shift = range(340, 362)
    values, anomalous, spatial = [], [], []
    for i in range(n):
        hour = (t0 + timedelta(hours=i)).hour
        v = 0.028 + 0.012 * math.sin(2 * math.pi * (hour - 9) / 24) + rng.gauss(0, 0.0015)
        if i in spike:
            v = 0.085 - 0.01 * (i - spike.start)
        if i in shift:
            v += 0.02
        values.append(round(max(v, 0.001), 3))
        anomalous.append(i in spike or i == shift.start or i == shift.start + 1)
        spatial.append(i == spike.start)
    det = _detector_fields(values, anomalous, spatial, rng)
    records = []
    for i, (v, d) in enumerate(zip(values, det, strict=True)):
        local = t0 + timedelta(hours=i) - timedelta(hours=5)
        gmt = t0 + timedelta(hours=i)
        rec = {
            "stateCode": "10",
            "countyCode": "001",
            "siteNum": "0002",
            "parameterCode": "44201",
            "poc": "1",
            "latitude": "38.986672",
            "longitude": "-75.5568",
            "datum": "WGS84",
            "parameterName": "Ozone",
            "dateLocal": local.strftime("%Y-%m-%d"),
            "timeLocal": local.strftime("%H:%M"),
            "dateGMT": gmt.strftime("%Y-%m-%d"),
            "timeGMT": gmt.strftime("%H:%M"),
            "sampleMeasurement": f"{v:.3f}",
            "unitsOfMeasure": "Parts per million",
            "mdl": "0.005",
            "uncertainty": "",
            "qualifier": "",
            "methodType": "FEM",
            "methodCode": "087",
            "methodName": "INSTRUMENTAL - ULTRA VIOLET ABSORPTION",
            "stateName": "Delaware",
            "countyName": "Kent",
            "dateOfLastChange": "2014-02-12",
            "deviceId": EPA_DEVICE,
            "timestamp": _rfc3339(gmt),
            "value": v,
        }
        rec.update(d)
        rec.update(partition=0, offset=i)
        records.append(rec)
    labels = [
        {
            "kind": "spike",
            "start": _rfc3339(t0 + timedelta(hours=spike.start)),
            "end": _rfc3339(t0 + timedelta(hours=spike.stop - 1)),
        },
        {
            "kind": "level_shift",
            "start": _rfc3339(t0 + timedelta(hours=shift.start)),
            "end": _rfc3339(t0 + timedelta(hours=shift.stop - 1)),
        },
    ]
    return records, labels


def generic_records(n: int = 480, seed: int = 11):
    """A pump's pressure every 5 minutes with a spike and a drop-out to zero."""
    rng = random.Random(seed)
    t0 = datetime(2014, 1, 1, tzinfo=timezone.utc)
    spike = range(150, 152)
    dropout = range(300, 312)
    values, anomalous, spatial = [], [], []
    for i in range(n):
        v = 4.0 + 0.8 * math.sin(2 * math.pi * i / 96) + rng.gauss(0, 0.08)
        if i in spike:
            v += 3.5
        if i in dropout:
            v = 0.0
        values.append(round(v, 3))
        anomalous.append(i in spike or i in (dropout.start, dropout.start + 1))
        spatial.append(i in spike)
    det = _detector_fields(values, anomalous, spatial, rng)
    records = []
    for i, (v, d) in enumerate(zip(values, det, strict=True)):
        rec = {"timestamp": _rfc3339(t0 + timedelta(minutes=5 * i)), "deviceId": GENERIC_DEVICE, "value": v}
        rec.update(d)
        rec.update(partition=1, offset=i)
        records.append(rec)
    labels = [
        {
            "kind": "spike",
            "start": _rfc3339(t0 + timedelta(minutes=5 * spike.start)),
            "end": _rfc3339(t0 + timedelta(minutes=5 * (spike.stop - 1))),
        },
        {
            "kind": "dropout",
            "start": _rfc3339(t0 + timedelta(minutes=5 * dropout.start)),
            "end": _rfc3339(t0 + timedelta(minutes=5 * (dropout.stop - 1))),
        },
    ]
    return records, labels


def fixture():
    """(records interleaved by time as a detector would emit them, labels by device)."""
    a, la = epa_records()
    b, lb = generic_records()
    records = sorted(a + b, key=lambda r: (r["timestamp"], r["deviceId"]))
    return records, {EPA_DEVICE: la, GENERIC_DEVICE: lb}


def write(jsonl_path: str, labels_path: str) -> int:
    records, labels = fixture()
    with open(jsonl_path, "w", encoding="utf-8") as fh:
        for i, rec in enumerate(records):
            fh.write(json.dumps(rec) + "\n")
            if i == 100:
                # A blank line and a null record: readers must skip both without counting them.
                fh.write("\nnull\n")
    with open(labels_path, "w", encoding="utf-8") as fh:
        json.dump(labels, fh, indent=2)
    return len(records)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: fixture.py OUT.jsonl LABELS.json")
    print(write(sys.argv[1], sys.argv[2]))
