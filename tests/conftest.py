"""Shared fixtures: scikit-learn's digits (real data, 1,797 8×8 images) and a small trained CNN."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from worker.engine import architectures
from worker.engine.data import from_arrays
from worker.engine.datafile import validate_arrays
from worker.engine.events import LearningEvents
from worker.engine.runtime import Runtime
from worker.engine.sample_data import digits_arrays
from worker.engine.training import TrainConfig, train_model

# The service fixtures (real HTTP, databases, brokers and worker processes) for tests/api, core,
# worker and e2e.
pytest_plugins = ["tests.servicekit"]


@pytest.fixture(scope="session")
def runtime() -> Runtime:
    return Runtime.auto("cpu")


@pytest.fixture(scope="session")
def digits_raw() -> dict[str, np.ndarray]:
    return digits_arrays()


@pytest.fixture(scope="session")
def digits(digits_raw):
    return from_arrays(validate_arrays(digits_raw), mean=[0.5], std=[0.5])


@pytest.fixture(scope="session")
def _trained(digits, runtime):
    spec = architectures.default_spec("small_cnn", digits.input_shape, digits.num_classes, width=16)
    events = LearningEvents.empty(len(digits.train))
    torch.manual_seed(0)  # the initialization; train_model seeds the data order itself
    model = train_model(architectures.build(spec), digits.view("train"), TrainConfig(epochs=12, seed=0),
                        runtime=runtime, events=events)
    return spec, {k: v.clone() for k, v in model.state_dict().items()}, events


@pytest.fixture
def original(_trained):
    """A fresh copy of the trained small CNN (test may modify it freely)."""
    spec, state, _ = _trained
    model = architectures.build(spec)
    model.load_state_dict(copy.deepcopy(state))
    return model.eval()


@pytest.fixture(scope="session")
def original_spec(_trained):
    return _trained[0]


@pytest.fixture(scope="session")
def learning_events(_trained) -> LearningEvents:
    return _trained[2]


@pytest.fixture(scope="session")
def forget_rows(digits) -> torch.Tensor:
    """60 random training rows (5% of train), fixed seed."""
    g = torch.Generator().manual_seed(0)
    return torch.randperm(len(digits.train), generator=g)[:60].sort().values
