//! Redis stream entries of any fields and values: decoded, foreign or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|fields: Vec<(Vec<u8>, Vec<u8>)>| {
    busbar_redis::fuzzing::decode_entry(&fields);
});
