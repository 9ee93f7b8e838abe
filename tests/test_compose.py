"""docker-compose.yml and the configuration it mounts agree with each other (no Docker needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from _promtool import run_promtool

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
TEMPO_CONFIG = ROOT / "tempo" / "tempo.yml"


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


COMPOSE: dict[str, Any] = load_yaml(COMPOSE_PATH)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts; named volumes are skipped."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):
            mounts.append((source, target))
    return mounts


def host_path(container_path: str, service: dict[str, Any]) -> Path:
    """The file in this repository that `service` sees at `container_path`."""
    wanted = PurePosixPath(container_path)
    for source, target in bind_mounts(service):
        if wanted == PurePosixPath(target) or PurePosixPath(target) in wanted.parents:
            return ROOT / source / wanted.relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted from the repository")


def as_list(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def app_command() -> list[str]:
    """The app's command: compose's `command`, else the CMD of its Dockerfile."""
    app = SERVICES["app"]
    if "command" in app:
        return as_list(app["command"])
    dockerfile = ROOT / app["build"]["context"] / app["build"]["dockerfile"]
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", dockerfile.read_text(encoding="utf-8"), re.MULTILINE)
    assert cmd, f"{dockerfile}: no CMD in exec form"
    return list(json.loads(cmd.group(1)))


def option(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def test_compose_has_the_services() -> None:
    assert {"app", "postgres", "prometheus", "grafana", "tempo", "loadgen"} <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_bind_mounted_paths_exist(name: str) -> None:
    for source, _ in bind_mounts(SERVICES[name]):
        assert (ROOT / source).exists(), f"{name}: {source} does not exist"


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if "build" in s))
def test_build_context_and_dockerfile_exist(name: str) -> None:
    build = SERVICES[name]["build"]
    context = ROOT / (build if isinstance(build, str) else build["context"])
    assert context.is_dir(), f"{name}: build context {context} is missing"
    dockerfile = context / (
        build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    )
    assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"


def test_promtool_check_config() -> None:
    run_promtool("check", "config", PROMETHEUS_CONFIG)


def test_prometheus_loads_the_mounted_config() -> None:
    prometheus = SERVICES["prometheus"]
    command = as_list(prometheus["command"])
    assert host_path(option(command, "--config.file"), prometheus) == PROMETHEUS_CONFIG
    assert "--web.enable-lifecycle" in command
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]


def test_scrape_target_is_the_app_service_and_port() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "session_monitor_example"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [target] = [t for static in job["static_configs"] for t in static["targets"]]
    host, port = target.rsplit(":", 1)
    assert host in SERVICES, f"scrape target {target}: no compose service {host!r}"
    assert host == "app"
    assert option(app_command(), "--port") == port, "the app listens on another port"
    assert any(str(p).split(":")[-1] == port for p in SERVICES["app"].get("ports", []))


def test_rule_files_are_mounted() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    rule_files = [
        path for pattern in config["rule_files"] for path in PROMETHEUS_CONFIG.parent.glob(pattern)
    ]
    assert rule_files, f"rule_files {config['rule_files']} match nothing"


@pytest.mark.parametrize("name", ["Prometheus", "Tempo"])
def test_grafana_datasources_point_at_compose_services(name: str) -> None:
    [source] = [d for d in load_yaml(DATASOURCES)["datasources"] if d["name"] == name]
    url = urlsplit(source["url"])
    assert url.hostname in SERVICES, f"{name}: {source['url']} is not a compose service"
    assert source["uid"] == name.lower()
    if name == "Tempo":
        assert url.port == load_yaml(TEMPO_CONFIG)["server"]["http_listen_port"]


def test_grafana_loads_the_dashboards_and_provisioning() -> None:
    grafana = SERVICES["grafana"]
    [provider] = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    dashboards = host_path(provider["options"]["path"], grafana)
    assert (dashboards / "session_monitor.json").is_file()
    assert (
        host_path("/etc/grafana/provisioning/datasources/datasources.yml", grafana) == DATASOURCES
    )
    environment = grafana["environment"]
    assert str(environment["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"


def test_app_reaches_postgres_and_tempo() -> None:
    environment = SERVICES["app"]["environment"]
    database = urlsplit(environment["DATABASE_URL"])
    assert database.hostname == "postgres"
    assert "healthcheck" in SERVICES["postgres"]
    assert SERVICES["app"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    otlp = urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.hostname == "tempo"
    receiver = load_yaml(TEMPO_CONFIG)["distributor"]["receivers"]["otlp"]["protocols"]["http"]
    assert receiver["endpoint"] == f"0.0.0.0:{otlp.port}"
    assert (
        host_path(option(as_list(SERVICES["tempo"]["command"]), "-config.file"), SERVICES["tempo"])
        == TEMPO_CONFIG
    )


def test_loadgen_is_behind_a_profile() -> None:
    loadgen = SERVICES["loadgen"]
    assert loadgen.get("profiles"), "loadgen would start with every `docker compose up`"
    command = as_list(loadgen["command"])
    assert command[:3] == ["python", "-m", "example_app.loadgen"]
    host = urlsplit(option(command, "--base-url")).hostname
    assert host == "app"
