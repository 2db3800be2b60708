"""Which rows each batch takes: ``shuffle: false`` keeps the dataset's order; shuffled batches
cover every row once, hold rows of similar length, and follow the seed."""

from __future__ import annotations

import itertools
import random

from posttrain.trainer.batching import MEGABATCH_FACTOR, length_grouped_batches, pack_rows

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(5, 300) for _ in range(103)]


def test_without_shuffle_batches_follow_the_dataset_order():
    batches = length_grouped_batches(LENGTHS, batch_size=4, shuffle=False, rng=random.Random(0))
    assert batches == [list(range(i, min(i + 4, 103))) for i in range(0, 103, 4)]
    assert length_grouped_batches(LENGTHS, batch_size=4, shuffle=False, rng=random.Random(1)) == batches


def test_shuffled_batches_cover_every_row_once_with_similar_lengths():
    batches = length_grouped_batches(LENGTHS, batch_size=4, shuffle=True, rng=random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(103))
    assert batches == length_grouped_batches(LENGTHS, batch_size=4, shuffle=True, rng=random.Random(0))
    assert batches != length_grouped_batches(LENGTHS, batch_size=4, shuffle=True, rng=random.Random(1))

    def padding(groups: list[list[int]]) -> int:
        return sum(max(LENGTHS[i] for i in g) * len(g) - sum(LENGTHS[i] for i in g) for g in groups)

    in_order = length_grouped_batches(LENGTHS, batch_size=4, shuffle=False, rng=random.Random(0))
    assert padding(batches) < padding(in_order) / 2  # grouped within windows of MEGABATCH_FACTOR batches
    assert MEGABATCH_FACTOR > 1


def test_packs_keep_the_dataset_order_without_shuffle():
    packs = pack_rows(LENGTHS, max_length=512, keep_order=True)
    assert [i for pack in packs for i in pack] == list(range(103))
    assert all(sum(LENGTHS[i] for i in pack) <= 512 for pack in packs)
    # Each pack was closed because the next row did not fit.
    assert all(sum(LENGTHS[i] for i in pack) + LENGTHS[nxt[0]] > 512 for pack, nxt in itertools.pairwise(packs))
    fuller = pack_rows(LENGTHS, max_length=512)
    assert sorted(i for pack in fuller for i in pack) == list(range(103)) and len(fuller) <= len(packs)
