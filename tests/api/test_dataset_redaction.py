"""Erasure from the stored dataset file over real HTTP on SQLite and PostgreSQL
(service/core/repo/redaction.py): a training row is blanked in the dataset's file once every model
of the dataset forgot it and no kept version of any of them holds it; until then the sample status
names the models that still hold it. A model registered later cannot be asked to forget a blank
row (409), and its jobs never see one. No worker runs here: versions are published as a job
publishes them (tests/api/test_retention.py ``_publish``)."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from service.core.models import DatasetSample, DeletionRequest, Job, Model
from tests.api.test_delete_resources import _entries, _problem, _register
from tests.api.test_retention import ID, _job_of, _publish
from tests.servicekit import register_dataset
from worker.engine.datafile import read_dataset_file
from worker.pipeline.loading import forget_set


def _file_of(service, dataset_id: int, c) -> tuple[str, dict]:
    sha = c.get(f"/v1/datasets/{dataset_id}").json()["sha256"]
    with np.load(service.store.local_path(sha), allow_pickle=False) as f:
        return sha, {k: f[k] for k in f.files}


def test_a_row_leaves_the_dataset_file_once_every_model_of_the_dataset_forgot_it(service, user_files):
    store = service.store
    with service.client() as c:
        ds = register_dataset(c, user_files)
        a = _register(service, c, user_files, ds["id"], "a", ok=True)
        b = _register(service, c, user_files, ds["id"], "b", ok=True)
        first, original = _file_of(service, ds["id"], c)

        # model a forgot rows 3 and 5 and its version 1 is purged; model b still holds both
        _publish(service, a, [3, 5])
        out = c.post(f"/v1/models/{a}/purge").json()
        assert [p["version"] for p in out["purged"]] == [1] and out["dataset"] is None
        assert _file_of(service, ds["id"], c)[0] == first
        st = c.get(f"/v1/models/{a}/samples/{ID[3]}").json()
        assert st["versions_containing"] == [] and st["dataset_file"] == {
            "dataset_id": ds["id"], "redacted_at": None, "held_by_models": [b]}

        # model b forgot row 3: while a job of model a runs (its worker may read the file), the file waits
        _publish(service, b, [3])
        running = _job_of(service, a, "running", base=2)
        out = c.post(f"/v1/models/{b}/purge").json()
        assert [p["version"] for p in out["purged"]] == [1] and out["dataset"] is None
        assert c.get(f"/v1/models/{b}/samples/{ID[3]}").json()["dataset_file"]["held_by_models"] == []
        with service.db.transaction() as s:
            s.get(Job, running).status = "succeeded"

        out = c.post(f"/v1/models/{b}/purge").json()
        assert out["purged"] == []
        red = out["dataset"]
        assert (red["rows_redacted"], red["rows_redacted_total"], red["trigger"], red["models"]) == (
            1, 1, "request", [a, b])
        second, now = _file_of(service, ds["id"], c)
        assert (red["previous_sha256"], red["sha256"]) == (first, second) and first != second
        assert first in out["blobs_removed"] and not store.exists(first)
        assert red["size_bytes"] == c.get(f"/v1/datasets/{ds['id']}").json()["size_bytes"]

        # row 3 is blank (features and label); every other array and row is as it was
        assert now.keys() == original.keys()
        for k, before in original.items():
            assert now[k].dtype == before.dtype and now[k].shape == before.shape, k
            if k in ("x_train", "y_train"):
                assert not now[k][3].any() and original[k][3].any(), k
                keep = np.arange(len(before)) != 3
                assert np.array_equal(now[k][keep], before[keep]), k
            else:
                assert np.array_equal(now[k], before), k
        read_dataset_file(store.local_path(second))  # still a valid dataset file

        # the sample status says when; row 5 is still held by model b
        st = c.get(f"/v1/models/{a}/samples/{ID[3]}").json()["dataset_file"]
        assert st["redacted_at"] is not None and st["held_by_models"] == []
        assert c.get(f"/v1/models/{a}/samples/{ID[5]}").json()["dataset_file"]["held_by_models"] == [b]
        (e,) = _entries(c, "dataset.redacted")
        assert e["resource"] == f"dataset:{ds['id']}" and e["details"] == red
        assert c.post(f"/v1/models/{b}/purge").json()["dataset"] is None  # nothing new to blank

        # a model that forgot the row takes a request for it as done; one registered since cannot
        r = c.post(f"/v1/models/{a}/deletion-requests", json={"sample_ids": [ID[3]], "reason": "erasure"})
        assert r.status_code == 202 and r.json()["status"] == "completed", r.text
        late = _register(service, c, user_files, ds["id"], "late", ok=True)
        body = {"sample_ids": [ID[4], ID[3]], "reason": "erasure"}
        p = _problem(c.post(f"/v1/models/{late}/deletion-requests", json=body), 409, "erased-samples")
        assert p["erased_sample_ids"] == [ID[3]] and p["errors"][0]["field"] == "sample_ids"
        assert f"/v1/models/{late}/samples/{ID[3]}" in p["detail"]
        with service.db.session() as s:  # refused: nothing written
            assert s.scalar(select(DeletionRequest.id).where(DeletionRequest.model_id == late)) is None
        r = c.post(f"/v1/models/{late}/deletion-requests", json={"sample_ids": [ID[4]], "reason": "erasure"})
        assert r.status_code == 202, r.text

        # the late model holds every other row, so row 5 stays in the file even after model b forgets it
        _publish(service, b, [5], version=3)
        assert c.post(f"/v1/models/{b}/purge").json()["dataset"] is None
        assert c.get(f"/v1/models/{late}/samples/{ID[5]}").json()["dataset_file"]["held_by_models"] == [late]

        # the late model's jobs never train on the blank row: it is excluded with the rows it forgot
        with service.db.transaction() as s:
            job = Job(tenant_id=s.get(Model, late).tenant_id, model_id=late, status="running", policy={},
                      base_version=1)
            s.add(job)
            s.flush()
            s.get(DeletionRequest, r.json()["id"]).job_id = job.id
            fs = forget_set(s, job.id, late)
            assert fs.excluded == [3] and [e.row for e in fs.entries] == [4]
            assert s.scalar(select(DatasetSample.redacted_at).where(
                DatasetSample.dataset_id == ds["id"], DatasetSample.row == 5)) is None
