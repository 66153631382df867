"""Where and how computations run (device, precision, memory format) and how they report.

``Runtime`` is chosen once per job: CUDA when present, with bf16 autocast and channels_last for
convolutional models; CPU in float32 otherwise. ``RunContext`` carries a progress callback
(stage, fraction done) and a cooperative cancellation check that long loops call once per batch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import Cancelled


@dataclass
class Runtime:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def auto(cls, device: str | torch.device | None = None, amp: bool = True) -> Runtime:
        dev = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        )
        cuda = dev.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(dev, torch.bfloat16 if (cuda and amp) else None, channels_last=cuda)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last and _has_conv(model):
            model = model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> dict:
        d = {"device": str(self.device), "amp": str(self.amp_dtype) if self.amp_dtype else None,
             "channels_last": self.channels_last, "torch": torch.__version__}
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        else:  # the vector path CPU kernels take: the same seeds give other models on another one
            d["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        return d


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


ProgressFn = Callable[[str, float], None]


@dataclass
class RunContext:
    """Progress reporting and cooperative cancellation for one long computation.

    ``progress(stage, fraction)`` receives the fraction of the *whole* computation; ``sub``
    maps a part of the work onto a slice [start, end] of it. ``cancel_requested()`` is polled
    by :meth:`check`, which raises :class:`Cancelled`.
    """

    progress: ProgressFn | None = None
    cancel_requested: Callable[[], bool] | None = None
    start: float = 0.0
    end: float = 1.0
    stage: str = "run"

    def check(self) -> None:
        if self.cancel_requested is not None and self.cancel_requested():
            raise Cancelled(f"canceled during {self.stage}")

    def report(self, fraction: float, stage: str | None = None) -> None:
        self.check()
        if self.progress is not None:
            f = self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)
            self.progress(stage or self.stage, f)

    def sub(self, start: float, end: float, stage: str | None = None) -> RunContext:
        span = self.end - self.start
        return RunContext(
            self.progress, self.cancel_requested,
            self.start + span * start, self.start + span * end, stage or self.stage,
        )


@torch.no_grad()
def predict(model: nn.Module, view, runtime: Runtime, batch_size: int = 1024) -> torch.Tensor:
    """Float32 logits of ``model`` (eval mode) on every row of ``view``, on CPU, in view order."""
    was_training = model.training
    model.eval()
    out = []
    for b in view.batches(batch_size):
        with runtime.autocast():
            out.append(model(runtime.inputs(b.x)).float().cpu())
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)
