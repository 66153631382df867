"""Shared fixtures: scikit-learn's digits (real data, 1,797 8×8 images) and a small trained CNN."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
import uuid

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

# Every process a test starts inherits this mark in its environment (the service fixtures keep the
# environment, minus UNLEARND_* settings). A test that leaves a marked process behind fails, and
# the process is killed: the suite must leave nothing running.
PROCESS_MARK = "PYTEST_UNLEARND_RUN"
os.environ[PROCESS_MARK] = uuid.uuid4().hex
_MARK = f"{PROCESS_MARK}={os.environ[PROCESS_MARK]}".encode()


def marked_processes() -> dict[int, str]:
    """pid → command line of every live process (not this one) carrying this run's mark."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if _MARK not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def _reap(pids) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = set(marked_processes())
    yield
    deadline = time.monotonic() + 15  # a worker told to stop may take a moment to finish its task
    while (left := {pid: cmd for pid, cmd in marked_processes().items() if pid not in before}):
        if time.monotonic() > deadline:
            _reap(left)
            pytest.fail(f"the test left {len(left)} process(es) running (killed now): "
                        + "; ".join(f"{pid}: {cmd[:160]}" for pid, cmd in left.items()), pytrace=False)
        time.sleep(0.2)


def pytest_sessionfinish(session, exitstatus):
    left = marked_processes()
    if left:
        _reap(left)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nerror: the test session left {len(left)} process(es) running (killed now): "
              + "; ".join(f"{pid}: {cmd[:160]}" for pid, cmd in left.items()))


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
