"""The layers hold by contract (``[tool.importlinter]`` in pyproject.toml, docs/architecture.md):
the contracts pass on the tree, a wrong import between layers breaks them, and fresh processes
of each side load only what their layer allows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _copy_tree(dest: Path) -> None:
    for package in ("service", "worker"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT), "--config", "pyproject.toml", "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("module", "bad_import", "contract"), [
    ("worker/context.py", "import service.api.app", "The worker never imports the API layer"),
    ("service/core/policy.py", "import fastapi", "The core imports neither"),
    ("service/api/deps.py", "import worker.tasks", "The API layer imports neither"),
    ("worker/engine/metrics.py", "import service.core.db", "The engine imports nothing of ours"),
    ("worker/engine/catalog.py", "import torch", "specification modules import no torch"),
])
def test_a_wrong_import_between_layers_breaks_a_contract(tmp_path, module, bad_import, contract):
    _copy_tree(tmp_path)
    clean = _lint(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{bad_import}  # noqa\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert f"{contract}" in broken.stdout and "BROKEN" in broken.stdout


def _modules_loaded(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_a_worker_process_loads_no_web_framework():
    loaded = _modules_loaded("import worker.tasks, worker.calibration, worker.registration, worker.proxy_cache\n"
                             "from worker.tasks import app")
    assert "fastapi" not in loaded and "starlette" not in loaded
    assert "celery" in loaded  # the probe did load the worker


def test_an_api_process_loads_no_torch(tmp_path):
    loaded = _modules_loaded("from service.api.app import create_app\n"
                             "from service.core.settings import Settings\n"
                             f"create_app(Settings(data_dir={str(tmp_path)!r}))")
    assert "torch" not in loaded
    assert "fastapi" in loaded
