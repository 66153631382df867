"""bench.rate_stability: the ladder's rows come from the service's guard, and a rate far past a
model's own tells apart from a gentle one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import rate_stability
from bench.datasets import write
from worker.engine.sample_data import digits_arrays


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    write(digits_arrays(0), path)
    return path


def test_a_rate_far_past_the_models_own_is_outside_and_a_gentle_one_within(digits_file, tmp_path):
    out = tmp_path / "rows.json"
    # 40 × the original's rate knocks a small CNN off its minimum within 9 steps; 0.01 × does not
    rc = rate_stability.main(["--data", str(digits_file), "--mean", "0.5", "--std", "0.5", "--epochs", "4",
                              "--seeds", "1", "--fractions", "40", "0.01", "--steps", "18",
                              "--arch-kwargs", '{"width": 8}', "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    hot, gentle = sorted(doc["rows"], key=lambda r: -r["fraction"])
    assert (hot["within"], gentle["within"]) == (False, True)
    assert hot["retain_probe_worst"] < hot["retain_probe_reference"] - 0.03
    assert hot["checks"] == gentle["checks"] == 3  # two during the run (every 9 steps) and the final one
    assert doc["stable_fraction"] == [0.01]


def test_stable_fraction_needs_every_smaller_rate_within():
    rows = [{"fraction": 1.0, "within": False}, {"fraction": 0.5, "within": True},
            {"fraction": 0.25, "within": False}, {"fraction": 0.1, "within": True}]
    assert rate_stability.stable_fraction(rows) == 0.1
    assert rate_stability.stable_fraction([{"fraction": 0.1, "within": False}]) == 0.0
    assert rate_stability.stable_fraction([{"fraction": 1.0, "within": True}, {"fraction": 0.5, "within": True}]) == 1.0


def test_bad_fractions_are_refused(digits_file, capsys):
    with pytest.raises(SystemExit) as exc:
        rate_stability.main(["--data", str(digits_file), "--fractions", "0.5", "0"])
    assert exc.value.code == 2 and "--fractions" in capsys.readouterr().err
