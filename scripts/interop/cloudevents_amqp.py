#!/usr/bin/env python3
"""Interop with busbar over RabbitMQ, through clients no one at busbar wrote: pika and the
CloudEvents Python SDK's RabbitMQ binding (`ce-` headers, `content_type` property).

read URL EXCHANGE PARTITIONS COUNT   binds a queue of its own to the topic's exchange (every
                                     partition's routing key), prints "ready", then one JSON line
                                     per message: the event as the SDK parsed it, the raw headers
write URL EXCHANGE ROUTING_KEY       publishes one binary-mode CloudEvent the SDK made
"""
import base64
import json
import sys

import pika
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from common import attributes, written_event


def plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value




def read(url, exchange, partitions, count):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    for p in range(partitions):
        channel.queue_bind(queue=queue, exchange=exchange, routing_key=str(p))
    print("ready", flush=True)
    seen = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=60):
        if method is None:
            break
        headers = {k: plain(v) for k, v in (properties.headers or {}).items()}
        event = from_binary(
            RabbitMQMessage(headers=headers, content_type=properties.content_type, body=body),
            JSONFormat(),
            CloudEvent,
        )
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)):
            data = base64.b64encode(data).decode()
        print(json.dumps({"attributes": attributes(event), "data": data, "headers": headers}), flush=True)
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if seen >= count:
            break
    connection.close()


def write(url, exchange, routing_key):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    event = written_event()
    message = to_binary(event, JSONFormat())
    channel.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=message.body,
        properties=pika.BasicProperties(
            headers=message.headers, content_type=message.content_type, delivery_mode=2
        ),
    )
    connection.close()


def main(argv):
    if len(argv) == 5 and argv[0] == "read":
        read(argv[1], argv[2], int(argv[3]), int(argv[4]))
    elif len(argv) == 4 and argv[0] == "write":
        write(argv[1], argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
