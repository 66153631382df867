"""``none``: the identity. RUM uses it for bins that need no work (e.g. low memorization)."""

from __future__ import annotations

from .base import Unlearner, register


@register
class NoOp(Unlearner):
    name = "none"

    def unlearn(self, model, task, runtime, ctx=None):
        if ctx is not None:
            ctx.report(1.0)
        return model
