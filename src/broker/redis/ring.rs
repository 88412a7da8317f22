//! Which Redis address holds a channel: jump consistent hashing (Lamping and Veach) of the
//! channel name's FNV-1a hash over the configured list.
//!
//! Every node must compute the same answer, so the hash is a fixed algorithm (not std's,
//! which may change between Rust versions). Appending an address to the list moves about
//! 1/n of the channels, all to the new address; reordering the list moves most of them.

/// FNV-1a, 64 bits.
pub fn hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The bucket of `key` among `buckets` (at least 1).
pub fn jump(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// The shard of a channel among `shards` addresses.
pub fn shard(channel: &str, shards: usize) -> usize {
    jump(hash(channel), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly_and_an_added_shard_takes_only_its_share() {
        let names: Vec<String> = (0..20_000).map(|i| format!("chat:room-{i}")).collect();
        let mut counts = [0usize; 4];
        for n in &names {
            counts[shard(n, 4)] += 1;
        }
        for c in counts {
            assert!((4_000..6_000).contains(&c), "{counts:?}");
        }
        let moved: Vec<&String> = names
            .iter()
            .filter(|n| shard(n, 4) != shard(n, 5))
            .collect();
        assert!(
            moved.iter().all(|n| shard(n, 5) == 4),
            "only to the new shard"
        );
        assert!((3_000..5_000).contains(&moved.len()), "{}", moved.len());
        assert!(names.iter().all(|n| shard(n, 1) == 0));
    }

    #[test]
    fn is_a_fixed_function() {
        // Nodes of different builds must agree: these values never change.
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(jump(hash("chat:lobby"), 2), shard("chat:lobby", 2));
    }
}
