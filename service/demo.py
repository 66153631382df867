"""``unlearnd demo``: the whole path in one command, over HTTP only.

Against a running service (``--url`` and ``--key``) or the embedded default (started here, under
``--data-dir``): register scikit-learn's digits and a small CNN trained on them (with its training
recipe), calibrate its unlearning policy (a small calibration: a few tens of seconds), send a few
deletion requests, wait for the batched job with a progress bar, print the report's summary and
where the checkpoint and the report are.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.core.statuses import JobStatus, RequestStatus, VersionStatus

DEMO_POLICY = {"method": "rum", "batching": {"max_requests": 3, "max_wait_s": 30}}
# A small calibration so that the demo stays short on digits (the policy's defaults: 16 trials, 6% sets).
DEMO_CALIBRATION = {"n_trials": 6, "forget_fraction": 0.04, "max_retrains": 3.0}
DEMO_EPOCHS = 15


class DemoError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_service(data_dir: Path, port: int | None, log: Path):
    """``unlearnd serve`` as a child process; yields its URL once it is ready."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--data-dir", str(data_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the embedded service did not start; see {log}")
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def make_key(data_dir: Path, tenant: str) -> str:
    os.environ["UNLEARND_DATA_DIR"] = str(data_dir.resolve())
    from service.core.auth import create_key
    from service.core.db import Database
    from service.core.settings import Settings

    db = Database(Settings().db_url)
    try:
        with db.transaction() as session:
            return create_key(session, tenant, "demo")[0]
    finally:
        db.dispose()


def prepare_files(out: Path, seed: int = 0) -> dict:
    """digits as a dataset file and a small CNN trained on it (weights, events, architecture)."""
    import numpy as np

    from worker.engine import architectures
    from worker.engine.data import from_arrays
    from worker.engine.datafile import validate_arrays
    from worker.engine.events import LearningEvents
    from worker.engine.runtime import Runtime
    from worker.engine.sample_data import digits_arrays
    from worker.engine.training import TrainConfig, train_model

    out.mkdir(parents=True, exist_ok=True)
    raw = digits_arrays(seed)
    np.savez(out / "digits.npz", **raw)
    data = from_arrays(validate_arrays(raw), mean=[0.5], std=[0.5])
    spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=16)
    events = LearningEvents.empty(len(data.train))
    from worker.engine.cli import recipe_json

    cfg = TrainConfig(epochs=DEMO_EPOCHS, seed=seed)
    model = train_model(architectures.build(spec, seed=seed), data.view("train"), cfg,
                        runtime=Runtime.auto("cpu"), events=events)
    architectures.save_weights(model, out / "weights.safetensors")
    events.save(out / "events.npz", data.ids)
    (out / "architecture.json").write_text(json.dumps(spec))
    recipe = recipe_json(cfg, len(data.train))  # what `unlearnd train` writes as recipe.json
    (out / "recipe.json").write_text(json.dumps(recipe))
    return {"dataset": out / "digits.npz", "weights": out / "weights.safetensors", "events": out / "events.npz",
            "architecture": spec, "recipe": recipe, "ids": [str(i) for i in data.ids]}


def _check(r: httpx.Response, *codes: int) -> dict:
    if r.status_code not in codes:
        raise DemoError(f"{r.request.method} {r.request.url.path} → {r.status_code}: {r.text[:500]}")
    return r.json() if r.content else {}


def _bar(label: str, fraction: float, width: int = 30) -> None:
    filled = int(round(width * max(0.0, min(1.0, fraction))))
    sys.stdout.write(f"\r  {label:<14} [{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%")
    sys.stdout.flush()


def _wait(fetch, done, label_of, progress_of, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        item = fetch()
        _bar(label_of(item), progress_of(item))
        if done(item):
            sys.stdout.write("\n")
            return item
        if time.monotonic() > deadline:
            sys.stdout.write("\n")
            raise DemoError(f"timed out after {timeout:.0f}s")
        time.sleep(0.5)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _step(b: dict) -> str:
    """One unlearning step of a report: which rows, how many, which method."""
    where = "rows with wrong labels" if b["index"] < 0 else f"bin {b['index']} ({b['level']})"
    return f"{where}: {b['n']} → {b['method']}"


def describe_policy(policy: dict) -> str:
    """One line for an engine policy: RUM's cut points and per-bin methods, or the plain method."""

    def one(m: dict | str) -> str:
        if isinstance(m, str):
            return m
        hp = m.get("hparams") or {}
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in hp.items())
        return f"{m.get('method')}({shown})" if shown else str(m.get("method"))

    if policy.get("method") != "rum":
        return one(policy)
    cuts = policy.get("quantiles") or policy.get("thresholds") or []
    kind = "quantiles" if policy.get("quantiles") else "thresholds"
    return (f"rum, {kind} [{', '.join(f'{q:.2f}' for q in cuts)}]: "
            + " | ".join(one(b) for b in policy.get("bins") or []))


