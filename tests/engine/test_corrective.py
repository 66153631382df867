"""Rows with wrong labels (requests whose reason is ``mislabeled`` or ``poisoned``): the runner-up
relabeling (worker/engine/unlearners/random_label.py) and the corrective step of
``run_unlearning`` (worker/engine/rum.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bench import scenarios
from worker.engine import architectures
from worker.engine.errors import ConfigError
from worker.engine.hparams import check_hparams
from worker.engine.rum import (
    CORRECTIVE_INDEX,
    PlainConfig,
    default_corrective_config,
    default_rum_config,
    run_unlearning,
)
from worker.engine.runtime import predict
from worker.engine.training import TrainConfig, accuracy, train_model
from worker.engine.unlearners.random_label import runner_up_labels


def test_runner_up_is_the_best_class_other_than_the_label():
    logits = torch.tensor([[5.0, 3.0, 1.0], [0.0, 2.0, 9.0], [1.0, 1.5, 0.5]])
    y = torch.tensor([0, 2, 0])
    assert runner_up_labels(logits, y).tolist() == [1, 1, 1]
    # the label is never chosen, even when it is the only finite score
    assert runner_up_labels(torch.tensor([[1.0, float("-inf")]]), torch.tensor([0])).tolist() == [1]


def test_runner_up_is_a_label_mode_of_random_label_and_salun():
    assert check_hparams("random_label", {"label_mode": "runner_up"})["label_mode"] == "runner_up"
    assert check_hparams("salun", {"label_mode": "runner_up"})["label_mode"] == "runner_up"
    with pytest.raises(ConfigError, match="hyperparameters.label_mode"):
        check_hparams("random_label", {"label_mode": "nearest"})


@pytest.fixture(scope="module")
def mislabeled(digits, runtime):
    """An original that memorized 5% flipped labels (the forget set), and the scenario."""
    s = scenarios.mislabeled(digits, 0.05, seed=0)
    spec = architectures.default_spec("small_cnn", digits.input_shape, digits.num_classes, width=16)
    model = train_model(architectures.build(spec, seed=0), s.data.view("train"), TrainConfig(epochs=30, seed=0),
                        runtime=runtime)
    return s, spec, {k: v.clone() for k, v in model.state_dict().items()}


def _copy(spec, state):
    m = architectures.build(spec)
    m.load_state_dict(copy.deepcopy(state))
    return m.eval()


def test_corrective_step_pulls_flipped_rows_back_to_their_true_class(mislabeled, runtime):
    s, spec, state = mislabeled
    data, rows = s.data, s.forget_rows
    original = _copy(spec, state)
    forget = data.view("train", rows)
    true_y = torch.tensor(s.info["original_labels"])
    before_wrong = accuracy(original, forget, runtime)
    assert before_wrong > 0.9  # it memorized the wrong labels
    result = run_unlearning(copy.deepcopy(original), data, rows, None, default_rum_config(), runtime,
                            seed=0, corrective_rows=rows)
    # RUM needs no proxy here: every row went to the corrective step
    assert [(st.bin.index, st.bin.level, st.n_forget, st.method) for st in result.steps] == [
        (CORRECTIVE_INDEX, "corrective", len(rows), "random_label")]
    assert result.steps[0].hparams["label_mode"] == "runner_up"
    assert result.config["corrective"] == default_corrective_config().to_dict()  # the result says what ran
    model = result.model.eval()
    pred = predict(model, forget, runtime).argmax(1)
    assert (pred == forget.y.cpu()).float().mean().item() < 0.2  # the wrong labels are gone
    assert (pred == true_y).float().mean().item() > 0.6  # mostly back to what they are
    test = data.view("test")
    assert accuracy(model, test, runtime) >= accuracy(original, test, runtime) - 0.02


def test_corrective_rows_go_first_and_the_rest_through_the_policy(mislabeled, runtime):
    s, spec, state = mislabeled
    data, rows = s.data, s.forget_rows
    g = torch.Generator().manual_seed(1)
    clean = torch.randperm(len(data.train), generator=g)
    clean = clean[~torch.isin(clean, rows)][:20]
    forget = torch.cat([rows[:10], clean])
    proxy = np.linspace(0.0, 1.0, len(data.train))
    outside = rows[10:12]  # corrective rows not in the forget set are ignored
    result = run_unlearning(_copy(spec, state), data, forget, proxy, PlainConfig("finetune", {"budget": 0.01}),
                            runtime, seed=0, corrective_rows=torch.cat([rows[:10], outside]),
                            corrective=PlainConfig("random_label", {"label_mode": "runner_up", "budget": 0.01}))
    assert [st.bin.level for st in result.steps] == ["corrective", "all"]
    assert sorted(result.steps[0].bin.rows.tolist()) == sorted(rows[:10].tolist())
    assert sorted(result.steps[1].bin.rows.tolist()) == sorted(clean.tolist())
    # the corrective step's retain set holds the later rows, as a RUM bin's does
    assert result.steps[0].n_retain == len(data.train) - 10
    assert result.steps[1].n_retain == len(data.train) - 30


def test_no_corrective_rows_leaves_the_policy_alone(mislabeled, runtime, digits):
    s, spec, state = mislabeled
    rows = s.forget_rows[:10]
    result = run_unlearning(_copy(spec, state), s.data, rows, None, PlainConfig("finetune", {"budget": 0.01}),
                            runtime, corrective_rows=[])
    assert [st.bin.level for st in result.steps] == ["all"]
    assert "corrective" not in result.config
    with pytest.raises(ConfigError, match="corrective_rows"):
        run_unlearning(_copy(spec, state), s.data, rows, None, PlainConfig("finetune"), runtime,
                       corrective_rows=[len(s.data.train) + 5])


def test_default_corrective_config_is_a_fresh_valid_copy():
    a, b = default_corrective_config(), default_corrective_config()
    a.hparams["budget"] = 0.5
    assert b.hparams["budget"] != 0.5
    assert b.validate().unlearner().hp["label_mode"] == "runner_up"
