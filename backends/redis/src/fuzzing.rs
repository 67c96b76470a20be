//! Entry points of the wire decoder for the fuzz targets in `fuzz/` (feature `fuzzing`;
//! not an API, no stability).

use redis::Value;

/// Decodes a stream entry of the given field/value pairs, as a read would: it must return
/// (a message, a foreign message or a typed error), never panic.
pub fn decode_entry(fields: &[(Vec<u8>, Vec<u8>)]) {
    let values = fields
        .iter()
        .flat_map(|(k, v)| [Value::BulkString(k.clone()), Value::BulkString(v.clone())])
        .collect();
    let _ = crate::codec::decode_entry(values);
}
