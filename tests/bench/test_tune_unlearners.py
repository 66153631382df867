"""bench.tune_unlearners --quick end to end on digits (one seed, a 2×2 grid, a 5-epoch original)."""

from __future__ import annotations

import json

from bench import tune_unlearners


def test_quick_finetune(tmp_path, capsys):
    out, txt = tmp_path / "tuning.json", tmp_path / "tuning.txt"
    rc = tune_unlearners.main(["--quick", "--methods", "finetune", "--threads", "1",
                               "--data", str(tmp_path / "digits.npz"), "--json", str(out), "--table", str(txt)])
    assert rc == 0
    assert (tmp_path / "digits.npz").exists()  # written because it was missing
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len([r for r in rows if r["grid"]]) == 4  # the 2×2 grid
    for r in rows:
        assert r["method"] == "finetune"
        assert {"budget", "lr_scale", "score", "guard"} <= set(r)
        assert len(r["guard"]) == 1 and r["guard"][0] in ("within", "restored", "input")
        assert 0 <= r["score"] <= 1
    assert sum(r["default"] for r in rows) == 1
    table = txt.read_text()
    assert "finetune" in table and "current default" in table
    assert "finetune" in capsys.readouterr().out
