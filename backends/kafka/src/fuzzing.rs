//! Entry points of the wire decoder for the fuzz targets in `fuzz/` (feature `fuzzing`;
//! not an API, no stability).

use bytes::Bytes;

/// Decodes a record with this key, headers, payload and timestamp: it must never panic.
pub fn decode(
    key: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
    payload: &[u8],
    timestamp_ms: Option<i64>,
) {
    let raw: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let origin = crate::codec::Origin {
        topic: "fuzz",
        partition: 0,
        offset: 0,
    };
    let _ = crate::codec::decode_parts(
        origin,
        key,
        Bytes::copy_from_slice(payload),
        timestamp_ms,
        &raw,
    );
}
