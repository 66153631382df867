"""Deletion requests end to end over HTTP only, with a real worker process: SQLite with the
embedded broker, and PostgreSQL with Redis.

The model is trained on digits with 40 training labels flipped (it memorizes them); the requests
ask to forget exactly those rows (reason ``mislabeled``). A retrain reference (``audit.reference =
retrain``) says where the forget accuracy should go: the published version must be closer to it
than the original was, measured on the checkpoint downloaded over HTTP.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from service.core.artifacts import LocalArtifactStore
from tests.servicekit import (
    fresh_postgres,
    make_settings,
    running_service,
    wait_for,
    worker_process,
)

N_FLIPPED = 40
FAST = {"UNLEARND_SWEEP_INTERVAL_S": "1", "UNLEARND_REDISPATCH_AFTER_S": "2", "UNLEARND_JOB_HEARTBEAT_S": "0.5",
        "UNLEARND_JOB_STALE_AFTER_S": "4"}


@pytest.fixture(scope="session")
def noisy(tmp_path_factory, digits_raw):
    """digits with N_FLIPPED training labels shifted by one, and a small CNN that memorized them."""
    from worker.engine import architectures
    from worker.engine.data import from_arrays
    from worker.engine.datafile import validate_arrays
    from worker.engine.events import LearningEvents
    from worker.engine.runtime import Runtime
    from worker.engine.training import TrainConfig, train_model

    d = tmp_path_factory.mktemp("noisy")
    raw = {k: v.copy() for k, v in digits_raw.items()}
    rows = np.random.default_rng(1).choice(len(raw["y_train"]), N_FLIPPED, replace=False)
    raw["y_train"][rows] = (raw["y_train"][rows] + 1) % 10
    np.savez(d / "noisy.npz", **raw)
    data = from_arrays(validate_arrays(raw), mean=[0.5], std=[0.5])
    spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=16)
    events = LearningEvents.empty(len(data.train))
    model = train_model(architectures.build(spec, seed=0), data.view("train"), TrainConfig(epochs=25, seed=0),
                        runtime=Runtime.auto("cpu"), events=events)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "weights.safetensors"))
    events.save(d / "events.npz", data.ids)
    ids = [str(i) for i in data.ids]
    return {"dir": d, "spec": spec, "data": data, "flipped": [ids[r] for r in sorted(rows)], "ids": ids}


@pytest.fixture(params=["sqlite+sqla", "postgres+redis"])
def stack(request, tmp_path):
    """A live API, and a function starting real workers on the same database, broker and artifacts."""
    if request.param == "sqlite+sqla":
        settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'unlearnd.sqlite3'}")
        with running_service(settings) as svc:
            yield svc
    else:
        from tests.servicekit import flush_redis

        redis = request.getfixturevalue("redis_url") + "/8"
        flush_redis(redis)
        with fresh_postgres(request.getfixturevalue("postgres_admin")) as url, \
                running_service(make_settings(tmp_path, url, broker_url=redis)) as svc:
            yield svc
        flush_redis(redis)


def _register(c, noisy, policy) -> int:
    d = noisy["dir"]
    with open(d / "noisy.npz", "rb") as f:
        ds = c.post("/v1/datasets", data={"name": "noisy-digits", "mean": "[0.5]", "std": "[0.5]"},
                    files={"file": ("noisy.npz", f)})
    assert ds.status_code == 201, ds.text
    with open(d / "weights.safetensors", "rb") as w, open(d / "events.npz", "rb") as e:
        r = c.post("/v1/models", data={"name": "noisy-cnn", "dataset_id": str(ds.json()["id"]),
                                       "architecture": json.dumps(noisy["spec"]), "policy": json.dumps(policy)},
                   files={"weights": ("weights.safetensors", w), "events": ("events.npz", e)})
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    v1 = wait_for(lambda: (v := c.get(f"/v1/models/{mid}/versions/1").json())["status"] != "pending" and v,
                  timeout=120, what="version 1")
    assert v1["status"] == "ready", v1
    return mid


def _job_done(c, job_id, timeout=300):
    return wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed",
                                                                                      "canceled") and j,
                    timeout=timeout, what=f"job {job_id}")


def _forget_accuracy(blob: bytes, noisy, sample_ids) -> float:
    from worker.engine import architectures
    from worker.engine.runtime import Runtime
    from worker.engine.training import accuracy

    model = architectures.load_weights(architectures.build(noisy["spec"]), load_safetensors(blob))
    data = noisy["data"]
    return accuracy(model, data.view("train", data.rows(sample_ids)), Runtime.auto("cpu"))


def test_requests_become_one_job_and_a_published_version(stack, noisy, tmp_path):
    policy = {"method": "rum", "batching": {"max_requests": 3, "max_wait_s": 3600},
              "audit": {"reference": "retrain"}}
    flipped = noisy["flipped"]
    with worker_process(stack.settings, tmp_path / "worker.log", beat=True, **FAST), stack.client() as c:
        mid = _register(c, noisy, policy)
        parts = (flipped[:15], flipped[15:30], flipped[30:])
        reqs = [c.post(f"/v1/models/{mid}/deletion-requests",
                       json={"sample_ids": p, "reason": "mislabeled", "subject_ref": f"case-{i}"}) for i, p in
                enumerate(parts)]
        assert [r.status_code for r in reqs] == [202, 202, 202]
        job_id = wait_for(lambda: c.get(reqs[-1].headers["location"]).json()["job_id"], what="the batch")
        job = _job_done(c, job_id)
        assert job["status"] == "succeeded", job
        assert job["n_requests"] == 3 and job["n_forget"] == N_FLIPPED and job["result_version"] == 2
        assert len(c.get(f"/v1/models/{mid}/jobs").json()["items"]) == 1
        assert set(job["timings"]) >= {"loading", "proxies", "refining", "unlearning", "auditing", "publishing"}

        v2 = c.get(f"/v1/models/{mid}/versions/2").json()
        assert (v2["status"], v2["parent_version"], v2["job_id"]) == ("ready", 1, job_id)
        assert "latest" in v2["aliases"]
        blob = c.get(f"/v1/models/{mid}/versions/2/checkpoint").content
        original = c.get(f"/v1/models/{mid}/versions/1/checkpoint").content
        before, after = _forget_accuracy(original, noisy, flipped), _forget_accuracy(blob, noisy, flipped)
        report = c.get(f"/v1/jobs/{job_id}/report").json()
        reference = report["metrics"]["reference"]["acc_forget"]
        assert before > 0.9  # the flipped labels were memorized
        assert abs(after - reference) < abs(before - reference) - 0.2, (before, after, reference)
        assert report["metrics"]["after"]["acc_forget"] == pytest.approx(after, abs=1e-6)
        assert report["forget_set"]["n"] == N_FLIPPED and len(report["requests"]) == 3
        html = c.get(f"/v1/jobs/{job_id}/report.html")
        assert html.status_code == 200 and html.text.count("<svg") == 4 and f"job {job_id}" in html.text
        for r in reqs:
            done = c.get(r.headers["location"]).json()
            assert (done["status"], done["result_version"]) == ("completed", 2)
        status = c.get(f"/v1/models/{mid}/samples/{flipped[0]}").json()
        assert status["forgotten_in_version"] == 2 and status["versions_containing"] == [1]


def test_cumulative_forget_set_over_three_jobs(stack, noisy, tmp_path):
    policy = {"method": "finetune", "hparams": {"epochs": 2}, "batching": {"max_requests": 1, "max_wait_s": 3600}}
    ids, flipped = noisy["ids"], noisy["flipped"]
    with worker_process(stack.settings, tmp_path / "worker.log", beat=True, **FAST), stack.client() as c:
        mid = _register(c, noisy, policy)
        batches = (flipped[:10], flipped[10:20] + flipped[:2], flipped[20:30])
        seen: list[str] = []
        for n, batch in enumerate(batches, start=2):
            r = c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": batch, "reason": "mislabeled"})
            assert r.status_code == 202
            job_id = wait_for(lambda r=r: c.get(r.headers["location"]).json()["job_id"], what="a job")
            job = _job_done(c, job_id)
            assert job["status"] == "succeeded" and job["base_version"] == n - 1 and job["result_version"] == n
            report = c.get(f"/v1/jobs/{job_id}/report").json()
            new = [s for s in batch if s not in seen]
            assert report["forget_set"]["n"] == len(new)
            assert report["forget_set"]["n_excluded_before"] == len(seen)
            seen += new
        assert c.get(f"/v1/models/{mid}").json()["aliases"]["latest"] == 4
        assert c.get(f"/v1/models/{mid}/versions/4").json()["n_forgotten"] == 30
        assert c.get(f"/v1/models/{mid}/samples/{flipped[0]}").json()["versions_containing"] == [1]
        assert c.get(f"/v1/models/{mid}/samples/{flipped[25]}").json()["versions_containing"] == [1, 2, 3]
        assert c.get(f"/v1/models/{mid}/samples/{ids[0]}").json()["forgotten"] is (ids[0] in seen)


def test_worker_killed_mid_job_then_restarted_publishes_exactly_one_version(stack, noisy, tmp_path):
    policy = {"method": "finetune", "hparams": {"epochs": 40}, "batching": {"max_requests": 2, "max_wait_s": 3600}}
    flipped = noisy["flipped"]
    with stack.client() as c:
        with worker_process(stack.settings, tmp_path / "w1.log", beat=True, **FAST) as first:
            mid = _register(c, noisy, policy)
            reqs = [c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": p, "reason": "erasure"})
                    for p in (flipped[:5], flipped[5:10])]
            job_id = wait_for(lambda: c.get(reqs[-1].headers["location"]).json()["job_id"], what="the batch")
            wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["stage"] == "unlearning", timeout=120,
                     interval=0.05, what="the job to be unlearning")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        killed = c.get(f"/v1/jobs/{job_id}").json()
        assert killed["status"] == "running" and killed["result_version"] is None
        time.sleep(1)
        with worker_process(stack.settings, tmp_path / "w2.log", beat=True, **FAST):
            job = _job_done(c, job_id, timeout=300)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        versions = c.get(f"/v1/models/{mid}/versions").json()["items"]
        assert [v["version"] for v in versions] == [1, 2] and versions[1]["job_id"] == job_id
        assert all(c.get(r.headers["location"]).json()["status"] == "completed" for r in reqs)


def test_cancel_a_running_job_publishes_nothing(stack, noisy, tmp_path):
    policy = {"method": "finetune", "hparams": {"epochs": 200}, "batching": {"max_requests": 1, "max_wait_s": 3600}}
    with worker_process(stack.settings, tmp_path / "worker.log", **FAST), stack.client() as c:
        mid = _register(c, noisy, policy)
        r = c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": noisy["flipped"][:5],
                                                                  "reason": "erasure"})
        job_id = wait_for(lambda: c.get(r.headers["location"]).json()["job_id"], what="the job")
        wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["stage"] == "unlearning", timeout=120, interval=0.05,
                 what="unlearning")
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        job = _job_done(c, job_id, timeout=60)
        assert job["status"] == "canceled"
        assert [v["version"] for v in c.get(f"/v1/models/{mid}/versions").json()["items"]] == [1]
        # its request went back to pending and is batched again by the policy (here at once: 1 of 1)
        back = c.get(r.headers["location"]).json()
        assert back["status"] != "completed" and back["job_id"] != job_id and back["result_version"] is None


def test_a_failing_job_fails_and_retries_its_requests_up_to_the_limit(stack, noisy, tmp_path):
    """A job that cannot run (the base version's checkpoint went missing from the artifact store
    after registration): the job fails with the reason, and the request goes back for the next batch
    until it took part in max_request_attempts (3) jobs. (Hyperparameters that would blow the weights
    up are refused at registration now: worker/engine/hparams.py.)"""
    policy = {"method": "finetune", "hparams": {"steps": 3}, "batching": {"max_requests": 1, "max_wait_s": 3600}}
    with worker_process(stack.settings, tmp_path / "worker.log", **FAST), stack.client() as c:
        mid = _register(c, noisy, policy)
        sha = c.get(f"/v1/models/{mid}/versions/1").json()["checkpoint"]["sha256"]
        LocalArtifactStore(stack.settings.artifacts).delete(sha)
        r = c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": noisy["flipped"][:5],
                                                                  "reason": "poisoned"})
        job_id = wait_for(lambda: c.get(r.headers["location"]).json()["job_id"], what="the job")
        job = _job_done(c, job_id)
        assert job["status"] == "failed" and job["error"]["stage"] == "loading" and job["error"]["message"], job
        final = wait_for(lambda: (q := c.get(r.headers["location"]).json())["status"] == "failed" and q,
                         timeout=300, what="the request to run out of attempts")
        assert final["attempts"] == 3 and final["error"]
        jobs = c.get(f"/v1/models/{mid}/jobs").json()["items"]
        assert [j["status"] for j in jobs] == ["failed"] * 3
        assert [v["version"] for v in c.get(f"/v1/models/{mid}/versions").json()["items"]] == [1]
