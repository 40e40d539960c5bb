"""Put a JSON-lines file of enriched records on a Kafka topic the way the detector would.

Creates the topic, then writes every non-blank line in ONE committed transaction with key =
deviceId (a JSON `null` line becomes a tombstone; one more tombstone is always added). A second
transaction with decoy records is aborted, so a reader that is not read_committed would see
records that must not exist.

    python produce_fixture.py --bootstrap 127.0.0.1:9092 --topic telemetry-enriched FILE.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

DECOY_DEVICE = "aborted-transaction-device"


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic]
    try:
        fut.result(30)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


def produce(bootstrap: str, topic: str, path: str) -> int:
    """Produce the file; returns the number of messages committed."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"notebook-fixture-{uuid.uuid4()}",
            "linger.ms": 5,
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    sent = 0
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            key = obj.get("deviceId") if isinstance(obj, dict) else None
            value = None if line == b"null" else line
            producer.produce(topic, key=None if key is None else str(key).encode(), value=value)
            sent += 1
            producer.poll(0)
    # Always one tombstone, so the reader's null handling is exercised whatever the file holds.
    producer.produce(topic, key=b"tombstone", value=None)
    sent += 1
    producer.commit_transaction(60)

    producer.begin_transaction()
    for i in range(5):
        decoy = {"deviceId": DECOY_DEVICE, "timestamp": "2014-01-01T00:00:00Z", "value": i}
        producer.produce(topic, key=DECOY_DEVICE.encode(), value=json.dumps(decoy).encode())
    producer.flush(30)
    producer.abort_transaction(30)
    return sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", default="telemetry-enriched")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("file")
    args = ap.parse_args()
    create_topic(args.bootstrap, args.topic, args.partitions)
    sent = produce(args.bootstrap, args.topic, args.file)
    print(f"produced {sent} messages to {args.topic} (plus 5 in an aborted transaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