def calibrate(c: httpx.Client, mid: int, settings: dict, timeout: float) -> dict:
    """Start a calibration, wait for it with a progress bar, print what it found; returns its report."""
    job = _check(c.post(f"/v1/models/{mid}/calibrations", json=settings), 202)
    print(f"   calibration job {job['id']} ({', '.join(f'{k} {v}' for k, v in settings.items())}); stages: "
          "loading, proxies, reference (one retrain), search (Optuna trials), check, publishing")
    job = _wait(lambda: _check(c.get(f"/v1/jobs/{job['id']}"), 200),
                lambda j: j["status"] in JobStatus.TERMINAL,
                lambda j: j["stage"] or j["status"], lambda j: float(j["progress"] or 0.0), timeout)
    if job["status"] != JobStatus.SUCCEEDED:
        raise DemoError(f"calibration job {job['id']} {job['status']}: {job['error']}")
    report = _check(c.get(f"/v1/jobs/{job['id']}/report"), 200)
    print(f"   {'(ToW + ToW-MIA)/2':<36} {'score':>7} {'ToW':>7} {'ToW-MIA':>8} {'cost':>7}")
    for label, key in (("search set, calibrated", "search"), ("check set, calibrated", "check"),
                       ("check set, uncalibrated default", "default_check")):
        s = report.get(key) or {}
        print(f"   {label:<36} {_fmt(s.get('score')):>7} {_fmt(s.get('tow')):>7} {_fmt(s.get('tow_mia')):>8} "
              f"{_fmt(s.get('cost_share')):>7}")
    trials = report.get("trials") or []
    done = sum(1 for t in trials if t.get("state") == "complete")
    rev = report.get("revision") or {}
    print(f"   chosen ({report.get('chosen', 'calibrated')}): {describe_policy(report.get('policy') or {})}")
    print(f"   {len(trials)} trial(s), {done} complete; cost {_fmt(report.get('cost_retrains'))} retrain-equivalents "
          f"in {_fmt(report.get('seconds'))}s; policy revision {rev.get('number')} "
          f"({'applied' if rev.get('applied') else 'recorded, not applied'})")
    pay = report.get("payback") or {}
    if pay.get("jobs") is not None:
        print(f"   pays for itself after {pay['jobs']} deletion job(s) ({pay.get('summary')})")
    else:
        print(f"   {pay.get('summary') or 'no cost saving measured'}")
    return report


