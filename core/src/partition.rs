//! How a key picks a partition, for backends that split a topic into partitions.

/// The partition of `key` among `partitions`: FNV-1a (32-bit) of the key's UTF-8 bytes,
/// modulo the partition count. Stable across versions and languages; every partitioned
/// backend uses it, so a key lands on the same partition number everywhere.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_fnv1a_and_spreads() {
        // FNV-1a 32 of "" is the offset basis; of "a" is 0xe40c292c.
        assert_eq!(partition_for("", u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_for("a", u32::MAX), 0xe40c_292c);
        let spread: std::collections::HashSet<u32> = (0..100)
            .map(|i| partition_for(&format!("k{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(partition_for("x", 0), 0);
    }
}
