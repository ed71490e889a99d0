"""The deploy bundle, checked with each format's own tools where they run here.

- Prometheus config (host and compose variants): `promtool check config` (it also checks the
  rule files it loads);
- Alertmanager config: `amtool check-config`, and `amtool config routes test` for the
  severity routing;
- systemd unit: `systemd-analyze verify` (works without a running systemd);
- Kubernetes manifests: `kubernetes-validate --strict` against the API schemas it ships
  (offline); the Prometheus Operator kinds (ServiceMonitor, PrometheusRule) have no schema
  there and are checked for what wires them up; `kubectl kustomize` builds the bundle;
- compose file: the compose-spec JSON schema (check-jsonschema's vendored copy, offline) and
  every path it mounts; `docker compose` itself is not installed here;
- the daemon configs in the bundle: `vllm-exporter check-config`;
- Grafana provisioning: the provider path is where compose mounts the dashboards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "vllm-exporter.rules.yml"
BIN = Path(sys.executable).parent


INSTALL = {
    "promtool": "apt-get install prometheus",
    "amtool": "apt-get install prometheus-alertmanager",
    "systemd-analyze": "apt-get install systemd",
    "kubectl": "apt-get install kubernetes-client",
    "kubernetes-validate": "pip install kubernetes-validate",
    "check-jsonschema": "pip install check-jsonschema",
}


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed ({INSTALL[name]})")
    return path


def run(*args: str, cwd: Path | None = None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- Prometheus -------------------------------------------------------------------------------

def _without_rule_files(config: Path, tmp_path: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    data.pop("rule_files", None)
    out = tmp_path / config.name
    out.write_text(yaml.safe_dump(data))
    return out


def test_prometheus_config_is_valid_without_its_rules(tmp_path):
    """Independent of the rule file, so a missing rule file is reported by the next test only."""
    promtool = tool("promtool")
    for config in (DEPLOY / "prometheus" / "prometheus.yml",
                   DEPLOY / "compose" / "prometheus.yml"):
        result = run(promtool, "check", "config", str(_without_rule_files(config, tmp_path)))
        assert result.returncode == 0, f"{config}: {result.stdout}{result.stderr}"


def test_prometheus_config_with_the_exported_rules():
    promtool = tool("promtool")
    config = DEPLOY / "prometheus" / "prometheus.yml"
    rule_files = yaml.safe_load(config.read_text())["rule_files"]
    assert [(config.parent / f).resolve() for f in rule_files] == [RULES_FILE.resolve()]
    if not RULES_FILE.exists():
        pytest.fail(f"{RULES_FILE} is missing: run vllm-exporter rules export")
    result = run(promtool, "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "rules found" in result.stdout


def test_prometheus_config_scrapes_the_daemon_and_alerts_to_alertmanager():
    for config, target, am in ((DEPLOY / "prometheus" / "prometheus.yml", "127.0.0.1:9410",
                                "127.0.0.1:9093"),
                               (DEPLOY / "compose" / "prometheus.yml", "vllm-exporter:9410",
                                "alertmanager:9093")):
        data = yaml.safe_load(config.read_text())
        jobs = {j["job_name"]: j for j in data["scrape_configs"]}
        targets = [t for sc in jobs["vllm-exporter"]["static_configs"] for t in sc["targets"]]
        assert targets == [target], config
        ams = [t for a in data["alerting"]["alertmanagers"] for sc in a["static_configs"]
               for t in sc["targets"]]
        assert ams == [am], config
    compose_rules = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert compose_rules["rule_files"] == ["/etc/prometheus/rules/vllm-exporter.rules.yml"]


def test_promtool_rejects_a_broken_config(tmp_path):
    """The check above can fail: a typo in a field is an error."""
    promtool = tool("promtool")
    broken = tmp_path / "prometheus.yml"
    broken.write_text((DEPLOY / "prometheus" / "prometheus.yml").read_text()
                      .replace("scrape_interval:", "scrape_intervall:"))
    assert run(promtool, "check", "config", str(broken)).returncode != 0


# --- Alertmanager -----------------------------------------------------------------------------

AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def test_alertmanager_config_is_valid():
    amtool = tool("amtool")
    result = run(amtool, "check-config", str(AM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("labels, receiver", [
    (["severity=critical", "alertname=VllmEngineDown"], "oncall"),
    (["severity=warning", "alertname=VllmKvCacheSaturated"], "team-slack"),
    (["severity=info"], "webhook"),
    (["alertname=SomethingElse"], "webhook"),
])
def test_alertmanager_routes_by_severity(labels, receiver):
    amtool = tool("amtool")
    result = run(amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_alertmanager_secrets_come_from_files_not_the_config():
    data = yaml.safe_load(AM_CONFIG.read_text())
    assert data["global"]["slack_api_url_file"].startswith("/etc/alertmanager/secrets/")
    assert data["global"]["smtp_auth_password_file"].startswith("/etc/alertmanager/secrets/")
    assert "slack_api_url" not in data["global"] and "smtp_auth_password" not in data["global"]
    kinds = {key for r in data["receivers"] for key in r if key.endswith("_configs")}
    assert kinds == {"slack_configs", "email_configs", "webhook_configs"}
    for receiver in data["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            assert hook["http_config"]["authorization"]["credentials_file"]
    severities = set(re.findall(r'severity="(\w+)"', AM_CONFIG.read_text()))
    assert severities >= {"critical", "warning", "info"}


# --- systemd ----------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "vllm-exporter.service"


def _verify_unit(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify, with the install path pointed at this checkout's console script
    (verify also checks that ExecStart= is executable)."""
    script = BIN / "vllm-exporter"
    unit = tmp_path / "vllm-exporter.service"
    unit.write_text(text.replace("/opt/vllm-exporter/bin/vllm-exporter", str(script)))
    return run(tool("systemd-analyze"), "verify", str(unit), cwd=tmp_path)


