#!/usr/bin/env python3
"""Interop with busbar over Kafka, through clients no one at busbar wrote: confluent-kafka
(librdkafka) and the CloudEvents Python SDK's Kafka binding (`ce_` headers, `content-type`,
the record key as `partitionkey`).

read BOOTSTRAP TOPIC COUNT   prints "ready", then one JSON line per record of TOPIC (from the
                             earliest): the event as the SDK parsed it, and the raw headers
write BOOTSTRAP TOPIC        produces one binary-mode CloudEvent the SDK made
"""
import base64
import json
import sys
import uuid

from confluent_kafka import Consumer, Producer
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from common import attributes, written_event


def read(bootstrap, topic, count):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"python-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    print("ready", flush=True)
    seen = 0
    for _ in range(600):
        record = consumer.poll(0.1)
        if record is None:
            continue
        if record.error():
            raise RuntimeError(record.error())
        raw = {name: value or b"" for name, value in (record.headers() or [])}
        event = from_binary(
            KafkaMessage(headers=raw, key=record.key(), value=record.value() or b""),
            JSONFormat(),
            CloudEvent,
        )
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)):
            data = base64.b64encode(data).decode()
        headers = {name: value.decode("utf-8", "replace") for name, value in raw.items()}
        print(json.dumps({"attributes": attributes(event), "data": data, "headers": headers}), flush=True)
        seen += 1
        if seen >= count:
            break
    consumer.close()


def write(bootstrap, topic):
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    message = to_binary(written_event(), JSONFormat())
    producer.produce(topic, value=message.value, key=message.key, headers=list(message.headers.items()))
    if producer.flush(30) != 0:
        raise RuntimeError("the record was not delivered")


def main(argv):
    if len(argv) == 4 and argv[0] == "read":
        read(argv[1], argv[2], int(argv[3]))
    elif len(argv) == 3 and argv[0] == "write":
        write(argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
