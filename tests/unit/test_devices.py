"""Which GPU ids a worker hands out, and that a held GPU is never handed out twice."""

from __future__ import annotations

from posttrain.worker.devices import GpuPool, visible_gpus


def test_gpu_ids_come_from_the_setting_then_the_workers_own_cuda_visible_devices():
    assert visible_gpus(device="auto", configured=["1", "3"], environ={"CUDA_VISIBLE_DEVICES": "0"}) == ["1", "3"]
    assert visible_gpus(device="auto", configured=None, environ={"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus(device="cuda", configured=None, environ={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus(device="cpu", configured=["1"], environ={"CUDA_VISIBLE_DEVICES": "0"}) == []


def test_one_job_per_gpu():
    pool = GpuPool(["2", "5"])
    first, second = pool.take(), pool.take()
    assert {first, second} == {"2", "5"} and pool.take() is None and pool.free() == 0
    pool.give_back(first)
    assert pool.free() == 1 and pool.take() == first
    assert not GpuPool([]).enabled and GpuPool([]).take() is None
