//! The options in a broker URL's query string (`?partitions=4&lease_ttl_ms=2000`), read the
//! same way by every backend: typed numbers, flags and durations within a range, a choice
//! among names, and one error shape naming the option, the value and what was expected.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::{Error, ErrorKind, Result};

/// The `key=value` pairs of a URL's query string, percent-decoded, in order.
#[derive(Debug, Clone)]
pub struct UrlOptions {
    broker: &'static str,
    backend: &'static str,
    pairs: Vec<UrlOption>,
}

impl UrlOptions {
    /// The options of `query` (the part after `?`; `None` = none). `broker` names the broker
    /// in errors ("Redis"), `backend` is the backend's name for [`Error::backend`].
    pub fn parse(broker: &'static str, backend: &'static str, query: Option<&str>) -> Self {
        let pairs = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .map(|(key, value)| UrlOption {
                broker,
                backend,
                key: key.into_owned(),
                value: value.into_owned(),
            })
            .collect();
        Self {
            broker,
            backend,
            pairs,
        }
    }

    /// The `Config` error for an option the backend does not know, listing those it does.
    pub fn unknown(&self, option: &UrlOption, known: &[&str]) -> Error {
        config_error(
            self.backend,
            format!(
                "unknown {} URL option {:?} (known: {})",
                self.broker,
                option.key,
                known.join(", ")
            ),
        )
    }
}

impl IntoIterator for UrlOptions {
    type Item = UrlOption;
    type IntoIter = std::vec::IntoIter<UrlOption>;

    fn into_iter(self) -> Self::IntoIter {
        self.pairs.into_iter()
    }
}

/// One option of a broker URL, with readers that check its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlOption {
    broker: &'static str,
    backend: &'static str,
    key: String,
    value: String,
}

fn config_error(backend: &'static str, msg: String) -> Error {
    Error::new(ErrorKind::Config, msg).with_backend(backend)
}

impl UrlOption {
    /// The option's name.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The option's value, as written (percent-decoded).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The pair, for options handed on to the broker's client as they are.
    pub fn into_pair(self) -> (String, String) {
        (self.key, self.value)
    }

    /// A `Config` error about this option: `<Broker> URL option k="v" <why>`.
    pub fn invalid(&self, why: impl std::fmt::Display) -> Error {
        config_error(
            self.backend,
            format!(
                "{} URL option {}={:?} {why}",
                self.broker, self.key, self.value
            ),
        )
    }

    /// A whole number within `range`.
    pub fn number(&self, range: RangeInclusive<u64>) -> Result<u64> {
        self.value
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                if *range.end() == u64::MAX {
                    self.invalid(format_args!("must be a number >= {}", range.start()))
                } else {
                    self.invalid(format_args!(
                        "must be a number from {} to {}",
                        range.start(),
                        range.end()
                    ))
                }
            })
    }

    /// A number within `range` that fits `T` (the range must fit `T`, or the error says so).
    pub fn number_as<T: TryFrom<u64>>(&self, range: RangeInclusive<u64>) -> Result<T> {
        T::try_from(self.number(range)?).map_err(|_| self.invalid("is too large"))
    }

    /// Milliseconds within `range`.
    pub fn millis(&self, range: RangeInclusive<u64>) -> Result<Duration> {
        self.number(range).map(Duration::from_millis)
    }

    /// Seconds within `range`.
    pub fn secs(&self, range: RangeInclusive<u64>) -> Result<Duration> {
        self.number(range).map(Duration::from_secs)
    }

    /// `true`/`1`/`yes` or `false`/`0`/`no`.
    pub fn flag(&self) -> Result<bool> {
        match self.value.as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(self.invalid("must be true or false")),
        }
    }

    /// An age such as `30s`, `15m`, `12h` or `7d` (a whole number and a unit), whose seconds
    /// lie within `secs`.
    pub fn age(&self, secs: RangeInclusive<u64>) -> Result<Duration> {
        let unit_at = self
            .value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(self.value.len());
        let (n, unit) = self.value.split_at(unit_at);
        let per = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => 0,
        };
        n.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(per))
            .filter(|s| secs.contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| {
                self.invalid(format_args!(
                    "must be an age such as 30s, 15m, 12h or 7d, from {} s to {} s",
                    secs.start(),
                    secs.end()
                ))
            })
    }

    /// The value, when it is one of `known`.
    pub fn one_of(&self, known: &[&str]) -> Result<&str> {
        if known.contains(&self.value.as_str()) {
            Ok(&self.value)
        } else {
            Err(self.invalid(format_args!("must be one of {}", known.join(", "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(query: &str) -> UrlOption {
        UrlOptions::parse("Test", "test", Some(query))
            .into_iter()
            .next()
            .expect("one option")
    }

    #[test]
    fn typed_values_within_their_range() {
        assert_eq!(one("n=5").number(1..=10).ok(), Some(5));
        assert_eq!(one("n=5").number_as::<u8>(1..=10).ok(), Some(5u8));
        assert_eq!(
            one("t=250").millis(1..=1000).ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(one("t=2").secs(1..=20).ok(), Some(Duration::from_secs(2)));
        assert_eq!(one("f=yes").flag().ok(), Some(true));
        assert_eq!(one("f=0").flag().ok(), Some(false));
        assert_eq!(
            one("a=12h").age(1..=86_400).ok(),
            Some(Duration::from_secs(43_200))
        );
        assert_eq!(one("p=b").one_of(&["a", "b"]).ok(), Some("b"));
        assert_eq!(one("k=a%20b").value(), "a b");
    }

    #[test]
    fn bad_values_are_config_errors_naming_the_option() {
        for (query, err) in [
            ("n=0", one("n=0").number(1..=10).err()),
            ("n=11", one("n=11").number(1..=10).err()),
            ("n=-1", one("n=-1").number(0..=10).err()),
            ("n=x", one("n=x").number(0..=u64::MAX).err()),
            (
                "n=99999999999999999999",
                one("n=99999999999999999999").number(0..=u64::MAX).err(),
            ),
            ("n=300", one("n=300").number_as::<u8>(0..=1000).err()),
            ("f=maybe", one("f=maybe").flag().err()),
            ("a=7", one("a=7").age(1..=100).err()),
            ("a=7w", one("a=7w").age(1..=100).err()),
            ("a=0s", one("a=0s").age(1..=100).err()),
            (
                "a=99999999999999999999d",
                one("a=99999999999999999999d").age(1..=u64::MAX).err(),
            ),
            ("p=c", one("p=c").one_of(&["a", "b"]).err()),
        ] {
            assert!(err.is_some(), "{query} was accepted");
            let Some(e) = err else { continue };
            assert_eq!(e.kind(), ErrorKind::Config, "{query}");
            let key = query.split('=').next().unwrap_or_default();
            assert!(
                e.to_string().contains(&format!("Test URL option {key}=")),
                "{e}"
            );
        }
        let options = UrlOptions::parse("Test", "test", Some("x=1"));
        let x = options.clone().into_iter().next().expect("x");
        let e = options.unknown(&x, &["a", "b"]);
        assert!(
            e.to_string()
                .contains("unknown Test URL option \"x\" (known: a, b)"),
            "{e}"
        );
    }
}
