//! Kafka's Java-client default partitioner for keyed records, so this tool places each device on
//! the same partition a Java producer would: `toPositive(murmur2(key)) % numPartitions`.
//!
//! librdkafka's `murmur2_random` partitioner computes the same function (same murmur2 variant,
//! same sign mask), so a producer configured with `partitioner=murmur2_random` agrees with this too.

use std::num::NonZeroU32;

const SEED: u32 = 0x9747_b28c;
const M: u32 = 0x5bd1_e995;
const R: u32 = 24;

/// Kafka's `Utils.murmur2`: 32-bit MurmurHash2 with seed `0x9747b28c`, little-endian 4-byte blocks,
/// Java's wrapping `int` arithmetic, returned as Java's signed `int`.
pub fn murmur2(data: &[u8]) -> i32 {
    // Java mixes the length in as an int; only the low 32 bits matter.
    let mut h = SEED ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    // The 1..3 trailing bytes fold in high-to-low, then one multiply (Java's fall-through switch).
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Kafka's `Utils.toPositive`: clears the sign bit (not `abs`, which would map `i32::MIN` badly).
pub fn to_positive(x: i32) -> i32 {
    x & 0x7fff_ffff
}

/// The partition the Java client's default partitioner picks for a keyed record.
pub fn partition_for_key(key: &[u8], num_partitions: NonZeroU32) -> u32 {
    // to_positive leaves a non-negative i32, so the cast to u32 is exact.
    to_positive(murmur2(key)) as u32 % num_partitions.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: u32) -> NonZeroU32 {
        NonZeroU32::new(p).expect("non-zero")
    }

    /// Expected values from Apache Kafka's `UtilsTest.testMurmur2` (Java's signed ints).
    #[test]
    fn murmur2_matches_kafka_java_vectors() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2(input.as_bytes()), want, "murmur2({input:?})");
        }
    }

    /// librdkafka's rdmurmur2 unit-test vectors (unsigned), covering every tail length 0..3.
    #[test]
    fn murmur2_matches_librdkafka_vectors() {
        let unaligned = b"PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: [(&[u8], u32); 8] = [
            (b"kafka", 0xd067_cf64),
            (b"giberish123456789", 0x8f55_2b0c),
            (b"1234", 0x9fc9_7b14),
            (b"234", 0xe7c0_09ca),
            (b"34", 0x8739_30da),
            (b"4", 0x5a4b_5ca1),
            (unaligned, 0x7842_4f1c),
            (b"", 0x106e_08d9),
        ];
        for (input, want) in cases {
            assert_eq!(
                murmur2(input) as u32,
                want,
                "murmur2({:?})",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn to_positive_masks_the_sign_bit() {
        assert_eq!(to_positive(i32::MIN), 0);
        assert_eq!(to_positive(-1), i32::MAX);
        assert_eq!(to_positive(-973_932_308), 1_173_551_340);
        assert_eq!(to_positive(479_470_107), 479_470_107);
    }

    #[test]
    fn partitions_match_java_assignment() {
        // (-973932308 & 0x7fffffff) = 1173551340; % 10 = 0, % 7 = 1173551340 - 7*167650191 = 3.
        assert_eq!(partition_for_key(b"21", n(10)), 0);
        assert_eq!(partition_for_key(b"21", n(7)), 3);
        // foobar: 1357151166 % 10 = 6, % 3 = 0.
        assert_eq!(partition_for_key(b"foobar", n(10)), 6);
        assert_eq!(partition_for_key(b"foobar", n(3)), 0);
        // abc is positive already: 479470107 % 12 = 3.
        assert_eq!(partition_for_key(b"abc", n(12)), 3);
        assert_eq!(partition_for_key(b"anything", n(1)), 0);
    }
}
