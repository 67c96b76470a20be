//! SQS messages of any body, String attributes and SQS fields: decoded or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

type Input = (
    String,
    Vec<(String, String)>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fuzz_target!(|input: Input| {
    let (body, attributes, id, group, sent) = input;
    busbar_sqs::fuzzing::decode(
        &body,
        &attributes,
        id.as_deref(),
        group.as_deref(),
        sent.as_deref(),
    );
});
