"""Every registered unlearner on digits: contract checks, plus one check per method that fails when
the method's defining feature is missing (the ascent term, the mask, the reset, the step bound…)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from worker.engine import architectures
from worker.engine.errors import Cancelled, ConfigError
from worker.engine.metrics import fraction_changed, snapshot
from worker.engine.runtime import RunContext, predict
from worker.engine.training import accuracy
from worker.engine.unlearners import REGISTRY, UnlearningTask, get_unlearner
from worker.engine.unlearners.del_ import channel_scores, criticality_mask, criticality_scores, head_parameter_names
from worker.engine.unlearners.l1_sparse import L1Sparse
from worker.engine.unlearners.masking import top_fraction
from worker.engine.unlearners.random_label import random_labels
from worker.engine.unlearners.salun import saliency_mask
from worker.engine.unlearners.scrub import distill_kl

# Built-in methods only (other test modules may register spies into the same registry).
METHODS = sorted(n for n, c in REGISTRY.items() if c.__module__.startswith("worker.engine.unlearners."))
BUILTINS = {"retrain", "finetune", "neggrad", "neggrad_plus", "l1_sparse", "random_label", "salun", "scrub",
            "del", "iau", "none"}
# Few epochs, for tests that check plumbing rather than quality.
FAST = {"retrain": {"epochs": 2}, "iau": {}, "none": {}}


def fast(name: str) -> dict:
    return FAST.get(name, {"epochs": 2})


@pytest.fixture(scope="module")
def task(digits, forget_rows):
    forget, retain = digits.forget_retain(forget_rows)
    # as run_unlearning builds it: the guard also watches the dataset's holdout rows
    return UnlearningTask(forget, retain, digits.num_classes, seed=0, holdout=digits.view("holdout"))


@pytest.fixture(scope="module")
def make_original(_trained):
    spec, state, _ = _trained

    def make():
        m = architectures.build(spec)
        m.load_state_dict(copy.deepcopy(state))
        return m.eval()

    return make


def forget_confidence(model, view, runtime) -> float:
    p = predict(model, view, runtime).softmax(1)
    return p.gather(1, view.y.view(-1, 1).cpu()).mean().item()


@pytest.fixture(scope="module")
def default_run(make_original, task, digits, runtime):
    """Runs a method once with its defaults (cached per module) and measures it."""
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            model = make_original()
            before = snapshot(model)
            u = get_unlearner(name)
            out = u.unlearn(model, task, runtime)
            cache[name] = {
                "model": out, "before": before, "after": snapshot(out),
                "test_logits": predict(out, digits.view("test"), runtime),
                "acc_test": accuracy(out, digits.view("test"), runtime),
                "acc_forget": accuracy(out, task.forget, runtime),
                "conf_forget": forget_confidence(out, task.forget, runtime),
                "guard": (getattr(u, "last_run", None) or {}).get("guard"),
            }
        return cache[name]

    return run


def test_registry_has_every_builtin():
    assert set(METHODS) >= BUILTINS


@pytest.mark.parametrize("name", METHODS)
def test_defaults_run_change_the_model_and_keep_utility(name, default_run, make_original, task, runtime, digits):
    r = default_run(name)
    assert torch.isfinite(r["test_logits"]).all()
    assert all(torch.isfinite(v).all() for v in r["after"].values() if v.is_floating_point())
    changed = fraction_changed(r["before"], r["after"])
    if name == "none":
        assert changed == 0.0
    else:
        assert changed > 0.0
    original_acc = accuracy(make_original(), digits.view("test"), runtime)
    assert original_acc > 0.95
    assert r["acc_test"] >= original_acc - 0.05, f"{name} defaults dropped test accuracy to {r['acc_test']:.3f}"
    if name not in ("none", "retrain"):  # none stops before it forgets: the guard kept the end state
        assert r["guard"]["outcome"] == "within", (name, r["guard"])


@pytest.mark.parametrize("name", ["neggrad", "neggrad_plus", "random_label", "salun", "scrub", "del", "iau"])
def test_forgetting_methods_lower_forget_confidence(name, default_run, make_original, task, runtime):
    before = forget_confidence(make_original(), task.forget, runtime)
    after = default_run(name)["conf_forget"]
    margin = 0.005
    assert after < before - margin, f"{name}: forget confidence {before:.4f} -> {after:.4f}"


def test_neggrad_plus_ascent_term_matters(default_run, make_original, task, runtime):
    ablated = get_unlearner("neggrad_plus", alpha=1.0).unlearn(make_original(), task, runtime)  # no ascent
    assert default_run("neggrad_plus")["conf_forget"] < forget_confidence(ablated, task.forget, runtime) - 0.005


def test_scrub_max_steps_push_away_from_teacher(make_original, task, runtime):
    """Max-steps alone (γ = β = 0 silences the min-steps) raise the forget-set KL to the teacher;
    without them (msteps=-1) only BatchNorm's running statistics move."""
    teacher = predict(make_original(), task.forget, runtime)
    pure = {"epochs": 2, "gamma": 0.0, "beta": 0.0, "weight_decay": 0.0, "momentum": 0.0, "lr": 0.02,
            "forget_batch_size": 8, "max_retain_drop": None}

    def kl(msteps):
        student = get_unlearner("scrub", msteps=msteps, **pure).unlearn(make_original(), task, runtime)
        return distill_kl(predict(student, task.forget, runtime), teacher, 4.0).item()

    assert kl(1) > 10 * kl(-1) + 1e-3


