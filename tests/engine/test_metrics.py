"""Audit metrics: ToW formulas, the SVC MIA, parameter change and intervals."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine import architectures as A
from worker.engine.metrics import audit, fraction_changed, mean_ci, snapshot, svc_mia_efficacy, tow, tow_mia


def test_tow_formulas():
    r = {"acc_forget": 0.9, "acc_retain": 1.0, "acc_test": 0.95, "mia": 0.2}
    assert tow(r, r) == 1.0 and tow_mia(r, r) == 1.0
    u = {"acc_forget": 0.8, "acc_retain": 0.99, "acc_test": 0.93, "mia": 0.5}
    assert tow(u, r) == pytest.approx(0.9 * 0.99 * 0.98)
    assert tow_mia(u, r) == pytest.approx(0.7 * 0.99 * 0.98)


def test_mia_tells_members_from_non_members(original, digits, runtime):
    """A model that never saw a set gets higher 'non-member' efficacy there than on its training data."""
    train, test = digits.view("train"), digits.view("test")
    # Members: training rows. Non-members: an untrained model's view of anything looks unlike training.
    members = svc_mia_efficacy(original, train.head(600), test, train.head(600), runtime)
    untrained = A.build({"name": "small_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 16}})
    strangers = svc_mia_efficacy(untrained, train.head(600), test, digits.view("holdout"), runtime)
    assert members["confidence"] < 0.5
    assert set(members) == {"confidence", "entropy"}
    assert 0.0 <= strangers["confidence"] <= 1.0


def test_audit_runs_each_row_through_the_model_once_and_scores_as_before(original, digits, forget_rows, runtime,
                                                                         monkeypatch):
    """The attack reuses the audit's forward passes where its shadow sets are whole views: the same
    numbers as the attack predicting them itself, with each row predicted once."""
    from worker.engine import metrics

    forget, retain = digits.forget_retain(forget_rows)
    retain, test = retain.head(300), digits.view("test").head(300)  # shadow sets = the whole views
    alone = svc_mia_efficacy(original, retain, test, forget, runtime)
    rows: list[int] = []
    real = metrics.predict
    monkeypatch.setattr(metrics, "predict", lambda m, v, rt, *a, **k: rows.append(len(v)) or real(m, v, rt, *a, **k))
    m = audit(original, forget, retain, test, runtime)
    assert (m["mia"], m["mia_entropy"]) == (alone["confidence"], alone["entropy"])
    assert sorted(rows) == sorted([len(forget), 300, 300])
    rows.clear()
    whole_retain = digits.forget_retain(forget_rows)[1]
    audit(original, forget, whole_retain, test, runtime)  # retain longer than the shadow set: predicted apart
    assert sorted(rows) == sorted([len(forget), len(whole_retain), 300, 300])


def test_audit_reports_all_fields(original, digits, forget_rows, runtime):
    forget, retain = digits.forget_retain(forget_rows)
    m = audit(original, forget, retain, digits.view("test"), runtime)
    assert set(m) == {"acc_forget", "acc_retain", "acc_test", "mia", "mia_entropy"}
    assert m["acc_retain"] > 0.95 and m["acc_test"] > 0.9
    assert all(0.0 <= v <= 1.0 for v in m.values())
    no_mia = audit(original, forget, retain, digits.view("test"), runtime, mia=False)
    assert "mia" not in no_mia and no_mia["acc_forget"] == m["acc_forget"]


def test_fraction_changed(original):
    before = snapshot(original)
    assert fraction_changed(before, snapshot(original)) == 0.0
    with torch.no_grad():
        original.fc.weight[0].add_(1.0)
    total = sum(v.numel() for k, v in before.items() if v.is_floating_point() and "running_" not in k)
    assert fraction_changed(before, snapshot(original)) == pytest.approx(original.fc.weight.shape[1] / total)


def test_mean_ci():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    m1, h1 = mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(h1)
