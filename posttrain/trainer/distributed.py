"""One job on several processes (ranks): the process group, who reports, and what the ranks agree on.

Whoever starts the ranks (``torch.distributed.run`` for the devices of one machine, a Ray executor
across machines) sets the standard variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; ``init_from_env`` joins the group they describe (gloo on a
CPU, nccl on GPUs). Without them the job is one process and every call here is a no-op, so the
single-device path runs exactly as before.

Only rank 0 reports (the protocol's stdout) and writes checkpoints and resume points; every rank
trains on its shard of each global batch. The ranks must stop at the same step, or one would wait
for ever in a collective the other never joins: a stop or pause request (a signal, stdin closing)
may reach them at different moments, so at each step boundary they all-reduce their flags and act
on the union. A rank that dies makes its peers' next collective fail (or time out after
``COLLECTIVE_TIMEOUT_SECONDS``); ``lost_peer`` tells that failure apart from a training error, so
the attempt ends without a ``failed`` event and the launcher requeues the job from its newest
checkpoint.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass

#: How long a collective waits for a peer before it fails: long enough for rank 0 to write a large
#: checkpoint while the others wait at the next step, short enough that a hung peer ends the attempt.
COLLECTIVE_TIMEOUT_SECONDS = 900.0

_PR_SET_PDEATHSIG = 1
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class World:
    """This process's place in the job: its rank among ``size`` ranks, and the backend that links them."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def reporting(self) -> bool:
        """Rank 0 speaks the protocol and writes the job's files; the others only train."""
        return self.rank == 0


_world = World()


def env_world_size() -> int:
    """``WORLD_SIZE`` as the starter set it (1 without one), readable before any import of torch."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def is_reporting_rank() -> bool:
    """True for rank 0 or a job of one process; known from ``RANK`` before the group is joined."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def world() -> World:
    """The world ``init_from_env`` joined (one process until then)."""
    return _world


def init_from_env(*, device: str) -> World:
    """Join the process group the environment describes, once; one process without ``WORLD_SIZE`` > 1.

    ``device`` is the spec's (``auto``, ``cpu``, ``cuda``): nccl where the job computes on GPUs,
    each rank on ``cuda:LOCAL_RANK``, else gloo. A rank also asks the kernel to kill it if its
    starter dies, so a starter killed with SIGKILL leaves no rank training on its own."""
    global _world
    if _world.distributed or env_world_size() == 1:
        return _world
    import torch
    import torch.distributed as dist

    _die_with_parent()
    rank, size = int(os.environ["RANK"]), env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if os.environ.get("MASTER_ADDR") in _LOOPBACK:
        # Ranks of one machine: gloo's sockets listen on loopback only, not on every interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS),
                            **({"device_id": torch.device("cuda", local_rank)} if on_gpu else {}))
    _world = World(rank=rank, size=size, local_rank=local_rank, backend=backend)
    return _world


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGKILL this rank when the process that started it exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the starter died before the request was in place
        os._exit(1)


def _device_tensor(values: list[float]):
    import torch

    device = torch.device("cuda", _world.local_rank) if _world.backend == "nccl" else torch.device("cpu")
    return torch.tensor(values, dtype=torch.float64, device=device)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Each value summed over the ranks (the values themselves in a job of one process)."""
    if not _world.distributed:
        return list(values)
    import torch.distributed as dist

    tensor = _device_tensor(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag true if it is true on any rank: what every rank acts on at a step boundary."""
    if not _world.distributed:
        return tuple(flags)
    return tuple(total > 0 for total in all_reduce_sum([float(flag) for flag in flags]))


def barrier() -> None:
    if _world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shard(items: list, *, rank: int | None = None, size: int | None = None) -> list:
    """This rank's share of ``items`` (DistributedSampler's split without padding: every
    ``size``-th item from ``rank`` on), so the ranks together take each item once, in order."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    return items[rank::size]


def resources() -> dict[str, object]:
    """What ``resources_allocated`` says about the world: its size and backend."""
    return {"world_size": _world.size, "backend": _world.backend or "none"}


def lost_peer(exc: BaseException) -> bool:
    """True when ``exc`` is a collective failing because another rank is gone (closed connection,
    timeout), not an error of the training itself."""
    if not _world.distributed:
        return False
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(mark in text for mark in (
        "connection closed by peer", "connection reset", "gloo", "nccl", "timed out", "broken pipe"))


def close() -> None:
    """Leave the process group (at the end of a run that completed or was cancelled)."""
    if _world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