def test_scrub_runs_msteps_plus_one_max_passes_at_the_retain_batch_size(task):
    """The reference's loop test is ``epoch <= msteps``, and it feeds the forget set at the retain batch size."""
    u = get_unlearner("scrub", msteps=2, epochs=5, batch_size=16)
    u.plan = u.resolve(task)
    passes = []
    for epoch in range(5):
        forget_batches = [b for b in u.batches(task, epoch, torch.Generator().manual_seed(0))
                          if b.forget is not None and bool(b.forget.all())]
        passes.append(len(forget_batches))
        assert all(len(b.y) <= 16 for b in forget_batches)
    full = -(-len(task.forget) // 16)
    assert passes == [full, full, full, 0, 0]


def test_neggrad_is_ascent_on_the_forget_set(make_original, task, runtime):
    model = make_original()
    before = forget_confidence(model, task.forget, runtime)
    get_unlearner("neggrad", epochs=1).unlearn(model, task, runtime)
    assert forget_confidence(model, task.forget, runtime) < before


def test_neggrad_plus_pairs_every_retain_batch_with_a_forget_batch(task):
    u = get_unlearner("neggrad_plus", batch_size=128)
    batches = list(u.batches(task, 0, torch.Generator().manual_seed(0)))
    assert len(batches) == -(-len(task.retain) // 128)  # one pass over retain
    for b in batches:
        assert b.forget is not None and b.forget.any() and (~b.forget).any()
    assert sum(int((~b.forget).sum()) for b in batches) == len(task.retain)


def test_salun_changes_only_the_top_k_salient_entries(make_original, task, runtime):
    k = 0.3
    mask = saliency_mask(make_original(), task.forget, runtime, k=k, batch_size=128)
    model = make_original()
    before = snapshot(model)
    get_unlearner("salun", k=k, epochs=1).unlearn(model, task, runtime)
    after = snapshot(model)
    for name, m in mask.items():
        assert torch.equal(before[name][~m], after[name][~m]), f"unmasked entries of {name} moved"
    frac = fraction_changed(before, after)
    assert 0.5 * k <= frac <= k + 1e-6
    # standard SalUn: the mask holds the LARGEST |grad| entries (RUM's code picked the smallest)
    from worker.engine.unlearners.masking import gradient_sum

    g = gradient_sum(make_original(), task.forget, runtime, batch_size=128)
    inside = torch.cat([g[n].abs()[m] for n, m in mask.items()])
    outside = torch.cat([g[n].abs()[~m] for n, m in mask.items()])
    assert inside.min() >= outside.max()
    total = sum(m.numel() for m in mask.values())
    assert abs(sum(int(m.sum()) for m in mask.values()) - int(k * total)) == 0


def test_top_fraction_selects_exactly_that_many_entries_even_with_ties():
    scores = {"a": torch.ones(10, 3), "b": torch.zeros(7), "c": torch.tensor([5.0, 5.0, 0.5])}
    mask = top_fraction(scores, 0.5)
    assert sum(int(m.sum()) for m in mask.values()) == int(0.5 * 40)
    assert mask["c"][:2].all()
    # an empty forget set scores 0 everywhere: select nothing rather than an arbitrary half
    assert not any(m.any() for m in top_fraction({"a": torch.zeros(5, 2)}, 0.5).values())


@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_del_resets_about_threshold_of_the_entries(threshold, make_original, task, runtime):
    model = make_original()
    before = snapshot(model)
    u = get_unlearner("del", threshold=threshold, epochs=0, max_retain_drop=None)
    u.unlearn(model, task, runtime)
    assert abs(u.reset_fraction - threshold) < 1e-3
    assert abs(fraction_changed(before, snapshot(model)) - threshold) < 0.01
    for k, v in before.items():  # BN running statistics are kept
        if "running_" in k:
            assert torch.equal(v, model.state_dict()[k])


def test_del_finetunes_only_reset_entries_and_the_whole_head(make_original, task, runtime):
    mask = criticality_mask(make_original(), task.forget, runtime, threshold=0.3, batch_size=128)
    model = make_original()
    before = snapshot(model)
    get_unlearner("del", epochs=1, threshold=0.3, batch_size=128, max_retain_drop=None).unlearn(model, task, runtime)
    after = snapshot(model)
    head = head_parameter_names(model)
    assert head == {"fc.weight", "fc.bias"}
    for name, m in mask.items():
        if name in head:
            assert (before[name] != after[name]).float().mean() > 0.99
        else:
            assert torch.equal(before[name][~m], after[name][~m]), f"{name} moved outside the DEL mask"


def test_del_channel_scores_are_constant_per_output_channel(make_original, task, runtime):
    scores = criticality_scores(make_original(), task.forget, runtime, batch_size=128)
    for name, s in scores.items():
        assert torch.isfinite(s).all(), name
        if s.ndim > 1:
            rows = s.reshape(s.shape[0], -1)
            assert torch.equal(rows, rows[:, :1].expand_as(rows)), name


def test_del_guards_k_zero_for_fewer_than_ten_output_channels():
    score = torch.rand(6, 20)  # int(0.1 * 6) = 0 in the reference: mean of nothing = NaN
    c = channel_scores(score)
    assert torch.isfinite(c).all()
    assert torch.allclose(c[:, 0], score.max(dim=1).values)  # guarded k = 1: the row max
    wide = channel_scores(torch.rand(200, 3))  # k = 20 > fan_in 3: capped at fan_in
    assert torch.isfinite(wide).all()


@pytest.mark.parametrize(("arch", "kwargs"), [("mlp", {"hidden": [8]}), ("lenet5", {})])
def test_del_on_tiny_layers(arch, kwargs, digits, task, runtime):
    torch.manual_seed(0)
    spec = architectures.default_spec(arch, digits.input_shape, digits.num_classes, **kwargs)
    model = architectures.build(spec)
    scores = criticality_scores(model, task.forget, runtime, batch_size=128)
    assert all(torch.isfinite(s).all() for s in scores.values())
    before = snapshot(model)
    u = get_unlearner("del", epochs=1, threshold=0.3, max_retain_drop=None)
    out = u.unlearn(model, task, runtime)
    assert abs(u.reset_fraction - 0.3) < 1e-2
    assert all(torch.isfinite(p).all() for p in out.parameters())
    assert fraction_changed(before, snapshot(out)) > 0


def test_iau_moves_each_parameter_by_at_most_lr(make_original, task, runtime):
    lr = 1e-3
    model = make_original()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    get_unlearner("iau", lr=lr, max_retain_drop=None).unlearn(model, task, runtime)
    steps = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in model.named_parameters()])
    assert steps.max() <= lr * (1 + 1e-4)
    assert steps.max() >= 0.9 * lr  # a sign-like step: most coordinates move by ~lr
    assert (steps > 0.5 * lr).float().mean() > 0.5


