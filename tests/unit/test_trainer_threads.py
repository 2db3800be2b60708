"""How many CPU threads a trainer takes: the spec's number, else OpenMP's OMP_NUM_THREADS when the
environment sets it (an operator's or the test runner's cap), else every core."""

from __future__ import annotations

import os

import pytest
import torch

from posttrain.trainer.run_setup import set_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_specs_number_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(3) == 3 and torch.get_num_threads() == 3


@pytest.mark.parametrize(("omp", "expected"), [("1", 1), ("2,1", 2), (None, None), ("", None), ("many", None)])
def test_without_a_number_the_environment_caps_it_else_every_core(monkeypatch, omp, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    want = expected or os.cpu_count()
    assert set_threads(None) == want and torch.get_num_threads() == want
