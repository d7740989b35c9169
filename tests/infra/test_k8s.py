"""Every kustomize overlay renders, and what it renders is valid Kubernetes.

Built-in kinds are validated offline against the Kubernetes OpenAPI schemas
(`kubernetes-validate --strict`: unknown fields are errors). The custom resources (KEDA
ScaledObject, Prometheus Operator ServiceMonitor and PrometheusRule) have no schema
offline, so they are checked for what AOS depends on: that they point at things the
render contains, and that the PrometheusRule is exactly infra/prometheus/rules/.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.tools import INFRA, REPO, run_tool, tool

OVERLAYS = sorted(p.name for p in (INFRA / "k8s" / "overlays").iterdir() if p.is_dir())
SERVICES = ("planner", "executor", "ledger", "tracer")
# The oldest Kubernetes the manifests support, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", None)
SECRET_ENV = {
    "NATS_PASSWORD",
    "ANTHROPIC_API_KEY",
    "REDIS_URL",
    "AOS_EXECUTOR_DATABASE_URL",
    "AOS_TRACER_DATABASE_URL",
    "AOS_PLANNER_DATABASE_URL",
}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = run_tool(tool("kubectl"), "kustomize", str(INFRA / "k8s" / "overlays" / request.param))
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(out.stdout)
    return path


def _objects(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(path.read_text())
    }


def test_both_overlays_exist() -> None:
    assert OVERLAYS == ["dev", "prod"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_validate_strictly(rendered: Path, version: str | None) -> None:
    args = [tool("kubernetes-validate"), "--strict", "--quiet"]
    if version:
        args += ["-k", version]
    result = subprocess.run(
        [*args, str(rendered)], capture_output=True, text=True, timeout=120, check=False
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "Couldn't find schema" not in line
    ]
    assert result.returncode == 0 and not problems, "\n".join(problems)


def test_every_service_is_deployed_the_way_operations_needs(rendered: Path) -> None:
    objects = _objects(rendered)
    for name in SERVICES:
        deployment = objects[("Deployment", f"aos-{name}")]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == [f"aos-{name}"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"requests", "limits"} <= set(container["resources"])
        # The consumer finishes its batch within 10 s of SIGTERM; the grace covers it.
        assert pod["terminationGracePeriodSeconds"] > 10
        assert ("Service", f"aos-{name}") in objects
        assert ("PodDisruptionBudget", f"aos-{name}") in objects
        config_refs = [ref["configMapRef"]["name"] for ref in container["envFrom"]]
        assert all(("ConfigMap", ref) in objects for ref in config_refs)
        # Secrets are referenced, never part of the render.
        assert not any(kind == "Secret" for kind, _ in objects)
        for env in container["env"]:
            if env["name"] in SECRET_ENV:
                assert "secretKeyRef" in env["valueFrom"], env


def test_keda_scales_the_executor_on_its_own_consumers(rendered: Path) -> None:
    objects = _objects(rendered)
    scaled = objects[("ScaledObject", "aos-executor")]["spec"]
    assert ("Deployment", scaled["scaleTargetRef"]["name"]) in objects
    assert scaled["minReplicaCount"] >= 1 and scaled["maxReplicaCount"] > scaled["minReplicaCount"]
    triggers = scaled["triggers"]
    assert {t["type"] for t in triggers} == {"nats-jetstream"}
    assert {t["metadata"]["consumer"] for t in triggers} == {"executor"}
    assert {t["metadata"]["stream"] for t in triggers} <= {"AOS_PLANS", "AOS_BUDGET", "AOS_GOALS"}


def test_prometheus_scrapes_every_service_by_port_name(rendered: Path) -> None:
    objects = _objects(rendered)
    monitor = objects[("ServiceMonitor", "aos")]["spec"]
    selector = monitor["selector"]["matchLabels"]
    ports = {endpoint["port"] for endpoint in monitor["endpoints"]}
    for name in SERVICES:
        service = objects[("Service", f"aos-{name}")]
        assert selector.items() <= service["metadata"]["labels"].items()
        assert ports <= {port["name"] for port in service["spec"]["ports"]}


def test_the_prometheus_rule_is_the_promtool_tested_rules(rendered: Path) -> None:
    rule = _objects(rendered)[("PrometheusRule", "aos")]
    source = yaml.safe_load((INFRA / "prometheus" / "rules" / "aos.rules.yml").read_text())
    assert rule["spec"] == source


def test_the_generated_prometheus_rule_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(INFRA / "prometheus" / "to_k8s.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout


def test_each_deployment_runs_an_entry_point_of_the_one_image() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in dockerfile
    for name in SERVICES:
        assert f"aos-{name}" in scripts
        assert f'command: ["aos-{name}"]' in (INFRA / "k8s" / "base" / f"{name}.yaml").read_text()
