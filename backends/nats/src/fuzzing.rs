//! Entry points of the wire decoder for the fuzz targets in `fuzz/` (feature `fuzzing`;
//! not an API, no stability).

use std::str::FromStr as _;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

/// Decodes a message with these headers (pairs NATS would not carry are left out, as the
/// server would refuse them) and payload: it must never panic.
pub fn decode(headers: Option<&[(String, String)]>, payload: &[u8]) {
    let map = headers.map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let (Ok(n), Ok(v)) = (HeaderName::from_str(name), HeaderValue::from_str(value)) {
                map.append(n, v);
            }
        }
        map
    });
    let _ = crate::codec::decode_message(map.as_ref(), Bytes::copy_from_slice(payload), || {
        "place".to_owned()
    });
}