def test_iau_gradient_is_retain_minus_forget(make_original, task, runtime):
    """A tiny lr makes IAU a signed probe of g = ∇CE_R − ∇CE_F: the forget loss must go up."""
    model = make_original()
    before = forget_confidence(model, task.forget, runtime)
    get_unlearner("iau", lr=1e-4, steps=2).unlearn(model, task, runtime)
    assert forget_confidence(model, task.forget, runtime) < before


def test_random_labels():
    y = torch.arange(10).repeat(50)
    wrong = random_labels(y, 10, "wrong", seed=1)
    assert (wrong != y).all() and wrong.min() >= 0 and wrong.max() <= 9
    anyl = random_labels(y, 10, "any", seed=1)
    assert set(anyl.tolist()) == set(range(10)) and (anyl == y).any()
    assert torch.equal(anyl, random_labels(y, 10, "any", seed=1))


def test_random_label_relabels_forget_rows_only(task):
    u = get_unlearner("random_label", label_mode="wrong", batch_size=64)
    u.prepare(None, task, None)
    n_forget = 0
    true_y = torch.cat([task.forget.y, task.retain.y])
    for b in u.batches(task, 0, torch.Generator().manual_seed(0)):
        assert torch.equal(b.forget, b.pos < len(task.forget))
        assert (b.y[b.forget] != true_y[b.pos[b.forget]]).all()
        assert torch.equal(b.y[~b.forget], true_y[b.pos[~b.forget]])
        n_forget += int(b.forget.sum())
    assert n_forget == len(task.forget)
    u.finish()


