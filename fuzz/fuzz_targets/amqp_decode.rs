//! RabbitMQ deliveries of any header table, properties and body.
#![no_main]

use libfuzzer_sys::fuzz_target;

type Input = (
    Vec<(String, u8, Vec<u8>)>,
    Option<String>,
    Option<String>,
    Option<u64>,
    Vec<u8>,
);

fuzz_target!(|input: Input| {
    let (headers, content_type, id, timestamp, body) = input;
    busbar_amqp::fuzzing::decode(
        &headers,
        content_type.as_deref(),
        id.as_deref(),
        timestamp,
        &body,
    );
});
