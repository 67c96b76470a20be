"""What the interop scripts share: the event they write, and how they print what they read."""
from datetime import datetime, timezone

from cloudevents.core.v1.event import CloudEvent


def attributes(event):
    """The event's attributes as JSON values (times in ISO 8601)."""
    return {
        name: value.isoformat() if hasattr(value, "isoformat") else value
        for name, value in event.get_attributes().items()
    }


def written_event():
    """The event the scripts' `write` mode sends (the Rust side checks every field of it)."""
    return CloudEvent(
        attributes={
            "type": "com.example.order.created",
            "source": "/python/sdk",
            "id": "py-0001",
            "time": datetime(2026, 11, 30, 12, 0, 0, 500000, tzinfo=timezone.utc),
            "datacontenttype": "application/json",
            "partitionkey": "ключ-1",
            "correlationid": "saga 7",
        },
        data={"order": 42, "note": "grüße"},
    )