def test_l1_alpha_decays_linearly_and_clamps():
    u = L1Sparse(alpha=1.0, no_l1_fraction=0.2)
    assert u.alpha_at(0.0) == 1.0
    assert u.alpha_at(0.4) == pytest.approx(0.5)
    assert u.alpha_at(0.8) == 0.0 and u.alpha_at(0.9) == 0.0
    assert L1Sparse(alpha=1.0, no_l1_fraction=1.0).alpha_at(0.0) == 0.0


def test_l1_penalty_shrinks_the_weights(make_original, task, runtime):
    def l1(m):
        return sum(p.abs().sum().item() for p in m.parameters())

    plain = get_unlearner("l1_sparse", alpha=0.0, epochs=1).unlearn(make_original(), task, runtime)
    sparse = get_unlearner("l1_sparse", alpha=3e-3, epochs=1).unlearn(make_original(), task, runtime)
    assert l1(sparse) < 0.98 * l1(plain)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_hyperparameter_is_named(name):
    with pytest.raises(ConfigError, match="learning_rate_typo"):
        get_unlearner(name, learning_rate_typo=0.1)


@pytest.mark.parametrize(("name", "field", "value"), [
    ("neggrad_plus", "alpha", 1.5), ("salun", "k", 2), ("del", "threshold", -0.1), ("iau", "steps", 0),
    ("iau", "steps", 1.5), ("l1_sparse", "alpha", -1.0), ("scrub", "temperature", 0),
    ("random_label", "label_mode", "shuffled"), ("neggrad", "lr", -1.0),
])
def test_bad_hyperparameter_values_are_named(name, field, value):
    with pytest.raises(ConfigError, match=f"hyperparameters.{field}"):
        get_unlearner(name, **{field: value})


@pytest.mark.parametrize("name", METHODS)
def test_cancellation(name, make_original, task, runtime):
    ctx = RunContext(cancel_requested=lambda: True)
    with pytest.raises(Cancelled):
        get_unlearner(name, **fast(name)).unlearn(make_original(), task, runtime, ctx)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"none"}))
def test_cancellation_mid_run(name, make_original, task, runtime):
    """Cancellation is polled inside the work (per batch), not only at the start or at progress reports."""
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        get_unlearner(name, **fast(name)).unlearn(make_original(), task, runtime, RunContext(cancel_requested=cancel))
    assert len(polls) == 4


