"""Probe of the test broker (noida-db): a transaction that straddles a broker restart.

    source scripts/venv.sh && "$VENV_PY" scripts/noida-txn-restart-probe.py /tmp/probe

One transactional producer commits a transaction to topics `out` and `dead`, then opens a
second one, writes to both, and the broker is restarted (SIGTERM) before it commits; after
the restart the producer writes once more to `dead`, commits, and goes on with transactions
to `out` only. A second producer then commits to both topics. With a Kafka broker the second
transaction is either committed whole or fails; every committed record is readable
read_committed. The last line is

    probe: straddle_commit_ok=B straddle_pre_visible=B dead_committed_visible=B offsets_committed=N

and the exit status is 1 when a commit reported as successful is not visible or committed
records stay hidden behind the straddling transaction (the chaos harness's rare "dead letters
missing" failure), 0 when the broker behaves.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

BIN = os.environ["NOIDA_DB_BIN"]
DIR = sys.argv[1]
shutil.rmtree(DIR, ignore_errors=True)
os.makedirs(DIR)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    PORT = s.getsockname()[1]
BOOT = f"127.0.0.1:{PORT}"
LOG = open(f"{DIR}/broker.log", "a")


def start():
    args = [BIN, "start", "--only", "kafka", "--kafka-port", str(PORT), "--data-dir", f"{DIR}/data"]
    broker = subprocess.Popen(args, stdout=LOG, stderr=LOG)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", PORT), 0.2).close()
            return broker
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the broker did not start")


def stop(broker):
    broker.terminate()
    broker.wait()


def read(topic, isolation):
    """The values of partition 0 of `topic` as a reader with `isolation` sees them."""
    c = Consumer({"bootstrap.servers": BOOT, "group.id": "probe-reader", "enable.auto.commit": False,
                  "isolation.level": isolation, "enable.partition.eof": True,
                  "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, 0, 0)])
    values, deadline = [], time.time() + 10
    while time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == -191:  # end of partition
                break
            continue
        values.append(m.value().decode())
    c.close()
    return values


def transaction(producer, records, offsets=None, consumer=None):
    producer.begin_transaction()
    for topic, value in records:
        producer.produce(topic, value=value.encode(), partition=0)
    if offsets is not None:
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 10)
    producer.commit_transaction(30)


broker = start()
admin = AdminClient({"bootstrap.servers": BOOT})
for f in admin.create_topics([NewTopic(t, 1, 1) for t in ("in", "out", "dead")]).values():
    f.result()
loader = Producer({"bootstrap.servers": BOOT})
for i in range(10):
    loader.produce("in", value=f"in{i}".encode(), partition=0)
loader.flush()
consumer = Consumer({"bootstrap.servers": BOOT, "group.id": "g", "enable.auto.commit": False,
                     "isolation.level": "read_committed"})
consumer.subscribe(["in"])
started = time.time()
while not consumer.assignment() and time.time() - started < 20:
    consumer.poll(0.2)

t = Producer({"bootstrap.servers": BOOT, "transactional.id": "T", "linger.ms": 5})
t.init_transactions(30)
transaction(t, [("out", "committed-before"), ("dead", "dead-committed-before")],
            [TopicPartition("in", 0, 2)], consumer)
# The straddling transaction.
t.begin_transaction()
t.produce("out", value=b"straddle-pre", partition=0)
t.produce("dead", value=b"dead-straddle-pre", partition=0)
t.flush(10)
stop(broker)
time.sleep(1)
broker = start()
t.produce("dead", value=b"straddle-post", partition=0)
try:
    t.commit_transaction(30)
    straddle_commit_ok = True
except KafkaException:
    straddle_commit_ok = False
    t.abort_transaction(30)
for i in range(3):
    transaction(t, [("out", f"later-{i}")])
other = Producer({"bootstrap.servers": BOOT, "transactional.id": "T2"})
other.init_transactions(30)
transaction(other, [("out", "other-after"), ("dead", "dead-other-after")])

out, dead = read("out", "read_committed"), read("dead", "read_committed")
for topic, values in (("out", out), ("dead", dead)):
    print(f"{topic} read_committed: {values}")
    print(f"{topic} read_uncommitted: {read(topic, 'read_uncommitted')}")
c = Consumer({"bootstrap.servers": BOOT, "group.id": "g"})
offsets = c.committed([TopicPartition("in", 0)], timeout=10)[0].offset
c.close()
consumer.close()
stop(broker)

straddle_pre_visible = "straddle-pre" in out and "dead-straddle-pre" in dead
dead_committed_visible = "dead-other-after" in dead
print(f"probe: straddle_commit_ok={straddle_commit_ok} straddle_pre_visible={straddle_pre_visible} "
      f"dead_committed_visible={dead_committed_visible} offsets_committed={offsets}")
faulty = (straddle_commit_ok and not straddle_pre_visible) or not dead_committed_visible
sys.exit(1 if faulty else 0)
