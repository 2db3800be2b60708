"""Data parallel training for the SFT loop: torch's ``DistributedDataParallel`` for LoRA, FSDP2
(``fully_sharded``) for a full fine-tune.

The loop's forward (``forward.label_logits``) runs the model's body and output head itself rather
than through ``model.forward``, so DDP wraps a small module whose ``forward`` *is* that call: the
gradients of every trainable parameter are then averaged over the ranks by DDP's own reducer,
during the backward of a step's last micro-batch (``no_sync`` for the ones before it). Each rank
scales its loss by the world size, so the averaged gradient is the gradient of the token mean over
the whole global batch, the same update one process would make from the same batches.

A full fine-tune (``sharded=True``) on several ranks is sharded with FSDP2 instead
(``fully_sharded``): the same wrapper module is its root, the same loss scale applies (FSDP2's
reduce-scatter averages over the ranks too), and ``no_sync`` defers its gradient reduction the same
way. Every forward of a sharded model is a collective, so evaluation goes through
``eval_logits`` on every rank.

In a job of one process nothing is wrapped and ``label_logits`` is ``forward.label_logits``.
"""

from __future__ import annotations

import contextlib
import inspect

from posttrain.trainer import distributed, forward, fully_sharded
from posttrain.trainer.precision import Precision


class DataParallel:
    """The loop's forward for this rank, and the context that defers DDP's gradient sync."""

    def __init__(self, model, *, precision: Precision, sharded: bool = False, compute=None) -> None:
        self.model = model
        self.precision = precision
        #: What the wrapped forward computes: ``forward.label_logits`` (SFT) unless told (DPO's log-probs).
        self.compute = compute or forward.label_logits
        self.world = distributed.world()
        #: FSDP2: weights, gradients and optimizer state sharded over the ranks (a full fine-tune).
        self.sharded = sharded and self.world.distributed
        self.kind = "fsdp2" if self.sharded else "ddp" if self.world.distributed else "none"
        self._ddp = None
        if self.sharded:
            self._ddp = _label_logits_module(model, precision=precision, compute=self.compute)
            fully_sharded.shard(self._ddp, model)
        elif self.world.distributed:
            self._ddp = _wrap(model, precision=precision, world=self.world, compute=self.compute)

    def label_logits(self, batch):
        """``forward.label_logits`` for this batch, through DDP when there are several ranks."""
        if self._ddp is None:
            return self.compute(self.model, batch, precision=self.precision)
        return self._ddp(batch)

    def eval_logits(self, batch):
        """``label_logits`` for evaluation: through the sharded root under FSDP2 (every rank must
        run it), the model itself otherwise (rank 0 alone may evaluate)."""
        if self.sharded:
            return self._ddp(batch)
        return self.compute(self.model, batch, precision=self.precision)

    def no_sync(self):
        """Accumulate this micro-batch's gradients locally (all but a step's last micro-batch)."""
        if self.sharded:
            return _deferred_reduction(self._ddp)
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @property
    def loss_scale(self) -> int:
        """What each rank multiplies its loss by, so DDP's mean of the gradients is their sum."""
        return self.world.size


@contextlib.contextmanager
def _deferred_reduction(root):
    """FSDP2's ``no_sync``: keep this micro-batch's gradients unreduced until the step's last one."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def _label_logits_module(model, *, precision: Precision, compute):
    """A module whose ``forward`` is the loop's ``compute`` (``forward.label_logits``) of ``model``."""
    import torch

    class LabelLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            return compute(self.model, batch, precision=precision)

    return LabelLogits()


def _wrap(model, *, precision: Precision, world: distributed.World, compute):
    from torch.nn.parallel import DistributedDataParallel

    # DDP broadcasts rank 0's weights at construction, so every rank starts from the same ones;
    # buffers (rotary tables, masks) are the same everywhere and need no broadcast each forward.
    on_gpu = world.backend == "nccl"
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {
        "broadcast_buffers": False}
    return DistributedDataParallel(_label_logits_module(model, precision=precision, compute=compute),
                                   device_ids=[world.local_rank] if on_gpu else None, **no_buffer_sync)
