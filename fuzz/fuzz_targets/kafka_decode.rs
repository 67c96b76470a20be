//! Kafka records of any key, headers, payload and timestamp.
#![no_main]

use libfuzzer_sys::fuzz_target;

type Input = (
    Option<Vec<u8>>,
    Vec<(String, Vec<u8>)>,
    Vec<u8>,
    Option<i64>,
);

fuzz_target!(|input: Input| {
    let (key, headers, payload, timestamp) = input;
    busbar_kafka::fuzzing::decode(key.as_deref(), &headers, &payload, timestamp);
});
