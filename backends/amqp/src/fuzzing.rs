//! Entry points of the wire decoder for the fuzz targets in `fuzz/` (feature `fuzzing`;
//! not an API, no stability).

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// Decodes a delivery with these header entries (`kind` picks the AMQP type of each value:
/// long string, short string, integer, timestamp, boolean, bytes), optional properties and
/// body: it must never panic.
pub fn decode(
    headers: &[(String, u8, Vec<u8>)],
    content_type: Option<&str>,
    message_id: Option<&str>,
    timestamp: Option<u64>,
    body: &[u8],
) {
    let mut table = FieldTable::default();
    for (name, kind, value) in headers {
        let number = || {
            let mut b = [0u8; 8];
            for (i, x) in value.iter().take(8).enumerate() {
                b[i] = *x;
            }
            i64::from_le_bytes(b)
        };
        let v = match kind % 6 {
            0 => AMQPValue::LongString(LongString::from(value.clone())),
            1 => match ShortString::try_new(String::from_utf8_lossy(value).into_owned()) {
                Ok(short) => AMQPValue::ShortString(short),
                Err(_) => continue, // RabbitMQ cannot send it
            },
            2 => AMQPValue::LongLongInt(number()),
            3 => AMQPValue::Timestamp(number().unsigned_abs()),
            4 => AMQPValue::Boolean(value.first().is_some_and(|b| b & 1 == 1)),
            _ => AMQPValue::ByteArray(value.clone().into()),
        };
        // A field name over 255 bytes cannot be on the wire.
        if let Ok(name) = ShortString::try_new(name.clone()) {
            table.insert(name, v);
        }
    }
    let mut props = BasicProperties::default().with_headers(table);
    if let Some(Ok(c)) = content_type.map(|c| ShortString::try_new(c.to_owned())) {
        props = props.with_content_type(c);
    }
    if let Some(Ok(id)) = message_id.map(|id| ShortString::try_new(id.to_owned())) {
        props = props.with_message_id(id);
    }
    if let Some(t) = timestamp {
        props = props.with_timestamp(t);
    }
    let _ = crate::codec::decode(&props, body.to_vec());
}
