"""What an operator deploys works: the Kubernetes manifests pass the Kubernetes schemas and agree
with one another and with the daemon's flags, their health probe answers against a real daemon,
the alert rules pass promtool and its unit tests, a real daemon's /metrics passes promtool's
linter, and the dashboard and the rules ask only for metrics the daemon exports."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate
from prometheus_client.parser import text_string_to_metric_families

from support import MiB, metrics_text

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
TCP_COMPONENT = KUBERNETES / "tcp"
RULES = ROOT / "deploy" / "prometheus" / "sleepd-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "sleepd-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sleepd.json"

KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found on PATH (Debian's prometheus package; .ci/run fetches it)")

# The metric contract: the README's Metrics section, plus two counters of the daemon's own.
BEYOND_THE_README = {"sleepd_evictions_total", "sleepd_ranks_lost_total"}
HISTOGRAMS = {"sleepd_sleep_duration_seconds", "sleepd_wake_duration_seconds", "sleepd_wake_wait_seconds"}
# Kinds that kubernetes-validate has no schema for (custom resources, kustomize), checked by hand.
WITHOUT_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                  ("kustomize.config.k8s.io/v1beta1", "Kustomization")}


@pytest.fixture
def backend():
    """The deploy files do not depend on the memory backend: the host backend is enough."""
    return "host"


def contract() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"\bsleepd_[a-z0-9_]+", section)) | BEYOND_THE_README


def in_contract(name: str, names: set[str]) -> bool:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return name in names or (base in HISTOGRAMS and base in names)


_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)                   # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)                  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if match.group() in _NOT_METRICS or expr[match.end():].lstrip().startswith("("):
            continue  # a keyword, a function or an aggregation
        names.add(match.group())
    return names


def test_metric_names_are_read_out_of_promql():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model", x="y(z)"}[$__rate_interval])))'
        ' > 1e3 and on (instance) b:rate5m offset 5m / ignoring (le) c') == {"a_bucket", "b:rate5m", "c"}


def busy_scrape(daemon, start_engine) -> str:
    """/metrics after a sleep, a wake, a request that found the model asleep and a refusal, so that
    labelled metrics have samples."""
    engine = start_engine(daemon, "qwen", regions=[("weights", 4 * MiB), ("kv_cache", 2 * MiB)])
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    daemon.ctl("wake", "--model", "qwen")
    daemon.ctl("sleep", "--model", "qwen", "--level", "1")
    assert engine.request("ensure_awake")["woke"] is True
    assert daemon.ctl("wake", "--model", "nobody", check=False).returncode != 0
    return metrics_text(daemon)


def promtool(*args, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


# --- Kubernetes -------------------------------------------------------------------------------------


def manifests() -> dict[str, list[dict]]:
    files = sorted(KUBERNETES.glob("*.yaml")) + sorted(KUBERNETES.glob("*.yml"))
    assert files, f"no manifests in {KUBERNETES}"
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc] for path in files}


def resource(kind: str, name: str | None = None) -> dict:
    found = [doc for docs in manifests().values() for doc in docs
             if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_env(container: dict) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container.get("env", [])}


def host_path_mounts(pod_spec: dict, container: dict) -> dict[str, str]:
    """mountPath -> hostPath path of every host directory the container mounts."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, f"volumeMount {mount['name']} names no volume"
        if "hostPath" in volumes[mount["name"]]:
            mounts[mount["mountPath"]] = volumes[mount["name"]]["hostPath"]["path"]
    return mounts


def sleepd_container() -> tuple[dict, dict]:
    spec = resource("DaemonSet", "sleepd")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "sleepd"]
    return spec, container


@pytest.mark.parametrize("version", sorted(set(kubernetes_validate.all_versions()),
                                           key=lambda v: tuple(map(int, v.split(".")))))
def test_every_manifest_passes_the_kubernetes_schema(version):
    errors, unchecked = [], []
    for name, docs in manifests().items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unchecked.append((doc["apiVersion"], doc["kind"]))
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(item) for item in error.path)
                errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}")
    assert not errors, "\n".join(errors)
    assert set(unchecked) <= WITHOUT_SCHEMA, f"no schema for {set(unchecked) - WITHOUT_SCHEMA}"


def test_the_daemonset_runs_one_sleepd_per_gpu_node():
    daemonset = resource("DaemonSet", "sleepd")
    assert daemonset["metadata"]["namespace"] == "sleepd"
    spec, container = sleepd_container()
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["runtimeClassName"] == "nvidia"
    env = container_env(container)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # The daemon takes no GPU from the device plugin: the engines' requests would then fail.
    assert not any("nvidia.com/gpu" in container.get("resources", {}).get(kind, {}) for kind in ("limits", "requests"))
    # A memory limit would OOM-kill the daemon, and every model's memory with it, as the pool fills.
    assert "memory" not in container.get("resources", {}).get("limits", {})
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