def run_demo(url: str, key: str, workdir: Path, *, timeout: float = 900.0, calibration: bool = True) -> dict:
    print(f"unlearnd demo against {url}")
    print("1. preparing digits and training a small CNN (a few seconds) …")
    files = prepare_files(workdir / "inputs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        print("2. registering the dataset and the model …")
        with open(files["dataset"], "rb") as f:
            ds = _check(c.post("/v1/datasets", data={"name": f"digits-demo-{stamp}", "mean": "[0.5]",
                                                     "std": "[0.5]"}, files={"file": ("digits.npz", f)}), 201)
        with open(files["weights"], "rb") as w, open(files["events"], "rb") as e:
            model = _check(c.post("/v1/models", data={
                "name": f"digits-cnn-demo-{stamp}", "dataset_id": str(ds["id"]),
                "architecture": json.dumps(files["architecture"]), "policy": json.dumps(DEMO_POLICY),
                "recipe": json.dumps(files["recipe"])},
                files={"weights": ("weights.safetensors", w), "events": ("events.npz", e)}), 201)
        mid = model["id"]
        pending = VersionStatus.PENDING
        v1 = _wait(lambda: _check(c.get(f"/v1/models/{mid}/versions/1"), 200), lambda v: v["status"] != pending,
                   lambda v: f"version 1 {v['status']}", lambda v: 0.0 if v["status"] == pending else 1.0, 300)
        if v1["status"] != VersionStatus.READY:
            raise DemoError(f"version 1 is {v1['status']}: {v1['status_reason']}")
        print(f"   version 1 ready: test accuracy {v1['metrics']['test_accuracy']:.4f}; recipe "
              f"{model['recipe']['epochs']} epochs × {model['recipe']['steps'] // model['recipe']['epochs']} steps, "
              f"lr {model['recipe']['lr']}")
        step = 3
        calibration_report = None
        if calibration:
            print(f"{step}. calibrating the unlearning policy against a retrain (once per model) …")
            calibration_report = calibrate(c, mid, DEMO_CALIBRATION, timeout)
            step += 1

        print(f"{step}. sending 3 deletion requests (one batch: the demo policy batches every 3) …")
        ids = files["ids"]
        requests = [
            {"sample_ids": ids[0:10], "reason": "erasure", "subject_ref": "subject-0001"},
            {"sample_ids": ids[10:25], "reason": "mislabeled"},
            {"sample_ids": ids[25:40] + ids[0:3], "reason": "erasure", "subject_ref": "subject-0002"},
        ]
        made = []
        for i, body in enumerate(requests):
            r = c.post(f"/v1/models/{mid}/deletion-requests", json=body,
                       headers={"Idempotency-Key": f"demo-{stamp}-{i}"})
            made.append(_check(r, 202))
            print(f"   request {made[-1]['id']}: {body['reason']}, {len(body['sample_ids'])} samples → "
                  f"{made[-1]['status']} ({r.headers['location']})")

        def request_state():
            return _check(c.get(made[-1]["links"]["self"]), 200)

        req = _wait(request_state, lambda r: r["job_id"] is not None or r["status"] != RequestStatus.RECEIVED,
                    lambda r: f"request {r['status']}", lambda r: 0.0, 120)
        job_id = req["job_id"]
        if job_id is None:
            raise DemoError(f"request {req['id']} is {req['status']} without a job")
        print(f"{step + 1}. job {job_id} runs (stages: loading, proxies, refining, unlearning, auditing, publishing)")
        job = _wait(lambda: _check(c.get(f"/v1/jobs/{job_id}"), 200),
                    lambda j: j["status"] in JobStatus.TERMINAL,
                    lambda j: j["stage"] or j["status"], lambda j: float(j["progress"] or 0.0), timeout)
        if job["status"] != JobStatus.SUCCEEDED:
            raise DemoError(f"job {job_id} {job['status']}: {job['error']}")
        report = _check(c.get(f"/v1/jobs/{job_id}/report"), 200)
        html = c.get(f"/v1/jobs/{job_id}/report.html")
        new = job["result_version"]
        ckpt = c.get(f"/v1/models/{mid}/versions/{new}/checkpoint")
        if ckpt.status_code != 200:
            raise DemoError(f"checkpoint download → {ckpt.status_code}: {ckpt.text[:300]}")
        out = workdir / f"model-{mid}-job-{job_id}"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"v{new}.safetensors").write_bytes(ckpt.content)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.html").write_text(html.text)
        final = [_check(c.get(m["links"]["self"]), 200) for m in made]

    m = report.get("metrics", {})
    before, after = m.get("before") or {}, m.get("after") or {}
    print(f"\n{step + 2}. report summary")
    print(f"   version {report['job']['base_version']} → {new} by {report['method']} on "
          f"{report['forget_set']['n']} forgotten samples in {job['timings'].get('total', 0):.1f}s")
    print("   steps: " + "; ".join(_step(b) for b in report.get("bins") or []))
    print(f"   {'metric':<12} {'before':>8} {'after':>8}")
    for k in ("acc_forget", "acc_retain", "acc_test", "mia"):
        print(f"   {k:<12} {_fmt(before.get(k)):>8} {_fmt(after.get(k)):>8}")
    g = report.get("guardrails", {})
    print(f"   guardrails {'passed' if g.get('passed') else 'FAILED'} (test drop {_fmt(g.get('test_drop'))}, "
          f"retain drop {_fmt(g.get('retain_drop'))}); aliases moved: {', '.join(report.get('aliases_moved', []))}")
    states = ", ".join(f"{r['id']} {r['status']} (v{r['result_version']})" for r in final)
    print(f"   requests: {states}")
    print(f"\n   checkpoint: {out / f'v{new}.safetensors'}   ({url}/v1/models/{mid}/versions/{new}/checkpoint)")
    print(f"   report:     {out / 'report.html'}   ({url}/v1/jobs/{job_id}/report.html)")
    return {"model_id": mid, "job_id": job_id, "version": new, "out": str(out), "report": report,
            "calibration": calibration_report}