def test_systemd_unit_verifies(tmp_path):
    result = _verify_unit(UNIT.read_text(), tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def test_systemd_verify_catches_a_key_in_the_wrong_section(tmp_path):
    text = UNIT.read_text().replace("RestartSec=10s",
                                    "RestartSec=10s\nStartLimitIntervalSec=5min")
    result = _verify_unit(text, tmp_path)
    assert "Unknown key" in result.stderr


def test_systemd_unit_restarts_on_failure_and_can_reach_the_gpu():
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    settings = [line for line in lines if line and not line.startswith("#")]
    assert "Restart=on-failure" in settings
    assert "RestartPreventExitStatus=2" in settings  # bad config: do not loop
    assert "PrivateDevices=no" in settings and "DevicePolicy=closed" in settings
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm", "char-nvidia-frontend"):
        assert f"DeviceAllow={device} rw" in settings
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                      "PrivateTmp=yes", "ProtectKernelModules=yes"):
        assert hardening in settings


# --- Kubernetes -------------------------------------------------------------------------------

def test_kubernetes_manifests_validate_against_the_api_schemas():
    validate = tool("kubernetes-validate")
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    result = run(validate, "--strict", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = set(re.findall(r"passed for resource (\w+)/", result.stdout + result.stderr))
    assert passed >= {"deployment", "service", "configmap", "persistentvolumeclaim"}


def test_kubernetes_validator_rejects_a_broken_deployment(tmp_path):
    validate = tool("kubernetes-validate")
    broken = tmp_path / "deployment.yaml"
    broken.write_text((K8S / "deployment.yaml").read_text()
                      .replace("containerPort: 9410", "containerPort: metrics-port"))
    assert run(validate, "--strict", str(broken)).returncode != 0


def _by_kind() -> dict[str, dict]:
    docs = {}
    for path in K8S.glob("*.yaml"):
        for doc in load_all(path):
            docs.setdefault(doc["kind"], doc)
    return docs


def test_kubernetes_objects_are_wired_together():
    docs = _by_kind()
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod_labels = pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert service["spec"]["selector"].items() <= pod_labels
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service_labels = service["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config = yaml.safe_load((K8S / "configmap-config.yaml").read_text())
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    claim = load_all(K8S / "pvc-models.yaml")[0]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    daemon = yaml.safe_load(config["data"]["config.yaml"])
    assert daemon["metrics"]["port"] == ports["metrics"] and daemon["api"]["port"] == ports["api"]
    assert daemon["metrics"]["host"] == "0.0.0.0"
    assert "/etc/vllm-exporter/config.yaml" in container["args"]


def test_kubernetes_runs_a_fleet_whose_alerts_name_the_pod(monkeypatch):
    """N replicas; each pod's daemon labels its alerts with what Prometheus labels the pod's
    series (the ServiceMonitor's relabelings), so the two paths' alerts are one alert."""
    from exporter.alerts.config import AlertsConfig

    docs = _by_kind()
    deployment, monitor = docs["Deployment"], docs["ServiceMonitor"]
    assert deployment["spec"]["replicas"] >= 2
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0  # no extra pod (and GPU) during a rollout
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
           if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    # What Prometheus' target labels become for pod vllm-exporter-abc in namespace serving:
    pod, namespace, port = "vllm-exporter-abc", "serving", 9410
    meta = {"__meta_kubernetes_pod_name": pod, "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_container_port_number": str(port)}
    # the Operator's own target labels, then the ServiceMonitor's relabelings
    target = {"job": docs["Service"]["metadata"]["name"], "instance": f"10.0.0.7:{port}",
              "namespace": namespace, "pod": pod, "service": "vllm-exporter",
              "container": "vllm-exporter", "endpoint": "metrics"}
    for step in monitor["spec"]["endpoints"][0]["relabelings"]:
        if step.get("action") == "labeldrop":
            target = {k: v for k, v in target.items() if not re.fullmatch(step["regex"], k)}
        else:
            value = step.get("separator", ";").join(meta[s] for s in step["sourceLabels"])
            target[step["targetLabel"]] = value
    monkeypatch.setenv("POD_NAME", pod)
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    k8s = yaml.safe_load(yaml.safe_load((K8S / "configmap-config.yaml").read_text())
                         ["data"]["config.yaml"])
    alerts = AlertsConfig(instance=k8s["alerts"]["instance"],
                          external_labels=k8s["alerts"]["external_labels"])
    assert not alerts.problems()
    assert alerts.replica_labels(k8s["metrics"]["port"]) == target


def test_prometheusrule_matches_the_rules_file():
    path = K8S / "prometheusrule.yaml"
    if not path.exists() or not RULES_FILE.exists():
        pytest.fail("prometheusrule.yaml or the rules file is missing: run vllm-exporter rules "
                    "export")
    rule = load_all(path)[0]
    assert rule["kind"] == "PrometheusRule"
    exprs = sorted(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert exprs == sorted(r["expr"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"]
                           for r in g["rules"])


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def test_kustomize_builds_the_bundle():
    kubectl = tool("kubectl")
    result = run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim",
                            "PrometheusRule", "Service", "ServiceMonitor"])


# --- compose ----------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose" / "compose.yaml"


def test_compose_file_matches_the_compose_spec():
    check = tool("check-jsonschema")
    result = run(check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_typo(tmp_path):
    check = tool("check-jsonschema")
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    ports:\n", "    portz:\n", 1))
    assert run(check, "--builtin-schema", "vendor.compose-spec", str(broken)).returncode != 0


def test_compose_runs_the_four_services_with_mounts_that_exist():
    data = yaml.safe_load(COMPOSE.read_text())
    assert set(data["services"]) == {"vllm-exporter", "prometheus", "alertmanager", "grafana"}
    daemon = data["services"]["vllm-exporter"]
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert (COMPOSE.parent / daemon["build"]["context"] / daemon["build"]["dockerfile"]).exists()
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
    for name, secret in data["secrets"].items():
        assert secret["file"].startswith("./secrets/"), name  # made by the user (docs/deploy.md)


# --- the daemon configs and Grafana provisioning in the bundle -----------------------------------

def test_the_bundled_daemon_configs_pass_check_config(tmp_path):
    from exporter.default_model import ensure_default_model

    model = str(ensure_default_model())  # the bundles name a model that is not here
    k8s = yaml.safe_load((K8S / "configmap-config.yaml").read_text())["data"]["config.yaml"]
    (tmp_path / "k8s.yaml").write_text(k8s)
    # what the Deployment's downward API gives each pod (the k8s config reads them)
    env = {**os.environ, "POD_NAME": "vllm-exporter-0", "POD_NAMESPACE": "serving"}
    for config in (DEPLOY / "compose" / "vllm-exporter.yaml", tmp_path / "k8s.yaml"):
        result = run(sys.executable, "-m", "exporter", "check-config", "--config", str(config),
                     "--model", model, cwd=ROOT, env=env)
        assert result.returncode == 0, f"{config}: {result.stdout}{result.stderr}"


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/vllm-exporter.yml")
                              .read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["../../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../../grafana/provisioning"] == "/etc/grafana/provisioning"
    sources = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml")
                             .read_text())["datasources"]
    assert [s["type"] for s in sources] == ["prometheus"] and sources[0]["isDefault"]
    for dashboard in (ROOT / "grafana" / "dashboards").glob("*.json"):
        assert "${DS_" not in dashboard.read_text()
        assert json.loads(dashboard.read_text())["templating"]["list"][0]["type"] == "datasource"
