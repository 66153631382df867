"""The API against its own OpenAPI document: schemathesis generates valid and invalid requests for
every operation from the document and runs all its checks on the answers (no server error, every
status, content type, header and body documented, valid input accepted, invalid input refused,
methods and auth as declared). Deterministic and bounded so it fits CI; bench/fuzz.py runs the long
version. The service holds a dataset and a ready model, so that operations on them do real work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.core.repo.models import finish_registration
from tests.servicekit import make_settings, register_dataset, register_model, running_service

CONFIG = Path(__file__).with_name("schemathesis.toml")


def schemathesis_run(url: str, key: str, *, max_examples: int, seed: int, workdir: Path,
                     timeout: float) -> subprocess.CompletedProcess:
    st = Path(sys.executable).with_name("st")
    return subprocess.run(
        [str(st), "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
         "--max-examples", str(max_examples), "--seed", str(seed), "--generation-deterministic",
         "-H", f"Authorization: Bearer {key}", "--workers", "1", "--no-color"],
        cwd=workdir, capture_output=True, text=True, timeout=timeout)


def test_the_api_conforms_to_its_openapi_document(tmp_path, user_files):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with running_service(settings) as service, service.client() as c:
        dataset_id = register_dataset(c, user_files)["id"]
        model = register_model(c, user_files, dataset_id).json()
        with service.db.transaction() as s:  # no worker here: version 1 ready as the registration task makes it
            finish_registration(s, _version_id(s, model["id"]), ok=True, reason=None, metrics={})
        out = schemathesis_run(service.url, service.key(), max_examples=12, seed=1, workdir=tmp_path, timeout=900)
    report = out.stdout[-12000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    assert "Tested:" in out.stdout, report


def _version_id(session, model_id: int) -> int:
    from sqlalchemy import select

    from service.core.models import ModelVersion

    return session.scalar(select(ModelVersion.id).where(ModelVersion.model_id == model_id))
