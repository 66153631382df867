"""Names of the built-in unlearners and proxies, and the default method for rows with wrong
labels, without importing torch.

The API validates a policy's method and proxy names against these lists; the registries in
:mod:`worker.engine.unlearners` and :mod:`worker.engine.proxies` are the source of truth and a
test keeps the two equal. Hyperparameters have their own torch-free schema in
:mod:`worker.engine.hparams`, which the API and the unlearners both check against.
"""

from enum import StrEnum

METHODS: tuple[str, ...] = (
    "retrain", "finetune", "neggrad", "neggrad_plus", "l1_sparse", "random_label", "salun", "scrub", "del", "iau",
    "none",
)
# Rows whose labels are wrong (requests with reason mislabeled / poisoned): one method for all of
# them, run before the policy's bins (worker/engine/rum.py explains; docs/unlearning.md#corrupted-rows
# has the measurements): fine-tune on the retain set mixed with the rows relabeled to the model's
# runner-up class, 8% of the original's steps at its learning rate. Chosen on digits only.
DEFAULT_CORRECTIVE: tuple[str, dict] = ("random_label", {"label_mode": "runner_up", "budget": 0.08, "lr_scale": 1.0})
PROXIES: tuple[str, ...] = (
    "confidence", "max_conf", "entropy", "bi_acc", "confidence_final", "max_conf_final", "entropy_final",
    "bi_acc_final", "holdout_retrain", "loss_curvature",
)
PROXY_ALIASES: dict[str, str] = {"ho_ret": "holdout_retrain", "curvature_final": "loss_curvature",
                                 "curvature": "loss_curvature"}
# Proxies that need learning events recorded during training.
NEEDS_EVENTS: tuple[str, ...] = ("confidence", "max_conf", "entropy", "bi_acc")


class GuardOutcome(StrEnum):
    """How a method's run ended against the accuracy guard (worker/engine/unlearners/base.py,
    ``RetainGuard``): the engine writes it into the run's record, the pipeline and the report read it."""

    WITHIN = "within"  # the final state is within the limit: kept
    RESTORED = "restored"  # went past it: the last state within it was kept
    INPUT = "input"  # went past it and no state was within it: the input model was kept
    OFF = "off"  # no guard (``max_retain_drop: null``)
