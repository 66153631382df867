"""Names of the built-in unlearners and proxies, without importing torch.

The API validates a policy's method and proxy names against these lists; the registries in
:mod:`worker.engine.unlearners` and :mod:`worker.engine.proxies` are the source of truth and a
test keeps the two equal. Hyperparameters have their own torch-free schema in
:mod:`worker.engine.hparams`, which the API and the unlearners both check against.
"""

METHODS: tuple[str, ...] = (
    "retrain", "finetune", "neggrad", "neggrad_plus", "l1_sparse", "random_label", "salun", "scrub", "del", "iau",
    "none",
)
PROXIES: tuple[str, ...] = (
    "confidence", "max_conf", "entropy", "bi_acc", "confidence_final", "max_conf_final", "entropy_final",
    "bi_acc_final", "holdout_retrain", "loss_curvature",
)
PROXY_ALIASES: dict[str, str] = {"ho_ret": "holdout_retrain", "curvature_final": "loss_curvature",
                                 "curvature": "loss_curvature"}
# Proxies that need learning events recorded during training.
NEEDS_EVENTS: tuple[str, ...] = ("confidence", "max_conf", "entropy", "bi_acc")
