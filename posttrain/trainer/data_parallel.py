"""Data parallel training (torch's ``DistributedDataParallel``) for the SFT loop.

The loop's forward (``forward.label_logits``) runs the model's body and output head itself rather
than through ``model.forward``, so DDP wraps a small module whose ``forward`` *is* that call: the
gradients of every trainable parameter are then averaged over the ranks by DDP's own reducer,
during the backward of a step's last micro-batch (``no_sync`` for the ones before it). Each rank
scales its loss by the world size, so the averaged gradient is the gradient of the token mean over
the whole global batch, the same update one process would make from the same batches.

In a job of one process nothing is wrapped and ``label_logits`` is ``forward.label_logits``.
"""

from __future__ import annotations

import contextlib
import inspect

from posttrain.trainer import distributed, forward
from posttrain.trainer.precision import Precision


class DataParallel:
    """The loop's forward for this rank, and the context that defers DDP's gradient sync."""

    def __init__(self, model, *, precision: Precision) -> None:
        self.model = model
        self.precision = precision
        self.world = distributed.world()
        self._ddp = _wrap(model, precision=precision, world=self.world) if self.world.distributed else None

    def label_logits(self, batch):
        """``forward.label_logits`` for this batch, through DDP when there are several ranks."""
        if self._ddp is None:
            return forward.label_logits(self.model, batch, precision=self.precision)
        return self._ddp(batch)

    def no_sync(self):
        """Accumulate this micro-batch's gradients locally (all but a step's last micro-batch)."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @property
    def loss_scale(self) -> int:
        """What each rank multiplies its loss by, so DDP's mean of the gradients is their sum."""
        return self.world.size


def _wrap(model, *, precision: Precision, world: distributed.World):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class LabelLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            return forward.label_logits(self.model, batch, precision=precision)

    # DDP broadcasts rank 0's weights at construction, so every rank starts from the same ones;
    # buffers (rotary tables, masks) are the same everywhere and need no broadcast each forward.
    on_gpu = world.backend == "nccl"
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {
        "broadcast_buffers": False}
    return DistributedDataParallel(LabelLogits(), device_ids=[world.local_rank] if on_gpu else None, **no_buffer_sync)