@pytest.mark.parametrize("name", METHODS)
def test_progress_increases_to_one(name, make_original, task, runtime):
    seen = []
    ctx = RunContext(progress=lambda stage, f: seen.append(f), stage="unlearning")
    get_unlearner(name, **fast(name)).unlearn(make_original(), task, runtime, ctx)
    assert seen, "no progress reported"
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False)), seen
    assert seen[-1] == pytest.approx(1.0)


def test_masked_methods_keep_no_state_after_a_run(make_original, task, runtime):
    for name in ("salun", "del", "scrub", "random_label"):
        u = get_unlearner(name, epochs=1)
        u.unlearn(make_original(), task, runtime)
        assert not getattr(u, "_masked", [])
        assert getattr(u, "_teacher", None) is None and getattr(u, "_view", None) is None


def test_same_seed_same_result(make_original, task, runtime):
    a = get_unlearner("salun", epochs=1).unlearn(make_original(), task, runtime)
    b = get_unlearner("salun", epochs=1).unlearn(make_original(), task, runtime)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_masked_loop_keeps_unmasked_entries_with_weight_decay_and_adam(make_original, task, runtime):
    model = make_original()
    before = snapshot(model)
    get_unlearner("salun", epochs=1, weight_decay=5e-3, optimizer="adam", lr=1e-3, k=0.2).unlearn(
        model, task, runtime)
    assert fraction_changed(before, snapshot(model)) <= 0.2 + 1e-6


def test_head_is_the_last_linear_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
            self.classifier = nn.Linear(16, 10)

        def forward(self, x):
            return self.classifier(self.body(x))

    assert head_parameter_names(Net()) == {"classifier.weight", "classifier.bias"}
    assert head_parameter_names(nn.Sequential(nn.Conv2d(1, 4, 3))) == set()


@pytest.mark.parametrize(("arch", "kwargs"), [("mlp", {}), ("lenet5", {}), ("resnet18", {"width": 4})])
def test_every_method_runs_on_every_builtin_architecture(arch, kwargs, digits, runtime):
    forget, retain = digits.view("train", torch.arange(20)), digits.view("train", torch.arange(20, 220))
    small = UnlearningTask(forget, retain, digits.num_classes, seed=0)
    spec = architectures.default_spec(arch, digits.input_shape, digits.num_classes, **kwargs)
    torch.manual_seed(0)
    state = architectures.build(spec).state_dict()
    for name in METHODS:
        model = architectures.build(spec)
        model.load_state_dict(state)
        hp = {} if name in ("iau", "none") else {"epochs": 1}
        out = get_unlearner(name, **hp).unlearn(model, small, runtime)
        assert all(torch.isfinite(p).all() for p in out.parameters()), (arch, name)
        assert torch.isfinite(predict(out, forget, runtime)).all(), (arch, name)


def test_retain_guard_stops_a_runaway_ascent_and_restores_a_good_state(make_original, task, runtime):
    """NegGrad at a reckless learning rate wrecks the model without the guard and not with it."""
    reckless = {"lr": 0.5, "epochs": 3, "loss_bound": 50.0, "batch_size": 16}
    before = accuracy(make_original(), task.retain, runtime)
    unguarded = get_unlearner("neggrad", max_retain_drop=None, **reckless)
    wrecked = accuracy(unguarded.unlearn(make_original(), task, runtime), task.retain, runtime)
    assert wrecked < before - 0.3
    assert unguarded.last_run["guard"] == {"outcome": "off"}

    guarded = get_unlearner("neggrad", max_retain_drop=0.05, retries=0, **reckless)
    kept = accuracy(guarded.unlearn(make_original(), task, runtime), task.retain, runtime)
    guard = guarded.last_run["guard"]
    assert guard["outcome"] in ("restored", "input")
    assert kept >= before - 0.08  # the probe is 256 retain rows: allow its sampling error
    assert guard["retain_probe_reference"] - guard["retain_probe_after"] <= 0.05


