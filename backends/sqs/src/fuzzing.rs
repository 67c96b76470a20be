//! Entry points of the wire decoder for the fuzz targets in `fuzz/` (feature `fuzzing`;
//! not an API, no stability).

use std::collections::HashMap;

use aws_sdk_sqs::types::MessageAttributeValue;

/// Decodes a message with this body, these String attributes and SQS's own fields: it must
/// return a message or a typed error, never panic.
pub fn decode(
    body: &str,
    attributes: &[(String, String)],
    message_id: Option<&str>,
    group_id: Option<&str>,
    sent_ms: Option<&str>,
) {
    let attributes: HashMap<String, MessageAttributeValue> = attributes
        .iter()
        .filter_map(|(n, v)| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .ok()
                .map(|value| (n.clone(), value))
        })
        .collect();
    let foreign = crate::codec::Foreign {
        message_id,
        group_id,
        sent_ms,
    };
    let _ = crate::codec::decode(body, Some(&attributes), &foreign);
}
