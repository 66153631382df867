"""The one training loop: original models, the retrain reference and every fine-tuning unlearner.

``fit`` is plain PyTorch: for each epoch, for each batch, zero the grads, compute the loss the
caller gives (under autocast on CUDA), backward, optionally edit the gradients (masks), step;
the scheduler steps once per epoch. Everything specific to a method lives in the loss function
and the ``after_backward`` hook the method passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch, View
from .events import LearningEvents
from .runtime import RunContext, Runtime, predict, seed_everything

LossFn = Callable[[nn.Module, torch.Tensor, Batch, int], torch.Tensor]


def make_optimizer(
    params: Iterable[nn.Parameter], name: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown optimizer {name!r} (sgd, adam)")


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, epochs: int, eta_min_frac: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cosine`` anneals to ``eta_min_frac``·lr over ``epochs`` scheduler steps (epochs, or optimizer
    steps for a step-measured loop: see :func:`fit`); ``constant`` is no scheduler."""
    if kind == "constant":
        return None
    if kind == "cosine":
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1),
                                                          eta_min=eta_min_frac * base)
    raise ValueError(f"schedule: unknown schedule {kind!r} (constant, cosine)")


def fit(
    model: nn.Module,
    *,
    epochs: int,
    batches: Callable[[int], Iterable[Batch]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    runtime: Runtime,
    ctx: RunContext | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    train_mode: bool = True,
    monitor: Callable[[], bool] | None = None,
    monitor_every: int = 10,
    max_steps: int | None = None,
) -> nn.Module:
    """Run ``epochs`` epochs of ``loss_fn`` over ``batches(epoch)``; report progress per epoch.

    With ``max_steps`` the loop is measured in optimizer steps instead: it passes over
    ``batches(epoch)`` for epoch 0, 1, … until ``max_steps`` steps are done (``epochs`` is then only
    an upper bound), the scheduler steps after every optimizer step (build it with
    ``make_scheduler(..., max_steps)``) and progress is reported per step.
    ``monitor()``, if given, is called every ``monitor_every`` optimizer steps (and, in the epoch
    mode, at the end of every epoch); when it returns False the loop stops there (the monitor restores what it wants).
    """
    ctx = ctx or RunContext()
    model.train(train_mode)
    steps = 0
    per_step = max_steps is not None
    for epoch in range(epochs):
        steps_before = steps
        for batch in batches(epoch):
            ctx.check()
            x = runtime.inputs(batch.x)
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                loss = loss_fn(model, x, batch, epoch)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            optimizer.step()
            steps += 1
            if per_step:
                if scheduler is not None:
                    scheduler.step()
                ctx.report(steps / max(max_steps, 1))
            if monitor is not None and steps % monitor_every == 0 and not monitor():
                ctx.report(1.0)
                model.eval()
                return model
            if per_step and steps >= max_steps:
                ctx.report(1.0)
                model.eval()
                return model
        if steps == steps_before:
            break  # nothing to train on (an empty view): more epochs would not change that
        if per_step:
            continue  # step-measured: the monitor runs every ``monitor_every`` steps only
        if scheduler is not None:
            scheduler.step()
        if monitor is not None and not monitor():
            ctx.report(1.0)
            break
        ctx.report((epoch + 1) / max(epochs, 1))
    model.eval()
    return model


def gradient_restriction(model: nn.Module, loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """IAU's GR penalty (docs/methods.md#iau): loss + α · Σ_tensors ||∇_θt loss||₂, double backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return loss + alpha * sum(g.float().norm(2) for g in grads)


@dataclass
class TrainConfig:
    """Recipe for training an original model or the retrain reference.

    Defaults suit our small models (digits, Fashion-MNIST): SGD(0.05, momentum 0.9, wd 5e-4),
    cosine, batch 128, no augmentation (as every RUM unlearning run uses ``--no_aug``).
    """

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    gr_alpha: float = 0.0  # > 0 trains with IAU's gradient-restriction penalty
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def train_model(
    model: nn.Module,
    train: View,
    cfg: TrainConfig,
    *,
    runtime: Runtime,
    events: LearningEvents | None = None,
    ctx: RunContext | None = None,
) -> nn.Module:
    """Train ``model`` on ``train`` with cross-entropy; optionally record learning events.

    ``events`` is indexed by *train-split row* (``train.index``), so the recorder of a model
    trained on a subset still lines up with the dataset's ids.
    """
    gen = seed_everything(cfg.seed)
    model = runtime.prepare(model)
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs)
    index_cpu = train.index.cpu()

    def loss_fn(m: nn.Module, x: torch.Tensor, b: Batch, epoch: int) -> torch.Tensor:
        logits = m(x)
        loss = F.cross_entropy(logits, b.y)
        if events is not None:
            events.update(index_cpu[b.pos], logits, b.y)
        if cfg.gr_alpha > 0:
            loss = gradient_restriction(m, loss, cfg.gr_alpha)
        return loss

    return fit(
        model, epochs=cfg.epochs, batches=lambda e: train.batches(cfg.batch_size, shuffle=True, generator=gen),
        loss_fn=loss_fn, optimizer=opt, scheduler=sched, runtime=runtime, ctx=ctx,
    )


def accuracy(model: nn.Module, view: View, runtime: Runtime) -> float:
    """Top-1 accuracy in [0, 1] (eval mode); NaN for an empty view."""
    if len(view) == 0:
        return float("nan")
    logits = predict(model, view, runtime)
    return (logits.argmax(1) == view.y.cpu()).float().mean().item()