# A setting of each method that wrecks the digits model when nothing holds it.
WRECKING = {
    "finetune": {"lr": 3.0, "epochs": 2, "momentum": 0.0},
    "neggrad": {"lr": 0.5, "epochs": 3, "loss_bound": 50.0, "batch_size": 16},
    "neggrad_plus": {"lr": 1.0, "epochs": 2, "alpha": 0.1, "loss_bound": 50.0},
    "l1_sparse": {"lr": 0.5, "epochs": 2, "alpha": 0.5},
    "random_label": {"lr": 2.0, "epochs": 2},
    "salun": {"lr": 2.0, "epochs": 2, "k": 1.0},
    "scrub": {"lr": 2.0, "epochs": 3, "msteps": 3},
    "del": {"lr": 1e-4, "epochs": 1, "threshold": 0.5},
    "iau": {"step_size": 1.0, "backtrack": 0},
}


@pytest.mark.parametrize("name", sorted(WRECKING))
def test_every_method_comes_back_within_the_guard(name, make_original, task, runtime):
    """A setting that wrecks the model without the guard comes back within the limit with it, and
    the run says how (the last state within it, or the input model)."""
    before = accuracy(make_original(), task.retain, runtime)
    unguarded = get_unlearner(name, max_retain_drop=None, **WRECKING[name])
    assert accuracy(unguarded.unlearn(make_original(), task, runtime), task.retain, runtime) < before - 0.1
    hp = {**WRECKING[name], **({} if name == "iau" else {"retries": 0})}  # the floor alone, no retry
    guarded = get_unlearner(name, max_retain_drop=0.03, **hp)
    kept = accuracy(guarded.unlearn(make_original(), task, runtime), task.retain, runtime)
    assert guarded.last_run["guard"]["outcome"] in ("restored", "input"), guarded.last_run["guard"]
    assert kept >= before - 0.06  # 0.03 on a 256-row probe, plus its sampling error on the whole set


def test_a_run_that_kept_nothing_is_retried_at_a_lower_rate(make_original, task, runtime):
    """Too hot for this model: the first run keeps nothing within the guard, a retry at a quarter of
    the rate (or a sixteenth) ends within it, and the run reports every rate it tried."""
    u = get_unlearner("finetune", lr=3.0, epochs=2, momentum=0.0, max_retain_drop=0.03)
    before = accuracy(make_original(), task.retain, runtime)
    kept = accuracy(u.unlearn(make_original(), task, runtime), task.retain, runtime)
    run = u.last_run
    assert run["attempts"] >= 2 and run["lr_tried"][:2] == [3.0, 0.75]
    assert run["guard"]["outcome"] in ("within", "restored") and kept >= before - 0.06
    assert run["steps_total"] > run["steps_done"]  # the cost of every attempt is counted


def test_a_retry_runs_only_if_the_job_can_pay_for_it(make_original, task, runtime):
    """``task.max_steps`` (the job's cost cap): a run of 20 steps that keeps nothing within the
    guard is retried with the plan's steps when the cap leaves room for them, with fewer when it
    leaves at least a quarter of them, and not at all (saying why) when it leaves less."""
    import dataclasses

    hot = {"lr": 3.0, "steps": 20, "momentum": 0.0, "max_retain_drop": 0.03}
    for max_steps, steps_tried in ((40, [20, 20]), (30, [20, 10])):
        u = get_unlearner("finetune", **hot)
        u.unlearn(make_original(), dataclasses.replace(task, max_steps=max_steps), runtime)
        run = u.last_run
        assert run["lr_tried"] == [3.0, 0.75] and run["steps_tried"] == steps_tried, run
        assert run["steps_total"] == sum(steps_tried)

    capped = get_unlearner("finetune", **hot)
    capped.unlearn(make_original(), dataclasses.replace(task, max_steps=24), runtime)
    run = capped.last_run
    assert run["attempts"] == 1 and run["steps_total"] == 20 and run["guard"]["outcome"] == "input"
    assert "needs 5 more steps at least" in run["retry_skipped"] and "leaves 4" in run["retry_skipped"]


