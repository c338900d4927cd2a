//! Epoch plans: which examples go into which batch, reproducible from (seed, epoch) alone so a
//! resumed run sees exactly the batches an uninterrupted one would.

use crate::util::rng::stream_rng;
use rand::Rng;

/// Fisher-Yates with the given generator.
pub fn shuffle<T>(items: &mut [T], rng: &mut impl Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// Batches of example indices for one epoch. With `group_by_length`, the shuffled examples are
/// cut into mega-batches of 50 batches, each sorted by length before being split into batches
/// (similar lengths pad less), and the batch order is shuffled again.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut stream_rng(seed, 2 * epoch + 1));
    if !group_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches = vec![];
    for mega in order.chunks(batch_size * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut stream_rng(seed, 2 * epoch + 2));
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_reproducible_complete_and_grouped() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 500 + 1).collect();
        let a = epoch_batches(&lengths, 4, true, 42, 0);
        assert_eq!(a, epoch_batches(&lengths, 4, true, 42, 0));
        assert_ne!(a, epoch_batches(&lengths, 4, true, 42, 1));
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        let padding = |plan: &[Vec<usize>]| -> usize {
            plan.iter()
                .map(|b| {
                    let max = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let ungrouped = epoch_batches(&lengths, 4, false, 42, 0);
        assert!(
            padding(&a) * 5 < padding(&ungrouped),
            "grouping should cut padding"
        );
    }
}
