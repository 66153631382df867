"""Dockerfile and docker-compose.yml, checked without Docker: structure, and every ``unlearnd`` command they run
parsed by the real CLI parser, so a renamed subcommand or flag fails here rather than in a container."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = "postgresql+psycopg://unlearnd:unlearnd@postgres:5432/unlearnd"
BROKER_URL = "redis://redis:6379/0"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with comments dropped and ``\\`` continuations joined."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        full, pending = pending + line, ""
        keyword, _, args = full.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def project_install() -> tuple[int, str]:
    """(position, RUN arguments) of the one RUN that installs the project itself."""
    runs = [(i, rest) for i, (keyword, rest) in enumerate(dockerfile_instructions())
            if keyword == "RUN" and re.search(r"pip install (-e |--editable )?\.(\s|$)", rest)]
    assert len(runs) == 1, "the project is installed once, with `pip install .` or `pip install -e .`"
    return runs[0]


def dockerfile_args() -> dict[str, str | None]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip() or None
    return args


def expand(text: str, values: dict[str, str | None]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2)) or m.group(0), text)


def command_argv(command) -> list[str]:
    """A compose ``command`` (list or string) or a Dockerfile exec-form CMD, as argv."""
    return list(command) if isinstance(command, list) else shlex.split(command)


def unlearnd_invocations(argv: list[str]) -> list[list[str]]:
    """The argument lists of every ``unlearnd ...`` that an argv runs, looking inside ``sh -c "a && b"``."""
    if len(argv) >= 3 and argv[0] in ("sh", "/bin/sh", "bash", "/bin/bash") and argv[1] == "-c":
        script = shlex.split(argv[2], posix=True)
        segments, current = [], []
        for token in script:
            if token in ("&&", "||", ";"):
                segments.append(current)
                current = []
            else:
                current.append(token)
        segments.append(current)
        return [inv for segment in segments for inv in unlearnd_invocations(segment)]
    if argv and argv[0] == "exec":
        argv = argv[1:]
    if argv and Path(argv[0]).name == "unlearnd":
        return [argv[1:]]
    return []


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps subcommands in a private action; no public accessor
        if isinstance(action, argparse._SubParsersAction):
            assert name in action.choices, f"`unlearnd {name}` is not a subcommand of the CLI"
            return action.choices[name]
    raise AssertionError("the CLI has no subcommands")


def check_with_cli(args: list[str], where: str) -> argparse.Namespace:
    """Parse ``unlearnd <args>`` with the real parser; each --flag must be spelled in full, not abbreviated."""
    from service.cli import build_parser

    parser = build_parser()
    assert args, f"{where}: `unlearnd` without a subcommand"
    sub = subparser(parser, args[0])
    for token in args[1:]:
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            assert flag in sub._option_string_actions, f"{where}: `unlearnd {args[0]}` has no option {flag}"
    try:
        return parser.parse_args(args)
    except SystemExit as exc:  # argparse reports the error on stderr and exits 2
        pytest.fail(f"{where}: the CLI rejects `unlearnd {shlex.join(args)}` (exit {exc.code})")


def service_invocations(services: dict, name: str) -> list[list[str]]:
    return unlearnd_invocations(command_argv(services[name]["command"]))


def env(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in environment.items()}


def volume_targets(service: dict) -> dict[str, str]:
    """Named volume -> mount point."""
    out = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, str):
            source, target = spec.split(":")[:2]
        else:
            source, target = spec.get("source"), spec["target"]
        out[source] = target
    return out


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_has_the_five_services(services):
    assert {"api", "worker", "beat", "postgres", "redis"} <= set(services)


def test_compose_health_checks(services):
    assert "pg_isready" in " ".join(command_argv(services["postgres"]["healthcheck"]["test"]))
    assert "redis-cli ping" in " ".join(command_argv(services["redis"]["healthcheck"]["test"]))
    api_check = command_argv(services["api"]["healthcheck"]["test"])
    assert api_check[0] in ("CMD", "CMD-SHELL")
    assert api_check[1] == "python" and api_check[2] == "-c", api_check
    assert "urllib" in api_check[3] and "http://localhost:8000/healthz" in api_check[3]
    compile(api_check[3], "<api healthcheck>", "exec")  # the probe is valid Python


def test_compose_depends_on_healthy_services(services):
    for name in ("api", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        assert {"postgres", "redis"} <= set(depends), name
        for dependency, spec in depends.items():
            assert spec["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"


def test_api_and_worker_share_artifacts_and_urls(compose, services):
    api, worker, beat = services["api"], services["worker"], services["beat"]
    api_volumes, worker_volumes = volume_targets(api), volume_targets(worker)
    shared = set(api_volumes) & set(worker_volumes) & set(compose.get("volumes") or {})
    assert "artifacts" in shared, "api and worker must mount the same named artifacts volume"
    assert api_volumes["artifacts"] == worker_volumes["artifacts"] == "/artifacts"
    for name, service in (("api", api), ("worker", worker)):
        assert env(service)["ARTIFACT_DIR"] == "/artifacts", name
    for name, service in (("api", api), ("worker", worker), ("beat", beat)):
        assert env(service)["DATABASE_URL"] == DATABASE_URL, name
        assert env(service)["BROKER_URL"] == BROKER_URL, name
    assert "postgres:5432" in DATABASE_URL and "redis:6379" in BROKER_URL  # the compose service names
    pg = env(services["postgres"])
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@" in DATABASE_URL
    assert DATABASE_URL.endswith("/" + pg["POSTGRES_DB"])


def test_worker_reserves_a_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_every_worker_signs_with_the_same_key_and_short_tasks_have_a_cpu_worker(services):
    """Tree heads and certificates need one signing key across workers (the shared state volume),
    and the sequencer and webhook deliveries a worker that is not busy with a GPU job."""
    for name in ("worker", "worker-cpu"):
        assert volume_targets(services[name])["state"] == env(services[name])["UNLEARND_DATA_DIR"] == "/data", name
    (cpu,) = (check_with_cli(a, "worker-cpu") for a in service_invocations(services, "worker-cpu"))
    assert cpu.queues == "default" and "deploy" not in services["worker-cpu"]


def test_compose_builds_with_a_dockerfile_arg(services):
    args = dockerfile_args()
    for name in ("api", "worker", "beat"):
        build_args = services[name]["build"]["args"]
        assert set(build_args) <= set(args), f"{name}: build args the Dockerfile does not declare"
        assert "TORCH_INDEX" in build_args


def test_compose_commands_are_real_cli_commands(services):
    expected = {"api": ["migrate", "api"], "worker": ["worker"], "worker-cpu": ["worker"], "beat": ["beat"]}
    for name, subcommands in expected.items():
        invocations = service_invocations(services, name)
        assert [inv[0] for inv in invocations] == subcommands, (name, invocations)
        for args in invocations:
            check_with_cli(args, f"docker-compose service {name}")


def test_compose_command_values(services):
    migrate, api = (check_with_cli(a, "api") for a in service_invocations(services, "api"))
    assert (api.host, int(api.port)) == ("0.0.0.0", 8000)
    assert services["api"]["ports"] == ["8000:8000"]
    (worker,) = (check_with_cli(a, "worker") for a in service_invocations(services, "worker"))
    assert "gpu" in str(worker.queues).split(",") and int(worker.concurrency) == 1


def test_cli_accepts_the_documented_commands():
    """The exact invocations the deployment relies on (also documents them in one place)."""
    for args in (
        ["serve", "--data-dir", "/data", "--host", "0.0.0.0", "--port", "8000"],
        ["api", "--host", "0.0.0.0", "--port", "8000"],
        ["worker", "--queues", "gpu,default", "--concurrency", "1"],
        ["beat"],
        ["migrate"],
    ):
        check_with_cli(args, "cli")


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_and_user():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert ("EXPOSE", "8000") in instructions


def test_dockerfile_installs_torch_first_from_a_selectable_index():
    instructions = dockerfile_instructions()
    args = dockerfile_args()
    assert args.get("TORCH_INDEX") == "cpu", "build arg TORCH_INDEX selects the torch build; CPU by default"
    runs = [(i, rest) for i, (keyword, rest) in enumerate(instructions) if keyword == "RUN"]
    torch_runs = [(i, rest) for i, rest in runs if re.search(r"pip install [^&]*[\"']?torch==", rest)]
    assert len(torch_runs) == 1, torch_runs
    torch_at, torch_run = torch_runs[0]
    assert "${TORCH_INDEX}" in torch_run or "$TORCH_INDEX" in torch_run
    for index in ("cpu", "cu130"):
        url = f"https://download.pytorch.org/whl/{index}"
        resolved = expand(torch_run, {**args, "TORCH_INDEX": index}).replace('"', "").replace("'", "")
        assert "torch==2.13.0" in resolved and f"--index-url {url}" in resolved, resolved
    assert torch_at < project_install()[0], "torch must be installed before the project"


def test_dockerfile_image_can_migrate():
    """`unlearnd migrate` reads <repo>/migrations (service/core/migrate.py), which a wheel leaves out unless packaged:
    the image must copy migrations/ and install the project editable (or the project must package them)."""
    instructions = dockerfile_instructions()
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    assert any(parts[0].rstrip("/") == "migrations" for parts in copies), "the image must contain migrations/"
    editable = re.search(r"pip install (-e|--editable) \.", project_install()[1]) is not None
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"].get("include", [])
    packaged = any(fnmatch("migrations", pattern) for pattern in include)
    assert editable or packaged, "`pip install .` leaves migrations/ out: install editable, or package migrations"


def test_dockerfile_copies_what_the_build_needs():
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in ignored and ".git" in ignored
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not any(fnmatch(source.rstrip("/"), pattern) for pattern in ignored), f"{source} is dockerignored"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    readme = pyproject["project"]["readme"]
    assert any(keyword == "COPY" and readme in rest.split() for keyword, rest in dockerfile_instructions())


def test_dockerfile_cmd_is_a_real_cli_command():
    cmd = next(rest for keyword, rest in reversed(dockerfile_instructions()) if keyword == "CMD")
    argv = json.loads(cmd)  # exec form, so signals reach the process
    (args,) = unlearnd_invocations(argv)
    parsed = check_with_cli(args, "Dockerfile CMD")
    assert args[0] == "serve"
    assert (parsed.host, int(parsed.port), str(parsed.data_dir)) == ("0.0.0.0", 8000, "/data")