def test_guard_keeps_a_transient_dip_that_recovers(make_original, task, runtime):
    """A check outside the limit is not a reason to stop or to restore when the end is within it."""
    from worker.engine.unlearners.base import RetainGuard

    model = make_original()
    guard = RetainGuard(model, task.retain, runtime, 0.03, patience=4)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)  # a dip far below the limit
    assert guard() is True and guard.outside == 1  # outside, but the loop goes on
    model.load_state_dict(good)  # ...and recovers
    with torch.no_grad():
        model.fc.bias.add_(1e-4)  # a state that is not the input
    report = guard.finish()
    assert report["outcome"] == "within" and report["checks_outside"] == 1
    assert torch.equal(model.fc.bias, good["fc.bias"] + 1e-4)  # the end state was kept


def test_guard_stops_after_patience_and_falls_back_to_the_input(make_original, task, runtime):
    from worker.engine.unlearners.base import RetainGuard

    model = make_original()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    guard = RetainGuard(model, task.retain, runtime, 0.03, patience=2)
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)
    assert guard() is True  # first check outside: go on
    assert guard() is False  # second in a row: persistent damage, stop
    assert guard.finish()["outcome"] == "input"
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_guard_is_on_for_every_method_and_validated():
    with pytest.raises(ConfigError, match="hyperparameters.max_retain_drop"):
        get_unlearner("salun", max_retain_drop=2)
    for name in METHODS:
        if name not in ("none", "retrain"):
            assert get_unlearner(name).hp["max_retain_drop"] == 0.03, name


def test_iau_step_scales_with_the_weights(make_original, task, runtime):
    """The relative step moves each tensor by step_size × its own norm, whatever the model's scale."""
    from worker.engine.unlearners.masking import trainable

    def displacement(scale):
        model = make_original()
        with torch.no_grad():
            for _, p in trainable(model):
                p.mul_(scale)
        before = {n: p.detach().clone() for n, p in trainable(model)}
        get_unlearner("iau", step_size=0.01, max_retain_drop=None).unlearn(model, task, runtime)
        return {n: ((p.detach() - before[n]).norm() / before[n].norm()).item() for n, p in trainable(model)
                if before[n].norm() > 0}

    for rel in (displacement(1.0), displacement(2.0)):
        assert all(abs(v - 0.01) < 1e-3 for v in rel.values()), rel


def test_iau_backtracks_into_the_guard(make_original, task, runtime):
    u = get_unlearner("iau", step_size=0.5, backtrack=8, max_retain_drop=0.03)
    before = accuracy(make_original(), task.retain, runtime)
    kept = accuracy(u.unlearn(make_original(), task, runtime), task.retain, runtime)
    sizes = u.last_run["step_sizes"]
    assert sizes[0] < 0.5 and u.last_run["guard"]["outcome"] == "within"
    assert kept >= before - 0.06


def test_random_label_redraws_labels_every_epoch(task):
    u = get_unlearner("random_label")
    first, second = u.relabeled_forget(task, 0).y, u.relabeled_forget(task, 1).y
    assert not torch.equal(first, second)
    assert torch.equal(first, u.relabeled_forget(task, 0).y)  # seeded


def test_salun_passes_forget_then_retain(task):
    u = get_unlearner("salun", batch_size=32)
    u.plan = u.resolve(task)
    flags = [bool(b.forget.all()) if b.forget is not None else False
             for b in u.batches(task, 0, torch.Generator().manual_seed(0))]
    n_forget = -(-len(task.forget) // 32)
    assert flags[:n_forget] == [True] * n_forget and not any(flags[n_forget:])
    assert len(flags) == n_forget + -(-len(task.retain) // 32)


def test_bounded_ascent_stops_pushing_examples_past_the_bound():
    from worker.engine.unlearners.neggrad import bounded_ce

    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])  # the first is confidently right, the second confidently wrong
    loss = bounded_ce(logits, y, None)  # bound ln 3
    loss.backward()
    assert loss.item() == pytest.approx((torch.nn.functional.cross_entropy(logits[:1], y[:1]).item()
                                         + torch.log(torch.tensor(3.0)).item()) / 2, rel=1e-5)
    assert logits.grad[1].abs().sum() == 0  # past the bound: no gradient
    assert logits.grad[0].abs().sum() > 0
    with pytest.raises(ConfigError, match="hyperparameters.loss_bound"):
        get_unlearner("neggrad", loss_bound=-1)
