#!/usr/bin/env python3
"""Interop with busbar over SNS + SQS, through clients no one at busbar wrote: boto3 and the
CloudEvents Python SDK. No official SQS/SNS binding exists; busbar follows the SNS binding
draft (0.4-wip): every attribute a `ce_`-prefixed String message attribute (`ce_datacontenttype`
included), the data as the body (`ce_datacontentencoding` = `base64` when it is base64), other
attributes are headers. The mapping below is that draft's, written from its text; the SDK makes
and checks the events (required attributes, types, time, data by content type).

read ENDPOINT QUEUE_URL COUNT    prints "ready", then one JSON line per message received from
                                 QUEUE_URL: the event as the SDK built it, and the other attributes
write ENDPOINT TOPIC_ARN         publishes one CloudEvent the SDK made to the SNS topic
"""
import base64
import json
import sys

import boto3
from dateutil.parser import isoparse
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from common import attributes, written_event

PREFIX = "ce_"


def client(service, endpoint):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def from_sqs(message):
    """The CloudEvent of an SQS message in the SNS draft's binary mode, and its other attributes."""
    attrs, headers, encoding = {}, {}, None
    for name, value in (message.get("MessageAttributes") or {}).items():
        text = value.get("StringValue")
        if name.lower() == PREFIX + "datacontentencoding":
            encoding = text
        elif name.lower().startswith(PREFIX):
            attr = name.lower()[len(PREFIX):]
            attrs[attr] = isoparse(text) if attr == "time" else text
        else:
            headers[name] = text
    body = message["Body"].encode()
    if encoding == "base64":
        body = base64.b64decode(body)
    data = JSONFormat().read_data(body, attrs.get("datacontenttype"))
    return CloudEvent(attributes=attrs, data=data), headers


def read(endpoint, queue_url, count):
    sqs = client("sqs", endpoint)
    print("ready", flush=True)
    seen = 0
    for _ in range(60):
        out = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
        )
        for message in out.get("Messages", []):
            event, headers = from_sqs(message)
            data = event.get_data()
            if isinstance(data, (bytes, bytearray)):
                data = base64.b64encode(data).decode()
            print(json.dumps({"attributes": attributes(event), "data": data, "headers": headers}), flush=True)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            seen += 1
        if seen >= count:
            return


def write(endpoint, topic_arn):
    sns = client("sns", endpoint)
    event = written_event()
    attrs = event.get_attributes()
    message_attributes = {}
    for name, value in attrs.items():
        if value is None:
            continue
        if hasattr(value, "isoformat"):
            value = value.isoformat().replace("+00:00", "Z")
        message_attributes[PREFIX + name] = {"DataType": "String", "StringValue": str(value)}
    body = JSONFormat().write_data(event.get_data(), attrs.get("datacontenttype"))
    request = {"TopicArn": topic_arn, "Message": body.decode(), "MessageAttributes": message_attributes}
    if topic_arn.endswith(".fifo"):
        request["MessageGroupId"] = "python-sdk"
        request["MessageDeduplicationId"] = attrs["id"]
    sns.publish(**request)


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
