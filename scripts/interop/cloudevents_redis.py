#!/usr/bin/env python3
"""Interop with busbar over Redis Streams, through clients no one at busbar wrote: redis-py and
the CloudEvents Python SDK. Redis has no CloudEvents binding; busbar's documented layout (the
busbar-redis README) is one stream entry per event: a field per attribute under its
CloudEvents name (`specversion`, `id`, `source`, `type`, `time`, `datacontenttype`,
`partitionkey`, extensions), `data` for the data, `h:<name>` per header. The mapping below is
written from that text; the SDK makes and checks the events.

read URL STREAM_PREFIX PARTITIONS COUNT   prints "ready", then one JSON line per entry of the
                                          partition streams STREAM_PREFIX0..N-1: the event as the
                                          SDK built it, and the headers
write URL STREAM                          adds one CloudEvent the SDK made to STREAM
"""
import base64
import json
import sys

import redis
from dateutil.parser import isoparse
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from common import attributes, written_event

HEADER = "h:"


def from_entry(fields):
    attrs, headers, data = {}, {}, b""
    for name, value in fields.items():
        name = name.decode()
        if name == "data":
            data = value
        elif name.startswith(HEADER):
            headers[name[len(HEADER):]] = value.decode()
        else:
            attrs[name] = isoparse(value.decode()) if name == "time" else value.decode()
    return CloudEvent(attributes=attrs, data=JSONFormat().read_data(data, attrs.get("datacontenttype"))), headers


def read(url, prefix, partitions, count):
    r = redis.Redis.from_url(url)
    last = {f"{prefix}{p}": "0" for p in range(partitions)}
    print("ready", flush=True)
    seen = 0
    for _ in range(60):
        for stream, entries in r.xread(last, block=1000) or []:
            for entry_id, fields in entries:
                last[stream.decode()] = entry_id
                event, headers = from_entry(fields)
                data = event.get_data()
                if isinstance(data, (bytes, bytearray)):
                    data = base64.b64encode(data).decode()
                print(json.dumps({"attributes": attributes(event), "data": data, "headers": headers}), flush=True)
                seen += 1
        if seen >= count:
            return


def write(url, stream):
    event = written_event()
    fields = {}
    for name, value in event.get_attributes().items():
        if value is None:
            continue
        if hasattr(value, "isoformat"):
            value = value.isoformat().replace("+00:00", "Z")
        fields[name] = str(value)
    fields["data"] = JSONFormat().write_data(event.get_data(), event.get_attributes().get("datacontenttype"))
    redis.Redis.from_url(url).xadd(stream, fields)


def main(argv):
    if len(argv) == 5 and argv[0] == "read":
        read(argv[1], argv[2], int(argv[3]), int(argv[4]))
    elif len(argv) == 3 and argv[0] == "write":
        write(argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
