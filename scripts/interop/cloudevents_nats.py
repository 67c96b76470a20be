#!/usr/bin/env python3
"""Interop with busbar over NATS, through clients no one at busbar wrote: nats-py and the
CloudEvents Python SDK (its HTTP binding: the NATS binding's binary mode has the same `ce-`
headers and percent-encoding).

read URL SUBJECT COUNT   prints "ready", then one JSON line per message on SUBJECT: the event
                         as the SDK parsed it from the NATS headers and body, and the raw headers
write URL SUBJECT        publishes one binary-mode CloudEvent made by the SDK to SUBJECT
                         (JetStream), prints it as JSON
"""
import asyncio
import base64
import json
import sys

import nats
from cloudevents.core.bindings.http import HTTPMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from common import attributes, written_event




async def read(url, subject, count):
    nc = await nats.connect(url)
    done = asyncio.get_running_loop().create_future()
    seen = []

    async def on_message(msg):
        headers = dict(msg.headers or {})
        event = from_binary(HTTPMessage(headers=headers, body=msg.data), JSONFormat(), CloudEvent)
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)):
            data = base64.b64encode(data).decode()
        print(json.dumps({"attributes": attributes(event), "data": data, "headers": headers}), flush=True)
        seen.append(1)
        if len(seen) >= count and not done.done():
            done.set_result(None)

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.wait_for(done, 60)
    await nc.close()


async def write(url, subject):
    nc = await nats.connect(url)
    js = nc.jetstream()
    event = written_event()
    message = to_binary(event, JSONFormat())
    await js.publish(subject, message.body, headers=dict(message.headers))
    print(json.dumps({"attributes": attributes(event), "body": message.body.decode(), "headers": dict(message.headers)}), flush=True)
    await nc.close()


def main(argv):
    if len(argv) == 4 and argv[0] == "read":
        asyncio.run(read(argv[1], argv[2], int(argv[3])))
    elif len(argv) == 3 and argv[0] == "write":
        asyncio.run(write(argv[1], argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
