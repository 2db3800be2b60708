"""The completion mask of sampled rows: every token up to and including the first end token."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from posttrain.trainer.sampling import completion_mask  # noqa: E402


def test_mask_runs_through_the_first_eos_only():
    ids = torch.tensor([[5, 6, 2, 0, 0],   # eos at 2: kept, padding after it is not
                        [5, 2, 7, 2, 8],   # a second eos, and tokens after the first: not scored
                        [5, 6, 7, 8, 9],   # no eos: cut off at max length, every token scored
                        [2, 0, 0, 0, 0]])  # eos first: one token
    assert completion_mask(ids, eos_ids={2}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                                                          [1, 0, 0, 0, 0]]


def test_any_of_several_end_tokens_ends_a_completion():
    ids = torch.tensor([[5, 3, 6], [5, 6, 4]])
    assert completion_mask(ids, eos_ids={3, 4}).tolist() == [[1, 1, 0], [1, 1, 1]]
