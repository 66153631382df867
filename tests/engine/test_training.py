"""The shared loop: it learns, is seeded, records learning events, reports and stops on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine import architectures as A
from worker.engine.errors import Cancelled, DatasetError
from worker.engine.events import EVENT_KEYS, LearningEvents, read_events
from worker.engine.runtime import RunContext
from worker.engine.training import TrainConfig, accuracy, gradient_restriction, train_model


def _model(digits, **kw):
    return A.build(A.default_spec("small_cnn", digits.input_shape, digits.num_classes, width=8, **kw))


def test_training_learns_and_is_deterministic(digits, runtime):
    cfg = TrainConfig(epochs=3, seed=3)
    torch.manual_seed(0)
    m1 = train_model(_model(digits), digits.view("train"), cfg, runtime=runtime)
    torch.manual_seed(0)
    m2 = train_model(_model(digits), digits.view("train"), cfg, runtime=runtime)
    assert accuracy(m1, digits.view("test"), runtime) > 0.8  # 10% is chance
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_events_are_recorded_once_per_epoch(digits, runtime, tmp_path):
    events = LearningEvents.empty(len(digits.train))
    train_model(_model(digits), digits.view("train"), TrainConfig(epochs=4), runtime=runtime, events=events)
    assert (events.count == 4).all()
    means = events.means()
    assert set(means) == set(EVENT_KEYS)
    assert ((means["confidence"] > 0) & (means["confidence"] <= 1)).all()
    assert (means["max_conf"] >= means["confidence"] - 1e-6).all()
    assert (means["neg_entropy"] <= 1e-6).all()
    assert set(np.unique(np.round(means["bi_acc"] * 4))) <= {0, 1, 2, 3, 4}

    events.save(tmp_path / "events.npz", digits.ids)
    shuffled = np.random.default_rng(0).permutation(digits.ids)
    back = read_events(tmp_path / "events.npz", ids_train=shuffled)
    pos = {s: i for i, s in enumerate(digits.ids)}
    np.testing.assert_allclose(back["confidence"], means["confidence"][[pos[s] for s in shuffled]])


def test_events_on_a_subset_are_indexed_by_train_row(digits, runtime):
    rows = torch.arange(0, len(digits.train), 2)
    events = LearningEvents.empty(len(digits.train))
    train_model(_model(digits), digits.view("train", rows), TrainConfig(epochs=2), runtime=runtime, events=events)
    assert (events.count[rows.numpy()] == 2).all()
    assert (events.count[1::2] == 0).all()


def test_events_file_errors(digits, tmp_path):
    np.savez(tmp_path / "e.npz", ids=digits.ids, count=np.ones(len(digits.ids)))
    with pytest.raises(DatasetError, match="events: missing key"):
        read_events(tmp_path / "e.npz")
    events = LearningEvents.empty(3)
    events.count[:] = 1
    events.save(tmp_path / "e3.npz", np.array(["a", "b", "c"]))
    with pytest.raises(DatasetError, match=r"events.ids: 1197 training id\(s\) have no events"):
        read_events(tmp_path / "e3.npz", ids_train=digits.ids)


def test_gradient_restriction_penalty(digits, runtime):
    model = _model(digits)
    x, y = digits.train.x[:32], digits.train.y[:32]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    penalized = gradient_restriction(model, loss, 0.5)
    assert penalized.item() > loss.item()
    penalized.backward()  # double backward works
    assert all(p.grad is not None for p in model.parameters())
    m = train_model(_model(digits), digits.view("train"), TrainConfig(epochs=2, gr_alpha=0.005), runtime=runtime)
    assert accuracy(m, digits.view("test"), runtime) > 0.6


def test_progress_and_cancellation(digits, runtime):
    seen = []
    ctx = RunContext(progress=lambda stage, f: seen.append((stage, f)), stage="training").sub(0.5, 1.0)
    train_model(_model(digits), digits.view("train"), TrainConfig(epochs=3), runtime=runtime, ctx=ctx)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[0] > 0.5 and fractions[-1] == pytest.approx(1.0)
    assert {s for s, _ in seen} == {"training"}

    calls = {"n": 0}

    def cancel_after_five():
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(Cancelled, match="training"):
        train_model(_model(digits), digits.view("train"), TrainConfig(epochs=3), runtime=runtime,
                    ctx=RunContext(cancel_requested=cancel_after_five, stage="training"))
    assert calls["n"] == 6  # stopped at the next batch, not at the end of the run
