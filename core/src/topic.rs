//! Topic and group name validation, in one place for every backend.

use crate::error::{Error, ErrorKind, Result};

/// The longest topic name busbar accepts. It leaves room for the `.dlq` suffix and for the
/// prefixes backends add, below Kafka's 249-character limit.
pub const TOPIC_MAX_LEN: usize = 200;

/// The longest consumer group name busbar accepts.
pub const GROUP_MAX_LEN: usize = 120;

/// Checks that `topic` is a name every backend can carry: 1 to [`TOPIC_MAX_LEN`] ASCII
/// letters, digits, `.`, `_` or `-`, not starting or ending with `.` and without `..`.
///
/// Returns [`ErrorKind::InvalidTopic`] otherwise.
/// A dead-letter topic (`<topic>.dlq`) of a valid topic is valid too: it may be
/// [`TOPIC_MAX_LEN`] + 4 long.
pub fn validate_topic(topic: &str) -> Result<()> {
    let max = if crate::policy::is_dead_letter_topic(topic) {
        TOPIC_MAX_LEN + ".dlq".len()
    } else {
        TOPIC_MAX_LEN
    };
    validate_name(topic, "topic", max, ErrorKind::InvalidTopic)
}

/// Checks a consumer group name with the same character rules as topics, up to
/// [`GROUP_MAX_LEN`] characters. Returns [`ErrorKind::InvalidInput`] otherwise.
pub fn validate_group(group: &str) -> Result<()> {
    validate_name(group, "group", GROUP_MAX_LEN, ErrorKind::InvalidInput)
}

fn validate_name(name: &str, what: &str, max: usize, kind: ErrorKind) -> Result<()> {
    let invalid = |why: String| Err(Error::new(kind, format!("{what} name {name:?} {why}")));
    if name.is_empty() {
        return Err(Error::new(kind, format!("{what} name is empty")));
    }
    if name.len() > max {
        return invalid(format!("is {} bytes long; the limit is {max}", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return invalid(format!(
            "contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return invalid("must not start or end with '.' or contain '..'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for t in ["orders", "orders.created", "a-b_c.9", "x"] {
            assert!(validate_topic(t).is_ok(), "{t}");
        }
        assert!(validate_topic(&"a".repeat(TOPIC_MAX_LEN)).is_ok());
    }

    #[test]
    fn the_dead_letter_topic_of_every_valid_topic_is_valid() {
        for len in [1, 150, TOPIC_MAX_LEN - 4, TOPIC_MAX_LEN - 1, TOPIC_MAX_LEN] {
            let t = "a".repeat(len);
            let dlq = crate::policy::default_dead_letter_topic(&t);
            assert!(validate_topic(&dlq).is_ok(), "{len}: {dlq}");
        }
        let too_long = format!("{}.dlq", "a".repeat(TOPIC_MAX_LEN + 1));
        assert!(validate_topic(&too_long).is_err());
    }

    #[test]
    fn rejects_bad_names_with_invalid_topic() {
        let long = "a".repeat(TOPIC_MAX_LEN + 1);
        for t in [
            "",
            " ",
            "a b",
            "a*",
            "a>",
            "ü",
            ".a",
            "a.",
            "a..b",
            "a/b",
            long.as_str(),
        ] {
            let e = validate_topic(t).expect_err(t);
            assert_eq!(e.kind(), ErrorKind::InvalidTopic, "{t}");
        }
    }

    #[test]
    fn group_rules() {
        assert!(validate_group("billing-service").is_ok());
        assert_eq!(
            validate_group("").map_err(|e| e.kind()),
            Err(ErrorKind::InvalidInput)
        );
    }
}
