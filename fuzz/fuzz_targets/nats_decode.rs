//! NATS messages of any headers and payload: decoded or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Option<Vec<(String, String)>>, Vec<u8>)| {
    let (headers, payload) = input;
    busbar_nats::fuzzing::decode(headers.as_deref(), &payload);
});
