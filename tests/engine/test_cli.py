"""``unlearnd train`` end to end: files a registration accepts, clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from service.cli import main
from worker.engine import architectures as A
from worker.engine.data import load_dataset
from worker.engine.events import read_events
from worker.engine.recipe import Recipe
from worker.engine.runtime import Runtime
from worker.engine.training import accuracy


def test_train_writes_registration_artifacts(digits_raw, tmp_path, capsys):
    np.savez(tmp_path / "digits.npz", **digits_raw)
    out = tmp_path / "model"
    rc = main(["train", "--data", str(tmp_path / "digits.npz"), "--arch", "small_cnn", "--kwargs", '{"width": 8}',
               "--epochs", "3", "--mean", "0.5", "--std", "0.5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    spec = json.loads((out / "architecture.json").read_text())
    assert spec == {"name": "small_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 8}}
    model = A.load_model(spec, out / "weights.safetensors")
    data = load_dataset(tmp_path / "digits.npz", [0.5], [0.5])
    acc = accuracy(model, data.view("test"), Runtime.auto("cpu"))
    reported = json.loads((out / "training.json").read_text())["test_accuracy"]
    assert acc == reported and acc > 0.7
    events = read_events(out / "events.npz", ids_train=data.ids)
    assert (events["count"] == 3).all()
    # recipe.json: what registration takes as `recipe`, every field given (nothing inferred)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe == {"n_train": len(data.train), "epochs": 3, "batch_size": 128, "lr": 0.05, "optimizer": "sgd",
                      "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
    parsed = Recipe.from_dict(recipe, n_train=len(data.train))
    assert parsed.inferred == () and parsed.epochs == 3


def test_train_rejects_bad_input(digits_raw, tmp_path, capsys):
    np.savez(tmp_path / "digits.npz", **digits_raw)
    base = ["train", "--data", str(tmp_path / "digits.npz"), "--out", str(tmp_path / "m"), "--epochs", "1"]
    assert main(base + ["--arch", "nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
    assert main(base + ["--arch", "mlp", "--kwargs", "[1]"]) == 2
    assert "--kwargs: must be a JSON object" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", x_train=digits_raw["x_train"])
    assert main(["train", "--data", str(tmp_path / "bad.npz"), "--arch", "mlp", "--out", str(tmp_path / "m")]) == 2
    assert "missing required key(s)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cli_help_does_not_import_torch():
    code = "import sys; from service.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
