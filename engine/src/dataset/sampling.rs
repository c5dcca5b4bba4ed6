//! `#N` sampling with ms-swift's rule: fewer rows than the dataset has are drawn at random
//! without replacement (the first N when `dataset_shuffle` is off); more rows repeat the whole
//! dataset N / len times and draw the remaining N % len at random.

use crate::rng::SplitMix64;

/// The row indices `#N` selects from a dataset of `len` rows.
pub fn sample_indices(len: usize, n: usize, shuffle: bool, rng: &mut SplitMix64) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let repeats = n / len;
    let remainder = n % len;
    let mut indices: Vec<usize> = (0..repeats).flat_map(|_| 0..len).collect();
    if remainder > 0 {
        let order: Vec<usize> = if shuffle {
            rng.permutation(len)
        } else {
            (0..len).collect()
        };
        indices.extend_from_slice(&order[..remainder]);
    }
    indices
}

/// The generator every data decision draws from, seeded by `data_seed`.
pub fn data_rng(seed: u64) -> SplitMix64 {
    SplitMix64::new(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_rows_are_distinct_and_seeded() {
        let a = sample_indices(100, 10, true, &mut data_rng(42));
        let b = sample_indices(100, 10, true, &mut data_rng(42));
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10);
        assert_ne!(a, (0..10).collect::<Vec<_>>());
        assert_eq!(
            sample_indices(100, 3, false, &mut data_rng(1)),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn more_rows_repeat_the_dataset_then_draw_the_rest() {
        // ms-swift's example: 108 self-cognition rows, #500 -> 4 full copies + 68 random rows.
        let indices = sample_indices(108, 500, true, &mut data_rng(42));
        assert_eq!(indices.len(), 500);
        for row in 0..108 {
            let count = indices.iter().filter(|&&i| i == row).count();
            assert!(count == 4 || count == 5, "row {row} appears {count} times");
        }
        assert_eq!(&indices[..108], &(0..108).collect::<Vec<_>>()[..]);
        assert!(sample_indices(0, 5, true, &mut data_rng(1)).is_empty());
    }
}
