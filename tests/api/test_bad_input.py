"""Bad input over real HTTP, on SQLite and PostgreSQL: every rejection answers with the right status
and an ``application/problem+json`` document naming the offending field, and leaves no row and no
file behind (no blob, nothing in the artifact store's ``tmp/`` staging directory).

Each test walks a list of cases against one live service and reports every failing case at once.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable

import httpx
import numpy as np

from tests.servicekit import make_settings, register_dataset, register_model, running_service

PROBLEM = "application/problem+json"


# --------------------------------------------------------------------------- helpers


def problem_failure(r: httpx.Response, status: int, field: str | None) -> str | None:
    """Why ``r`` is not the expected problem document (None when it is)."""
    if r.status_code != status:
        return f"status {r.status_code}, expected {status}: {r.text[:300]}"
    if r.headers.get("content-type") != PROBLEM:
        return f"content-type {r.headers.get('content-type')!r}"
    body = r.json()
    if not (body.get("type") and body.get("title") and body.get("status") == status):
        return f"type/title/status missing: {body}"
    fields = [e.get("field") for e in body.get("errors") or []]
    if field is not None and field not in fields:
        return f"field {field!r} not named in errors {fields}: {body}"
    return None


def check_cases(service, cases: list[tuple[str, Callable[[], httpx.Response], int, str | None]]) -> None:
    """Send each case; its answer must be the expected problem, and the snapshot (row counts,
    files under the artifact directory) must not change."""
    failures = []
    for label, send, status, field in cases:
        before = service.snapshot()
        r = send()
        why = problem_failure(r, status, field)
        after = service.snapshot()
        if after != before:
            why = (why + "; " if why else "") + f"left something behind: {before} -> {after}"
        if why:
            failures.append(f"{label}: {why}")
    assert not failures, "\n".join(failures)


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # allow_pickle defaults to True here: an object array is pickled into the file
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def small_arrays(n: int = 40, *, ids: bool = True) -> dict[str, np.ndarray]:
    """A valid little dataset: uint8 (N, 1, 4, 4), two classes."""
    rng = np.random.default_rng(0)
    out = {"x_train": rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8), "y_train": np.arange(n) % 2,
           "x_test": rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8), "y_test": np.arange(10) % 2}
    if ids:
        out["ids_train"] = np.array([f"s{i}" for i in range(n)])
    return out


def with_(base: dict, **changes) -> dict:
    """``base`` with keys replaced; a value of None removes the key."""
    out = dict(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def multipart_stream(boundary: str, fields: dict[str, str], file_field: str, filename: str, chunks: int,
                     chunk: bytes):
    """A multipart body as a generator: httpx sends it chunked, without Content-Length."""
    for k, v in fields.items():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for _ in range(chunks):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


# --------------------------------------------------------------------------- authentication


def test_missing_wrong_or_malformed_keys_are_401(service, user_files):
    key = service.key("acme")
    prefix = key.split("_")[1]
    headers = {
        "no header": None,
        "empty": "",
        "not bearer": "Basic dXNlcjpwYXNz",
        "bearer without key": "Bearer",
        "key without scheme": key,
        "not our format": "Bearer hunter2",
        "unknown prefix": "Bearer ulk_00000000_" + "x" * 32,
        "right prefix, wrong secret": f"Bearer ulk_{prefix}_" + "x" * 32,
    }
    blob = user_files.dataset.read_bytes()
    requests = {
        "list datasets": ("GET", "/v1/datasets", {}),
        "register dataset": ("POST", "/v1/datasets",
                             {"data": {"name": "digits"}, "files": {"file": ("digits.npz", blob)}}),
        "get model": ("GET", "/v1/models/1", {}),
        "put alias": ("PUT", "/v1/models/1/aliases/production", {"json": {"version": 1}}),
        "audit log": ("GET", "/v1/audit-log", {}),
        # authenticated in the route's own transaction (service/api/deps.py: BearerHeader), before the 404
        "deletion request": ("POST", "/v1/models/1/deletion-requests",
                             {"json": {"sample_ids": ["1"], "reason": "erasure"}}),
    }
    cases = []
    with httpx.Client(base_url=service.url, timeout=60) as c:
        for h_label, value in headers.items():
            for r_label, (method, url, kw) in requests.items():
                hdrs = {} if value is None else {"Authorization": value}

                def send(method=method, url=url, kw=kw, hdrs=hdrs):
                    r = c.request(method, url, headers=hdrs, **kw)
                    assert r.headers.get("www-authenticate", "").startswith("Bearer"), (method, url, hdrs)
                    return r

                cases.append((f"{h_label} / {r_label}", send, 401, "Authorization"))
        check_cases(service, cases)
    assert service.counts()["datasets"] == 0


# --------------------------------------------------------------------------- datasets


def test_dataset_rejections(service):
    base = small_arrays()
    good = npz_bytes(**base)
    post_cases = [
        # label, form fields, file (name, bytes) or None, status, field
        ("no name", {}, ("d.npz", good), 422, "name"),
        ("empty name", {"name": ""}, ("d.npz", good), 422, "name"),
        ("blank name", {"name": "   "}, ("d.npz", good), 422, "name"),
        ("control chars in name", {"name": "a\x01b"}, ("d.npz", good), 422, "name"),
        ("name too long", {"name": "n" * 201}, ("d.npz", good), 422, "name"),
        ("no file", {"name": "d"}, None, 422, "file"),
        (".pkl file", {"name": "d"}, ("d.pkl", good), 415, "file"),
        (".pt file", {"name": "d"}, ("d.pt", good), 415, "file"),
        (".csv file", {"name": "d"}, ("d.csv", good), 415, "file"),
        ("pickle named .npz", {"name": "d"}, ("d.npz", pickle.dumps(base)), 415, "file"),
        ("object array (pickled in the npz)", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, x_train=np.array([object()] * 40, dtype=object)))), 422, "file.x_train"),
        ("not a zip", {"name": "d"}, ("d.npz", b"hello, this is not a zip archive"), 422, "file"),
        ("empty file", {"name": "d"}, ("d.npz", b""), 422, "file"),
        ("a .npy named .npz", {"name": "d"}, ("d.npz", npy_bytes(base["x_train"])), 422, "file"),
        ("missing y_test", {"name": "d"}, ("d.npz", npz_bytes(**with_(base, y_test=None))), 422, "file"),
        ("x_holdout without y_holdout", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, x_holdout=base["x_test"]))), 422, "file"),
        ("int64 x", {"name": "d"}, ("d.npz", npz_bytes(**with_(base, x_train=base["x_train"].astype(np.int64)))),
         422, "file.x_train"),
        ("3-d x", {"name": "d"}, ("d.npz", npz_bytes(**with_(base, x_train=base["x_train"][:, 0]))),
         422, "file.x_train"),
        ("NaN in float x", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, x_train=np.full((40, 1, 4, 4), np.nan, np.float32)))), 422, "file.x_train"),
        ("x_test shape differs", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, x_test=np.zeros((10, 1, 2, 2), np.uint8)))), 422, "file.x_test"),
        ("label count mismatch", {"name": "d"}, ("d.npz", npz_bytes(**with_(base, y_train=base["y_train"][:-1]))),
         422, "file.y_train"),
        ("negative label", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, y_train=np.where(np.arange(40) == 3, -1, base["y_train"])))),
         422, "file.y_train"),
        ("float labels", {"name": "d"}, ("d.npz", npz_bytes(**with_(base, y_test=np.zeros(10, np.float32)))),
         422, "file.y_test"),
        ("one class", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, y_train=np.zeros(40, np.int64), y_test=np.zeros(10, np.int64)))),
         422, "file.y_train"),
        ("duplicate ids_train", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, ids_train=np.array(["a"] * 40)))), 422, "file.ids_train"),
        ("ids_train too short", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, ids_train=base["ids_train"][:5]))), 422, "file.ids_train"),
        ("empty id", {"name": "d"},
         ("d.npz", npz_bytes(**with_(base, ids_train=np.array([""] + [f"s{i}" for i in range(1, 40)])))),
         422, "file.ids_train"),
        ("float ids", {"name": "d"}, ("d.npz", npz_bytes(**with_(base, ids_train=np.arange(40.0)))),
         422, "file.ids_train"),
        ("mean without std", {"name": "d", "mean": "[0.5]"}, ("d.npz", good), 422, "std"),
        ("std without mean", {"name": "d", "std": "[0.5]"}, ("d.npz", good), 422, "mean"),
        ("std zero", {"name": "d", "mean": "[0.5]", "std": "[0]"}, ("d.npz", good), 422, "std"),
        ("std negative", {"name": "d", "mean": "[0.5]", "std": "[-1]"}, ("d.npz", good), 422, "std"),
        ("mean per channel, wrong count", {"name": "d", "mean": "[0.1, 0.2]", "std": "[0.5]"},
         ("d.npz", good), 422, "mean"),
        ("mean not JSON", {"name": "d", "mean": "[0.5", "std": "[0.5]"}, ("d.npz", good), 422, "mean"),
        ("std not numbers", {"name": "d", "mean": "[0.5]", "std": '["a"]'}, ("d.npz", good), 422, "std"),
        ("std NaN", {"name": "d", "mean": "[0.5]", "std": "[NaN]"}, ("d.npz", good), 422, "std"),
    ]
    with service.client() as c:

        def poster(data, file):
            return lambda: c.post("/v1/datasets", data=data,
                                  files={"file": (file[0], file[1], "application/octet-stream")} if file else None)

        cases = [(label, poster(data, file), status, field) for label, data, file, status, field in post_cases]
        # the same name twice: a conflict
        r = c.post("/v1/datasets", data={"name": "taken"}, files={"file": ("d.npz", good)})
        assert r.status_code == 201, r.text
        cases.append(("name taken", poster({"name": "taken"}, ("d.npz", good)), 409, "name"))
        cases.append(("name taken, other bytes", poster({"name": "taken"}, ("d.npz", npz_bytes(**small_arrays(30)))),
                      409, "name"))
        # reads
        cases += [
            ("unknown dataset", lambda: c.get("/v1/datasets/999999"), 404, None),
            ("dataset id past 32 bits", lambda: c.get(f"/v1/datasets/{2**31}"), 404, None),
            ("dataset id past 64 bits", lambda: c.get(f"/v1/datasets/{2**64}"), 404, None),
            ("dataset id not an int", lambda: c.get("/v1/datasets/abc"), 422, "dataset_id"),
        ]
        check_cases(service, cases)


def test_upload_limits(tmp_path, db_url):
    """max_train_samples and max_upload_bytes: a file over the size limit, a body over the request limit
    (with Content-Length, and chunked without it), too many samples."""
    limit = 20_000
    settings = make_settings(tmp_path, db_url, max_train_samples=100, max_upload_bytes=limit)
    body_limit = 2 * limit + (1 << 20)
    with running_service(settings) as service, service.client() as c:
        ok = c.post("/v1/datasets", data={"name": "fits"}, files={"file": ("d.npz", npz_bytes(**small_arrays(90)))})
        assert ok.status_code == 201, ok.text  # the limits let a file within them through
        boundary = "----unlearnd-test-boundary"
        stream_headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        big = npz_bytes(**small_arrays(4000))  # > limit bytes, < body limit
        assert limit < len(big) < body_limit
        cases = [
            ("too many samples", lambda: c.post("/v1/datasets", data={"name": "d"},
                                                files={"file": ("d.npz", npz_bytes(**small_arrays(101)))}),
             422, "file"),
            ("file over max_upload_bytes", lambda: c.post("/v1/datasets", data={"name": "d"},
                                                          files={"file": ("d.npz", big)}), 413, "file"),
            ("body over the request limit (Content-Length)",
             lambda: c.post("/v1/datasets", data={"name": "d"}, files={"file": ("d.npz", b"\0" * (body_limit + 1))}),
             413, "body"),
            ("file over max_upload_bytes, chunked",
             lambda: c.post("/v1/datasets", headers=stream_headers,
                            content=multipart_stream(boundary, {"name": "d"}, "file", "d.npz", 4, b"\0" * 8192)),
             413, "file"),
            ("body over the request limit, chunked",
             lambda: c.post("/v1/datasets", headers=stream_headers,
                            content=multipart_stream(boundary, {"name": "d"}, "file", "d.npz", 40, b"\0" * 65536)),
             413, "body"),
        ]
        check_cases(service, cases)
        c.get("/v1/datasets")  # the service still answers
        assert service.counts()["datasets"] == 1


# --------------------------------------------------------------------------- models


def test_model_rejections(service, user_files, tmp_path):
    weights = user_files.weights.read_bytes()
    events = user_files.events.read_bytes()
    tensor = safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    with np.load(user_files.events) as z:
        ev = {k: z[k] for k in z.files}
    with service.client() as c:
        ds = register_dataset(c, user_files)
        other = register_dataset(service.client("globex"), user_files)

        def post(data: dict | None = None, files: dict | None = None) -> Callable[[], httpx.Response]:
            form = with_({"name": "cnn", "dataset_id": str(ds["id"]), "architecture": user_files.architecture()},
                         **(data or {}))
            up = with_({"weights": ("w.safetensors", weights), "events": ("events.npz", events)}, **(files or {}))
            return lambda: c.post("/v1/models", data=form, files=up)

        def weights_(name, blob):
            return {"weights": (name, blob)}

        def events_(name, blob):
            return {"events": (name, blob)}

        cases = [
            ("no name", post({"name": None}), 422, "name"),
            ("empty name", post({"name": " "}), 422, "name"),
            ("no dataset_id", post({"dataset_id": None}), 422, "dataset_id"),
            ("dataset_id not an int", post({"dataset_id": "abc"}), 422, "dataset_id"),
            ("unknown dataset_id", post({"dataset_id": "999999"}), 422, "dataset_id"),
            ("dataset_id past 32 bits", post({"dataset_id": str(2**31)}), 422, "dataset_id"),
            ("dataset_id past 64 bits", post({"dataset_id": str(2**64)}), 422, "dataset_id"),
            ("other tenant's dataset_id", post({"dataset_id": str(other["id"])}), 422, "dataset_id"),
            ("no architecture", post({"architecture": None}), 422, "architecture"),
            ("architecture not JSON", post({"architecture": "{name: small_cnn"}), 422, "architecture"),
            ("architecture a list", post({"architecture": "[1, 2]"}), 422, "architecture"),
            ("architecture without name", post({"architecture": '{"kwargs": {}}'}), 422, "architecture.name"),
            ("architecture unknown field", post({"architecture": '{"name": "mlp", "layers": 3}'}),
             422, "architecture"),
            ("architecture kwargs not an object", post({"architecture": '{"name": "mlp", "kwargs": [1]}'}),
             422, "architecture.kwargs"),
            ("no weights", post(files={"weights": None}), 422, "weights"),
            ("weights named .pt", post(files=weights_("w.pt", weights)), 415, "weights"),
            ("weights named .pth", post(files=weights_("w.pth", weights)), 415, "weights"),
            ("weights named .bin", post(files=weights_("w.bin", weights)), 415, "weights"),
            ("weights as pickle bytes", post(files=weights_("w.safetensors", pickle.dumps({"w": [1.0] * 4}))),
             415, "weights"),
            ("weights a zip (torch.save)", post(files=weights_("w.safetensors", b"PK\x03\x04" + b"\0" * 200)),
             415, "weights"),
            ("weights empty", post(files=weights_("w.safetensors", b"")), 422, "weights"),
            ("weights shorter than the header length", post(files=weights_("w.safetensors", weights[:5])),
             422, "weights"),
            ("weights truncated", post(files=weights_("w.safetensors", weights[: len(weights) // 2])),
             422, "weights"),
            ("weights header not JSON", post(files=weights_("w.safetensors", struct.pack("<Q", 4) + b"{{{{")),
             422, "weights"),
            ("weights header a list", post(files=weights_("w.safetensors", safetensors_bytes([], b""))),
             422, "weights"),
            ("weights header length past the file",
             post(files=weights_("w.safetensors", struct.pack("<Q", 10_000) + b"{}")), 422, "weights"),
            ("tensor offsets too short", post(files=weights_("w.safetensors", safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16))), 422, "weights"),
            ("tensor offsets past the data", post(files=weights_("w.safetensors", safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]}}, b"\0" * 16))), 422, "weights"),
            ("tensors overlap", post(files=weights_("w.safetensors", safetensors_bytes(
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16))), 422, "weights"),
            ("unknown tensor dtype", post(files=weights_("w.safetensors", safetensors_bytes(
                {"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16))), 422, "weights"),
            ("tensor without shape", post(files=weights_("w.safetensors", safetensors_bytes(
                {"w": {"dtype": "F32", "data_offsets": [0, 16]}}, b"\0" * 16))), 422, "weights"),
            ("no tensor", post(files=weights_("w.safetensors", safetensors_bytes({"__metadata__": {}}, b""))),
             422, "weights"),
            ("trailing bytes", post(files=weights_("w.safetensors", tensor + b"\0" * 4)), 422, "weights"),
            ("events named .pkl", post(files=events_("events.pkl", events)), 415, "events"),
            ("events as pickle bytes", post(files=events_("events.npz", pickle.dumps(ev))), 415, "events"),
            ("events not a zip", post(files=events_("events.npz", b"not an archive")), 422, "events"),
            ("events a .npy", post(files=events_("events.npz", npy_bytes(ev["confidence"]))), 422, "events"),
            ("events missing keys", post(files=events_("events.npz", npz_bytes(ids=ev["ids"], count=ev["count"]))),
             422, "events"),
            ("events with other ids", post(files=events_("events.npz", npz_bytes(
                **with_(ev, ids=np.array([f"x{i}" for i in range(len(ev["ids"]))]))))), 422, "events.ids"),
            ("events duplicate ids", post(files=events_("events.npz", npz_bytes(
                **with_(ev, ids=np.array(["0"] * len(ev["ids"])))))), 422, "events.ids"),
            ("events wrong length", post(files=events_("events.npz", npz_bytes(**with_(ev, count=ev["count"][:3])))),
             422, "events.count"),
            ("events object array", post(files=events_("events.npz", npz_bytes(
                **with_(ev, confidence=np.array([object()] * len(ev["ids"]), dtype=object))))), 422, "events"),
            ("policy not JSON", post({"policy": "{method: rum"}), 422, "policy"),
            ("policy a list", post({"policy": "[]"}), 422, "policy"),
            ("policy unknown method", post({"policy": '{"method": "lobotomy"}'}), 422, "policy.method"),
            ("policy unknown field", post({"policy": '{"method": "rum", "colour": "red"}'}), 422, "policy.colour"),
            ("policy batching.max_requests 0", post({"policy": '{"batching": {"max_requests": 0}}'}),
             422, "policy.batching.max_requests"),
            ("policy batching.max_wait_s negative", post({"policy": '{"batching": {"max_wait_s": -1}}'}),
             422, "policy.batching.max_wait_s"),
            ("policy guardrail over 1", post({"policy": '{"guardrails": {"max_test_drop": 2}}'}),
             422, "policy.guardrails.max_test_drop"),
            ("policy unknown proxy", post({"policy": '{"proxy": "vibes"}'}), 422, "policy.proxy"),
            ("policy unknown bin method", post({"policy": '{"bins": ["lobotomy"]}'}), 422, "policy.bins[0].method"),
            ("proxy confidence without events", post({"policy": '{"proxy": "confidence"}'}, {"events": None}),
             422, "policy.proxy"),
        ]
        check_cases(service, cases)
        # the control: the same form with nothing changed is accepted
        assert post()().status_code == 201


# --------------------------------------------------------------------------- reads, pagination, aliases, ranges


def test_pagination_alias_and_range_rejections(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        r = register_model(c, user_files, ds["id"])
        assert r.status_code == 201, r.text
        mid = r.json()["id"]
        size = user_files.weights.stat().st_size
        checkpoint = f"/v1/models/{mid}/versions/1/checkpoint"

        def get(url, **kw):
            return lambda: c.get(url, **kw)

        def put(alias, body):
            return lambda: c.put(f"/v1/models/{mid}/aliases/{alias}", json=body)

        cases = []
        for url in ("/v1/datasets", "/v1/models", f"/v1/models/{mid}/versions", "/v1/audit-log"):
            cases += [
                (f"{url} garbage page_token", get(url, params={"page_token": "not-a-token!"}), 400, "page_token"),
                (f"{url} page_token of a list", get(url, params={"page_token": "WzFd"}), 400, "page_token"),
                (f"{url} max_results 0", get(url, params={"max_results": 0}), 422, "max_results"),
                (f"{url} max_results over the cap", get(url, params={"max_results": 1001}), 422, "max_results"),
                (f"{url} max_results not an int", get(url, params={"max_results": "ten"}), 422, "max_results"),
            ]
        cases += [
            ("unknown model", get("/v1/models/999999"), 404, None),
            ("model id past 32 bits", get(f"/v1/models/{2**31}/versions"), 404, None),
            ("model id past 64 bits", get(f"/v1/models/{2**64}"), 404, None),
            ("version past 32 bits", get(f"/v1/models/{mid}/versions/{2**31}/checkpoint"), 404, None),
            ("version past 64 bits", get(f"/v1/models/{mid}/versions/{2**64}"), 404, None),
            ("alias to a version past 32 bits", put("production", {"version": 2**31}), 422, "version"),
            ("alias to a version past 64 bits", put("production", {"version": 2**64}), 422, "version"),
            ("model id not an int", get("/v1/models/abc"), 422, "model_id"),
            ("unknown version", get(f"/v1/models/{mid}/versions/7"), 404, None),
            ("unknown alias", get(f"/v1/models/{mid}/versions/staging"), 404, None),
            ("versions of an unknown model", get("/v1/models/999999/versions"), 404, None),
            ("alias with a space", put("Bad Name", {"version": 1}), 422, "alias"),
            ("alias upper case", put("Production", {"version": 1}), 422, "alias"),
            ("alias too long", put("a" * 65, {"version": 1}), 422, "alias"),
            ("alias latest", put("latest", {"version": 1}), 422, "alias"),
            ("alias to a version that does not exist", put("production", {"version": 9}), 422, "version"),
            ("alias to version 0", put("production", {"version": 0}), 422, "version"),
            ("alias without version", put("production", {}), 422, "version"),
            ("alias version not an int", put("production", {"version": "one"}), 422, "version"),
            ("alias to a pending version", put("production", {"version": 1}), 409, "version"),
            ("alias on an unknown model", lambda: c.put("/v1/models/999999/aliases/production", json={"version": 1}),
             404, None),
            ("delete latest", lambda: c.delete(f"/v1/models/{mid}/aliases/latest"), 422, "alias"),
            ("delete an alias that is not there", lambda: c.delete(f"/v1/models/{mid}/aliases/staging"), 404, None),
            ("range past the end", get(checkpoint, headers={"Range": f"bytes={size}-"}), 416, "Range"),
            ("range end before start", get(checkpoint, headers={"Range": "bytes=50-10"}), 416, "Range"),
            ("empty suffix range", get(checkpoint, headers={"Range": "bytes=-0"}), 416, "Range"),
            ("range not numbers", get(checkpoint, headers={"Range": "bytes=a-b"}), 416, "Range"),
            ("several ranges", get(checkpoint, headers={"Range": "bytes=0-1,5-6"}), 416, "Range"),
            ("checkpoint of an unknown version", get(f"/v1/models/{mid}/versions/3/checkpoint"), 404, None),
        ]
        check_cases(service, cases)
        unsatisfiable = c.get(checkpoint, headers={"Range": f"bytes={size + 10}-{size + 20}"})
        assert unsatisfiable.headers["content-range"] == f"bytes */{size}"


def test_forged_page_tokens_are_400(service):
    import base64

    with service.client() as c:
        cases = [(f"after={bad}", lambda bad=bad: c.get("/v1/datasets", params={"page_token": base64.urlsafe_b64encode(
                  f'{{"after": {bad}}}'.encode()).decode()}), 400, "page_token")
                 for bad in ("1e400", str(2**31), str(2**64))]
        check_cases(service, cases)
