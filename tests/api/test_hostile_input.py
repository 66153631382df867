"""Hostile input over real HTTP: what fuzzing and malformed uploads found answering 500, or taking
the API's memory, now answers a 4xx problem naming the field before anything reaches the database,
numpy, the safetensors parser or the JSON parser, and leaves nothing behind."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import numpy as np
import pytest

from service.api.deps import Context
from service.api.problems import Problem
from service.core.settings import Settings
from tests.api.test_bad_input import check_cases, npz_bytes, safetensors_bytes, small_arrays, with_
from tests.servicekit import make_settings, register_dataset, running_service


def npz_with_member(base: dict, key: str, header: dict, body: bytes = b"\0" * 16) -> bytes:
    """A .npz whose member ``key`` has the given .npy header (which may lie about its size)."""
    raw = io.BytesIO()
    np.lib.format.write_array_header_1_0(raw, header)
    buf = io.BytesIO(npz_bytes(**{k: v for k, v in base.items() if k != key}))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(f"{key}.npy", raw.getvalue() + body)
    return buf.getvalue()


def test_hostile_dataset_files(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}", max_dataset_bytes=1 << 20)
    base = small_arrays()
    bomb = with_(base, x_train=np.zeros((4000, 1, 28, 28), np.uint8), y_train=np.arange(4000) % 2, ids_train=None)
    huge = {"descr": "|u1", "fortran_order": False, "shape": (1 << 46,)}
    with running_service(settings) as service, service.client() as c:
        def post(name: str, blob: bytes):
            return lambda: c.post("/v1/datasets", data={"name": name}, files={"file": ("d.npz", blob)})

        bomb_blob = npz_bytes_compressed(bomb)
        assert len(bomb_blob) < 200_000  # compresses well below the limit; inflates to 3 MiB, over it
        check_cases(service, [
            ("label 2^31", post("d", npz_bytes(**with_(base, y_train=np.where(np.arange(40) == 0, 2**31, 1)))),
             422, "file.y_train"),
            ("npy header declaring 2^46 bytes", post("d", npz_with_member(base, "x_train", huge)), 422,
             "file.x_train"),
            ("inflates past the limit", post("d", bomb_blob), 413, "file"),
            ("NUL in an id", post("d", npz_bytes(**with_(base, ids_train=np.array([f"s{i}\0x" for i in range(40)])))),
             422, "file.ids_train"),
            ("control character in an id",
             post("d", npz_bytes(**with_(base, ids_train=np.array([f"s{i}\x1b" for i in range(40)])))),
             422, "file.ids_train"),
            ("NUL in the name", post("a\0b", npz_bytes(**base)), 422, "name"),
            ("C1 control in the name", post("a\x85b", npz_bytes(**base)), 422, "name"),
            ("mean nested 100,000 deep", lambda: c.post(
                "/v1/datasets", data={"name": "d", "mean": "[" * 100_000 + "]" * 100_000},
                files={"file": ("d.npz", npz_bytes(**base))}), 422, "mean"),
        ])


def npz_bytes_compressed(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def test_hostile_model_uploads(tmp_path, user_files):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with running_service(settings) as service, service.client() as c:
        dataset_id = register_dataset(c, user_files)["id"]
        weights = user_files.weights.read_bytes()

        def post(*, architecture: str = '{"name": "small_cnn"}', blob: bytes = weights, **fields):
            return lambda: c.post("/v1/models", data={"name": "m", "dataset_id": str(dataset_id),
                                                      "architecture": architecture, **fields},
                                  files={"weights": ("w.safetensors", blob)})

        entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        check_cases(service, [
            ("architecture nested 100,000 deep", post(architecture="[" * 100_000 + "]" * 100_000), 422,
             "architecture"),
            ("architecture over 64 KiB", post(architecture=json.dumps({"name": "x" * 70_000})), 422, "architecture"),
            ("NUL in an architecture string", post(architecture='{"name": "small\\u0000cnn"}'), 422,
             "architecture.name"),
            ("NUL in a policy key", post(policy='{"meth\\u0000od": "finetune"}'), 422, "policy"),
            ("NUL in a recipe value", post(recipe='{"optimizer": "s\\u0000gd"}'), 422, "recipe.optimizer"),
            ("tensor entry with an extra key and no offsets", post(blob=safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [2], "extra": 1}}, b"\0" * 8)), 422, "weights"),
            ("tensor entry with an extra key", post(blob=safetensors_bytes(
                {"w": {**entry, "extra": 1}}, b"\0" * 8)), 422, "weights"),
            ("booleans as a shape", post(blob=safetensors_bytes(
                {"w": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0")), 422, "weights"),
            ("booleans as offsets", post(blob=safetensors_bytes(
                {"w": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0")), 422, "weights"),
            ("header past 8 MiB", post(blob=safetensors_bytes(
                {"w": entry, "__metadata__": {"pad": "x" * (9 << 20)}}, b"\0" * 8)), 422, "weights"),
            ("epochs 100,000,000", post(policy='{"method": "finetune", "hparams": {"epochs": 100000000}}'), 422,
             "policy.hparams.epochs"),
            ("a budget of 50 retrainings", post(policy='{"method": "neggrad_plus", "hparams": {"budget": 50}}'), 422,
             "policy.hparams.budget"),
            ("lr 1e6 in a RUM bin", post(policy=json.dumps(
                {"method": "rum", "bins": ["none", {"method": "scrub", "hparams": {"lr": 1e6}}, "salun"]})), 422,
             "policy.bins[1].hparams.lr"),
            ("a boolean as a step count", post(policy='{"method": "iau", "hparams": {"steps": true}}'), 422,
             "policy.hparams.steps"),
            ("an unknown hyperparameter", post(policy='{"method": "finetune", "hparams": {"epoch": 3}}'), 422,
             "policy.hparams"),
            ("a corrective step with an unknown method", post(policy='{"corrective": {"method": "forget_all"}}'),
             422, "policy.corrective.method"),
            ("a corrective budget of 50 retrainings", post(policy='{"corrective": {"hparams": {"budget": 50}}}'),
             422, "policy.corrective.hparams.budget"),
            ("erasure as a corrective reason", post(policy='{"corrective": {"reasons": ["erasure"]}}'), 422,
             "policy.corrective.reasons.0"),
            ("70,000 tensors", post(blob=safetensors_bytes(
                {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(70_000)}, b"")),
             422, "weights"),
        ])


def test_uploads_wait_for_a_slot_then_get_503(tmp_path):
    settings = Settings(data_dir=tmp_path, max_concurrent_uploads=1, upload_wait_s=0.2)
    ctx = Context(settings=settings, db=None, store=None, dispatcher=None, metrics=None)
    held, release = threading.Event(), threading.Event()

    def hold():
        with ctx.upload_slot():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        with pytest.raises(Problem) as refused, ctx.upload_slot():
            pass
        assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    finally:
        release.set()
        holder.join(10)
    with ctx.upload_slot():  # freed again
        pass


def test_control_characters_in_paths_queries_and_json_bodies(service, user_files):
    with service.client() as c:
        dataset_id = register_dataset(c, user_files)["id"]
        body = {"sample_ids": ["1", "2\u0000"], "reason": "erasure"}
        check_cases(service, [
            ("NUL in a query parameter", lambda: c.get("/v1/datasets?name=%00"), 422, "name"),
            ("C1 control in a query parameter", lambda: c.get("/v1/models?name=a%C2%85"), 422, "name"),
            ("NUL in a path segment", lambda: c.get(f"/v1/models/1/samples/a%00b?d={dataset_id}"), 422, "path"),
            ("NUL in a sample id", lambda: c.post("/v1/models/1/deletion-requests", json=body), 422,
             "sample_ids[1]"),
            ("escape in a subject reference", lambda: c.post("/v1/models/1/deletion-requests", json={
                "sample_ids": ["1"], "reason": "erasure", "subject_ref": "x\u001by"}), 422, "subject_ref"),
            ("NUL in a JSON key", lambda: c.post("/v1/models/1/deletion-requests", content=b'{"a\\u0000": 1}',
                                                 headers={"content-type": "application/json"}), 422, "body"),
        ])
        # version references: digits int() refuses ('²' is a digit to str.isdigit()) are alias names
        for ref in ("²", "١٢", "9" * 40):
            r = c.get(f"/v1/models/1/versions/{ref}")
            assert r.status_code == 404, (ref, r.text)
        for path in (f"/v1/audit-log/{2**40}/inclusion-proof", f"/v1/deletion-requests/{2**40}/certificate",
                     f"/v1/models/{2**40}", f"/v1/jobs/{2**63 - 1}"):
            r = c.get(path)  # ids past the database's integers: nothing of that id, not a 500
            assert r.status_code == 404, (path, r.text)
        for path in ("/v1/models/1/deletion-requests?status=rejected", "/v1/models/1/jobs?status=bogus"):
            r = c.get(path)  # an unknown status is a mistake, not an empty list
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == "status", (path, r.text)
        # a backslash before u0000 in the text is not a control character: the body goes through
        r = c.post("/v1/models/999/deletion-requests", json={"sample_ids": ["a\\u0000"], "reason": "erasure"})
        assert r.status_code == 404, r.text


def test_json_bodies_nested_too_deep_are_422(service):
    with service.client() as c:
        before = service.snapshot()
        r = c.post("/v1/models/1/deletion-requests", content=b"[" * 100_000 + b"]" * 100_000,
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body", r.text
        assert service.snapshot() == before