def test_the_daemonsets_flags_are_sleepds_flags_and_its_paths_are_mounted_from_the_host(tmp_path):
    from sleepd.daemon.main import parse_args

    spec, container = sleepd_container()
    env = container_env(container)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    # The metrics token comes from the Secret the ServiceMonitor presents, readable by the daemon alone.
    token_file = argv[argv.index("--metrics-token-file") + 1]
    (secret,) = [volume["secret"] for volume in spec["volumes"] if "secret" in volume and any(
        mount["name"] == volume["name"] and mount["mountPath"] == os.path.dirname(token_file)
        for mount in container["volumeMounts"])]
    assert secret["defaultMode"] == 0o400
    (endpoint,) = resource("ServiceMonitor", "sleepd")["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": secret["secretName"],
                                                                           "key": os.path.basename(token_file)}}
    stand_in = tmp_path / "token"
    stand_in.write_text("a token")
    stand_in.chmod(0o400)
    argv[argv.index(token_file)] = str(stand_in)
    args = parse_args(argv)  # exits (fails the test) on a flag sleepd does not know
    mounts = host_path_mounts(spec, container)

    assert args.socket == env["SLEEPD_SOCKET"]
    assert mounts[os.path.dirname(args.socket)] == "/run/sleepd"
    assert mounts[args.host_pool_dir] == "/dev/shm/sleepd"   # on the host's tmpfs, outliving the pod
    assert mounts[args.state_dir] == "/var/lib/sleepd"
    host, _, port = args.metrics_address.rpartition(":")
    assert host == "0.0.0.0"
    assert {"name": "metrics", "containerPort": int(port), "protocol": "TCP"} in container["ports"]


def test_the_service_and_the_servicemonitor_reach_the_metrics_port():
    pod_labels = resource("DaemonSet", "sleepd")["spec"]["template"]["metadata"]["labels"]
    _, container = sleepd_container()
    service = resource("Service", "sleepd")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}

    monitor = resource("ServiceMonitor", "sleepd")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                                    "podTargetLabels", "sampleLimit"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                                 "relabelings", "metricRelabelings", "authorization"}
        assert endpoint["port"] == port["name"]
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
        for relabeling in endpoint.get("relabelings", []):
            assert set(relabeling) <= {"sourceLabels", "separator", "targetLabel", "regex", "modulus",
                                       "replacement", "action"}


def test_everything_lives_in_the_sleepd_namespace_and_kustomize_applies_all_but_the_example():
    namespace = resource("Namespace", "sleepd")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    kustomization = resource("Kustomization")
    listed = set(kustomization["resources"])
    assert listed == set(manifests()) - {"kustomization.yaml", "example-engine.yaml"}
    for name in listed:
        for doc in manifests()[name]:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "sleepd", f"{name}: {doc['kind']}"


def test_the_example_engine_mounts_the_daemons_socket_directory():
    daemon_spec, daemon = sleepd_container()
    engine_pod = resource("Pod", "engine-example")["spec"]
    (engine,) = engine_pod["containers"]
    socket = container_env(engine)["SLEEPD_SOCKET"]
    daemon_socket_dir = host_path_mounts(daemon_spec, daemon)[os.path.dirname(container_env(daemon)["SLEEPD_SOCKET"])]
    assert host_path_mounts(engine_pod, engine)[os.path.dirname(socket)] == daemon_socket_dir
    # Both see GPUs without taking them from the device plugin; the daemon sees every one.
    assert container_env(daemon)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert container_env(engine)["NVIDIA_VISIBLE_DEVICES"]
    assert "compute" in container_env(engine)["NVIDIA_DRIVER_CAPABILITIES"]


def secret_volumes(node) -> list[dict]:
    """Every secret volume source in a parsed YAML document, however deep."""
    if isinstance(node, list):
        return [found for item in node for found in secret_volumes(item)]
    if not isinstance(node, dict):
        return []
    own = [node["secret"]] if isinstance(node.get("secret"), dict) and "secretName" in node["secret"] else []
    return own + [found for value in node.values() for found in secret_volumes(value)]


def test_every_secret_the_deploy_files_mount_is_readable_by_its_owner_alone():
    """sleepd refuses to start on a key or token other users may read, symlinks followed."""
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for volume in secret_volumes(doc):
                assert volume.get("defaultMode") == 0o400, f"{path.name}: secret {volume['secretName']}"
                found.append(volume["secretName"])
    assert "sleepd-tcp" in found


def tcp_component_patch() -> dict:
    component = yaml.safe_load((TCP_COMPONENT / "kustomization.yaml").read_text())
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    (patch,) = component["patches"]
    return yaml.safe_load((TCP_COMPONENT / patch["path"]).read_text())


