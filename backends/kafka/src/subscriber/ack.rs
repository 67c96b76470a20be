//! Acked progress goes to Kafka as commits: the lowest unacked offset of each owned
//! partition, with a note in the commit's metadata.
//!
//! The note busbar stores in a Kafka commit's metadata, so the next owner of a partition
//! knows what the committed offset alone cannot say (the idea of Confluent's Parallel
//! Consumer): which records past the committed offset were acked already, and how many times
//! handlers received each unacked one.
//!
//! Format (ASCII, offsets relative to the committed offset `c`):
//! `busbar1;a=<s>-<e>,<s>-<e>...;s=<o>:<n>,<o>:<n>...` — `a` lists acked ranges
//! `c+s .. c+e` (end excluded), `s` lists unacked offsets `c+o` a handler received `n` times.
//! Kafka keeps at most `offset.metadata.max.bytes` (4096 by default) per commit: a note that
//! would be longer keeps the ranges and counts nearest the committed offset and drops the
//! rest (those records are then handed out again, or with a lower attempt: at-least-once, never
//! a loss). A note that does not parse (another client's metadata) is ignored.

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::membership::MemberContext;
use super::Shared;
use busbar_core::raw::inflight::Progress;

const TAG: &str = "busbar1";

/// The longest note written (the broker's default limit is 4096 bytes).
pub(super) const MAX_NOTE: usize = 4000;

/// The note for `p` (empty when there is nothing to say), at most `max` bytes.
pub(super) fn encode(p: &Progress, max: usize) -> String {
    if p.acked.is_empty() && p.seen.is_empty() {
        return String::new();
    }
    let acked: Vec<String> = p
        .acked
        .iter()
        .map(|(s, e)| format!("{}-{}", s - p.commit, e - p.commit))
        .collect();
    let seen: Vec<String> = p
        .seen
        .iter()
        .map(|(o, n)| format!("{}:{n}", o - p.commit))
        .collect();
    // Fill the budget nearest-first, acked ranges before counts.
    let mut out = format!("{TAG};a=");
    let budget = max.saturating_sub(out.len() + 3);
    let mut used = 0;
    let mut first = true;
    for a in &acked {
        if used + a.len() + 1 > budget / 2 + budget / 4 {
            break;
        }
        if !first {
            out.push(',');
        }
        out.push_str(a);
        used += a.len() + 1;
        first = false;
    }
    out.push_str(";s=");
    first = true;
    for s in &seen {
        if out.len() + s.len() + 1 > max {
            break;
        }
        if !first {
            out.push(',');
        }
        out.push_str(s);
        first = false;
    }
    out
}

/// The progress a note says, for a partition committed at `commit`; `None` for an empty or
/// foreign note.
pub(super) fn decode(commit: i64, note: &str) -> Option<Progress> {
    let mut parts = note.split(';');
    if parts.next()? != TAG {
        return None;
    }
    let mut p = Progress::at(commit);
    for part in parts {
        let (name, list) = part.split_once('=')?;
        for item in list.split(',').filter(|i| !i.is_empty()) {
            match name {
                "a" => {
                    let (s, e) = item.split_once('-')?;
                    let (s, e) = (s.parse::<i64>().ok()?, e.parse::<i64>().ok()?);
                    if s < 0 || e <= s {
                        return None;
                    }
                    p.acked
                        .push((commit.checked_add(s)?, commit.checked_add(e)?));
                }
                "s" => {
                    let (o, n) = item.split_once(':')?;
                    let (o, n) = (o.parse::<i64>().ok()?, n.parse::<u32>().ok()?);
                    if o < 0 {
                        return None;
                    }
                    p.seen.push((commit.checked_add(o)?, n));
                }
                _ => {}
            }
        }
    }
    Some(p)
}

/// Commits the acked progress of the owned partitions (or of `only`), synchronously: the
/// lowest unacked offset, with a note of what lies past it (see the module documentation).
pub(super) fn commit(
    consumer: &BaseConsumer<MemberContext>,
    shared: &Shared,
    only: Option<&[i32]>,
) {
    let points: Vec<_> = shared
        .state()
        .progress_to_commit()
        .into_iter()
        .filter(|(p, _, _)| only.is_none_or(|o| o.contains(p)))
        .collect();
    if points.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, progress, _) in &points {
        match tpl.add_partition_offset(&shared.topic, *p, Offset::Offset(progress.commit)) {
            Ok(()) => {
                if let Some(mut e) = tpl.find_partition(&shared.topic, *p) {
                    e.set_metadata(encode(progress, MAX_NOTE));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka: bad commit offset");
                return;
            }
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            let mut st = shared.state();
            for (p, progress, changes) in points {
                st.committed_progress(p, &progress, changes);
            }
        }
        Err(e) => {
            tracing::warn!(group = %shared.options.group, error = %e, "kafka: commit failed; retrying later")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Progress {
            commit: 1000,
            acked: vec![(1001, 1003), (1005, 1006)],
            seen: vec![(1000, 2), (1004, 1)],
        };
        let note = encode(&p, MAX_NOTE);
        assert_eq!(note, "busbar1;a=1-3,5-6;s=0:2,4:1");
        assert_eq!(decode(1000, &note), Some(p));
    }

    #[test]
    fn empty_and_foreign_notes() {
        assert_eq!(encode(&Progress::at(5), MAX_NOTE), "");
        assert_eq!(decode(5, ""), None);
        assert_eq!(decode(5, "some other client's metadata"), None);
        assert_eq!(decode(5, "busbar1;a=3-1"), None);
        assert_eq!(decode(5, "busbar1;a=-3-1"), None);
        assert_eq!(decode(i64::MAX, "busbar1;a=1-2"), None);
        assert_eq!(decode(5, "busbar1;s=1:x"), None);
    }

    #[test]
    fn a_long_note_keeps_what_is_nearest() {
        let p = Progress {
            commit: 0,
            acked: (1..5000).map(|i| (2 * i, 2 * i + 1)).collect(),
            seen: (1..5000).map(|i| (2 * i + 1, 1)).collect(),
        };
        let note = encode(&p, MAX_NOTE);
        assert!(note.len() <= MAX_NOTE, "{}", note.len());
        let back = decode(0, &note).expect("parses");
        assert!(!back.acked.is_empty() && !back.seen.is_empty());
        assert_eq!(back.acked[0], (2, 3));
        assert_eq!(back.seen[0], (3, 1));
        assert_eq!(back.acked, p.acked[..back.acked.len()]);
    }
}
