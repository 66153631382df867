"""bench.unlearning end to end on digits (tiny), and its CUDA-less failure paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import unlearning
from bench.datasets import write
from worker.engine.sample_data import digits_arrays

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    write(digits_arrays(0), path)
    return path


def test_poisoned_smoke(digits_file, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = unlearning.main(["--data", str(digits_file), "--mean", "0.5", "--std", "0.5", "--scenario", "poisoned",
                          "--methods", "finetune", "--seeds", "1", "--epochs", "3", "--arch-kwargs",
                          '{"width": 8}', "--threads", "1", "--json", str(out), "--device", "cpu"])
    assert rc == 0
    rows = json.loads(out.read_text())
    methods = {(r["method"], r["rum"]) for r in rows}
    assert methods == {("original", False), ("retrain", False), ("retrain_other", False), ("finetune", False),
                       ("finetune", True), ("rum_default", True), ("corrective", False)}
    fix = next(r for r in rows if r["method"] == "corrective")  # what the service runs for reason=poisoned
    assert fix["config"]["method"] == "rum" and fix["cost_share"] > 0
    for r in rows:
        assert r["scenario"] == "poisoned"
        assert "test_drop" in r and "asr" in r
        assert r["asr_original"] == next(x["asr"] for x in rows if x["method"] == "original")
        assert r["recipe"]["n_train"] == 1197 and r["recipe"]["epochs"] == 3
        assert r["forget_size"] == round(0.03 * 1197)
    orig = next(r for r in rows if r["method"] == "original")
    ref = next(r for r in rows if r["method"] == "retrain")
    assert orig["test_drop"] == 0.0
    assert ref["test_drop"] == pytest.approx(orig["acc_test"] - ref["acc_test"])
    other = next(r for r in rows if r["method"] == "retrain_other")  # the noise floor: another seed
    assert 0 < other["tow"] < 1 and other["seconds"] > 0
    printed = capsys.readouterr().out
    head = next(line for line in printed.splitlines() if line.startswith("method"))
    assert "test_drop" in head and "ASR" in head
    assert "original train accuracy" in printed
    assert "# corrective (a request's reason says the labels are wrong): random_label" in printed
    assert "UNDER-FIT ORIGINAL" in printed  # 3 epochs of a width-8 CNN do not memorize digits


def test_forget_alias_and_table_without_asr(digits_file, tmp_path, capsys):
    out = tmp_path / "rows.json"
    table = tmp_path / "table.txt"
    rc = unlearning.main(["--data", str(digits_file), "--mean", "0.5", "--std", "0.5", "--forget", "random",
                          "--methods", "none", "--seeds", "1", "--epochs", "1", "--arch", "mlp", "--threads", "1",
                          "--json", str(out), "--table", str(table), "--device", "cpu", "--forget-size", "30"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["scenario"] for r in rows} == {"random"} and all("asr" not in r for r in rows)
    head = next(line for line in table.read_text().splitlines() if line.startswith("method"))
    assert "test_drop" in head and "ASR" not in head
    assert table.read_text().splitlines()[-1].startswith("# per-bin sizes")
    # the CPU's vector path is in the header: the same seeds give other models on another one
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"device=cpu ({capability}) threads=1" in table.read_text() and capability


def test_table_puts_default_last_and_lists_skipped():
    base = {"tow": 1.0, "tow_mia": 1.0, "acc_forget": 1.0, "acc_retain": 1.0, "acc_test": 1.0, "test_drop": 0.0,
            "mia": 0.5, "seconds": 1.0, "share": 0.1}
    rows = [{"method": "rum_default", "rum": True, **base}, {"method": "original", "rum": False, **base},
            {"method": "scrub", "rum": False, "skipped": "time budget"}]
    text = unlearning.table(rows)
    lines = text.splitlines()
    assert lines[2].startswith("original") and lines[3].startswith("rum_default")
    assert "skipped (--time-budget): scrub (rum=no)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CUDA-less failure path")
def test_device_cuda_without_cuda_exits_2(digits_file, capsys):
    assert unlearning.main(["--data", str(digits_file), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CUDA-less failure path")
def test_gpu_script_fails_fast_without_cuda(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable, "RESULTS": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    assert not list(tmp_path.glob("*.json"))  # nothing was run


def test_policy_rows_run_the_given_policy(digits_file, tmp_path, capsys):
    """``--policy NAME=JSON`` adds a row running that policy (its config in the JSON rows, the
    policy in the header); a bad one is refused before anything is trained."""
    out = tmp_path / "rows.json"
    cand = {"method": "rum", "bins": ["none", "none", {"method": "salun", "hparams": {
        "budget": 0.03, "lr_scale": 0.22, "label_mode": "runner_up"}}]}
    plain = {"method": "finetune", "hparams": {"budget": 0.02}}
    rc = unlearning.main(["--data", str(digits_file), "--mean", "0.5", "--std", "0.5", "--methods", "none",
                          "--seeds", "1", "--epochs", "1", "--arch", "mlp", "--threads", "1", "--device", "cpu",
                          "--forget-size", "30", "--json", str(out),
                          "--policy", "cand=" + json.dumps(cand), "--policy", "ft2=" + json.dumps(plain)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert rows["cand"]["rum"] is True and rows["ft2"]["rum"] is False
    assert rows["cand"]["config"]["bins"][2]["hparams"]["label_mode"] == "runner_up"
    assert rows["ft2"]["config"]["method"] == "finetune"
    assert "# cand (--policy):" in capsys.readouterr().out
    for bad in ("cand", "x={", "rum_default={}", 'x={"method": "nope"}', "none=" + json.dumps(plain)):
        with pytest.raises(SystemExit) as exc:
            unlearning.main(["--data", str(digits_file), "--policy", bad])
        assert exc.value.code == 2
    assert "--policy" in capsys.readouterr().err