def test_the_tcp_component_gives_the_daemon_its_tls_files_and_token_from_one_secret():
    from sleepd.daemon.config_model import SETTINGS

    patch = tcp_component_patch()
    assert (patch["kind"], patch["metadata"]["name"]) == ("DaemonSet", "sleepd")
    spec = patch["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "sleepd"
    env = container_env(container)
    settings = {setting.env: setting.key for setting in SETTINGS}
    assert {settings.get(name) for name in env} == {"tcp.address", "tcp.cert", "tcp.key", "tcp.token_file"}
    (mount,) = container["volumeMounts"]
    (volume,) = [volume for volume in spec["volumes"] if volume["name"] == mount["name"]]
    assert mount["readOnly"] and volume["secret"] == {"secretName": "sleepd-tcp", "defaultMode": 0o400}
    for name in ("SLEEPD_TCP_CERT", "SLEEPD_TCP_KEY", "SLEEPD_TCP_TOKEN_FILE"):
        assert os.path.dirname(env[name]) == mount["mountPath"], name
    port = int(env["SLEEPD_TCP_ADDRESS"].rpartition(":")[2])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    # No fsGroup: the kubelet would add group read to the secret's files, and the daemon would not start.
    assert "fsGroup" not in resource("DaemonSet", "sleepd")["spec"]["template"]["spec"].get("securityContext", {})


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not found on PATH")
def test_the_daemonset_with_the_tcp_component_passes_the_kubernetes_schema(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(KUBERNETES, tmp_path)],
        "components": [os.path.relpath(TCP_COMPONENT, tmp_path)]}))
    built = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    (daemonset,) = [doc for doc in yaml.safe_load_all(built.stdout) if doc and doc["kind"] == "DaemonSet"]
    newest = max(set(kubernetes_validate.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    kubernetes_validate.validate(daemonset, newest, strict=True)
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container_env(container).items() >= container_env(tcp_component_patch()["spec"]["template"]["spec"]
                                                               ["containers"][0]).items()
    assert {"SLEEPD_SOCKET", "NVIDIA_VISIBLE_DEVICES"} <= set(container_env(container))  # the base's, kept


def probe_commands() -> list[list[str]]:
    _, container = sleepd_container()
    commands = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        commands.append([sys.executable if part == "python3" else part for part in command])
    return commands


def test_the_health_probe_passes_on_a_running_daemon_and_fails_once_it_is_gone(daemon):
    commands = probe_commands()
    env = {**os.environ, "SLEEPD_SOCKET": daemon.socket}
    for command in commands:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    daemon.stop()
    for command in commands:
        assert subprocess.run(command, env=env, capture_output=True, text=True, timeout=30).returncode != 0


# --- Prometheus ---------------------------------------------------------------------------------------


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_has_a_severity_a_summary_and_a_description():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {"SleepdWakeSlow", "SleepdHostPoolNearBudget", "SleepdRankLost",
                                                 "SleepdRepeatedEvictions"}
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]


def test_the_alert_rules_ask_only_for_metrics_in_the_contract():
    names, used = contract(), set()
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]):
            assert name == "up" or in_contract(name, names), f"{rule['alert']}: {name} is not a sleepd metric"
            used.add(re.sub(r"_bucket$", "", name))
    assert used >= {"sleepd_wake_duration_seconds", "sleepd_host_pool_used_bytes", "sleepd_host_pool_budget_bytes",
                    "sleepd_ranks_lost_total", "sleepd_evictions_total"}


def test_every_alert_is_unit_tested_firing():
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert {rule["alert"] for rule in alert_rules()} <= tested


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_alert_rules_fire_on_their_stories_and_only_on_them():
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_a_live_daemons_metrics_pass_promtools_linter(daemon, start_engine):
    result = promtool("check", "metrics", stdin=busy_scrape(daemon, start_engine))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_a_live_daemon_exports_every_metric_in_the_contract_with_its_type(daemon, start_engine):
    exported = {}
    for family in text_string_to_metric_families(busy_scrape(daemon, start_engine)):
        exported[family.name + ("_total" if family.type == "counter" else "")] = family.type
    for name in contract():
        expected = "histogram" if name in HISTOGRAMS else "counter" if name.endswith("_total") else "gauge"
        assert exported.get(name) == expected, f"{name}: exported as {exported.get(name)}, expected {expected}"


# --- Grafana ------------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    flat = []
    for panel in panels:
        flat.append(panel)
        flat.extend(all_panels(panel.get("panels", [])))
    return flat


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""
    board = dashboard()
    queries = [(f"panel {panel['title']!r} target {target['refId']}", target["expr"])
               for panel in all_panels(board["panels"]) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: {query}"
            queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = all_panels(board["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    taken = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]


def test_the_dashboard_asks_only_for_metrics_in_the_contract():
    names, used = contract(), set()
    for where, expr in dashboard_queries():
        for name in promql_metric_names(expr):
            assert in_contract(name, names), f"{where}: {name} is not in the metric contract"
            used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used >= {"sleepd_region_bytes", "sleepd_device_used_bytes", "sleepd_device_capacity_bytes",
                    "sleepd_host_pool_used_bytes", "sleepd_host_pool_budget_bytes", "sleepd_sleep_duration_seconds",
                    "sleepd_wake_duration_seconds", "sleepd_moved_bytes_total", "sleepd_evictions_total",
                    "sleepd_sessions", "sleepd_errors_total"}


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    grafana_variables = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                         "$instance": ".*", "$model": ".*"}
    rules = []
    for index, (where, expr) in enumerate(dashboard_queries()):
        for variable, value in sorted(grafana_variables.items(), key=lambda item: -len(item[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
