"""What can be checked of deploy/ without a Docker engine or a cluster (there is neither
here, nor network at test time): the compose file against the Compose Specification's JSON
schema, the Kubernetes manifests against the official schemas shipped by kubernetes-validate,
the KEDA ScaledObject against its CRD's schema, the Prometheus config against the compose
services, the OpenTelemetry Collector's config against its pipeline and the compose services,
the Dockerfile's stages and commands, and every LLMQ_* variable against the settings
classes. What none of this proves (that the images build, the containers start and talk to
each other) is listed in deploy/README.md."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as k8s_validate
from opentelemetry.sdk.trace import TracerProvider

from deploy.client import ClientSettings
from deploy.settings import StackSettings
from gateway.main import parse_settings as gateway_parse
from scaler.main import parse as scaler_parse
from scaler.settings import ScalerSettings
from shared.settings import ServiceSettings, env_names
from workers.main import parse_settings as worker_parse
from workers.training.main import parse_settings as trainer_parse
from workers.training.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COLLECTOR_FILE = DEPLOY / "otel-collector.yaml"
# Upstream compose-spec schema/compose-spec.json, as shipped byte for byte in the npm package
# dclint 3.1.0 (package/schemas/compose.schema.json); see deploy/schemas/README.md.
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
KEDA_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject-v1alpha1.json"
KEDA_FILE = K8S / "keda-scaledobject.yaml"  # written by another part of the project
# The oldest Kubernetes the manifests promise to work on, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.31", k8s_validate.latest_version())
LLMQ_ROLES = ("gateway", "worker", "scaler", "trainer")
LLMQ_SERVICES = ("gateway", "worker-cpu", "worker", "scaler", "trainer")


# ---- helpers ---------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's variable interpolation with no variables set (or `env`): what `docker
    compose config` would see on a clean host. `$$` is a literal `$`."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name", "op", "default")
        if op and op.endswith("?"):
            raise AssertionError(f"${{{name}{op}...}} makes `docker compose config` fail when {name} is unset")
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        return default or ""

    return _INTERPOLATION.sub(replace, value)


def load_compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()))


def k8s_documents() -> list[tuple[str, dict]]:
    """(file name, document) of every Kubernetes object in deploy/k8s, KEDA's included."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_args(command) -> list[str]:
    return command if isinstance(command, list) else command.split()


# ---- YAML and JSON parse ---------------------------------------------------------------------

def test_every_deploy_file_parses():
    yamls = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(yamls) >= 8
    for path in yamls:
        assert list(yaml.safe_load_all(path.read_text())), path
    for path in sorted(DEPLOY.rglob("*.json")):
        json.loads(path.read_text())


# ---- docker compose --------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification_schema():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert errors == []
    # the schema is strict enough to catch a typo
    broken = load_compose()
    broken["services"]["gateway"]["enviroment"] = {}
    assert not validator.is_valid(broken)


def test_compose_has_the_whole_stack():
    services = load_compose()["services"]
    assert {"kafka", "kafka-init", "redis", "jaeger", "otel-collector", "prometheus", "gateway", "worker", "worker-cpu",
            "scaler"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "--appendonly yes" in " ".join(command_args(services["redis"]["command"]))
    # the Jaeger UI on the host; OTLP from the host goes through the collector's sampling
    assert {p.rsplit(":", 1)[-1] for p in services["jaeger"]["ports"]} == {"16686"}
    assert {p.rsplit(":", 1)[-1] for p in services["otel-collector"]["ports"]} == {"4317", "4318"}
    # the default profile runs the CPU worker with the torch engine; the GPU one is opt-in
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker"]["profiles"] == ["gpu"]
    assert environment(services["worker-cpu"])["LLMQ_ENGINE"] == "torch"
    assert services["worker"]["build"]["args"]["VARIANT"] == "cuda"
    assert services["worker-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    # all services depend only on services that exist
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, (name, dependency)


def test_kafka_is_a_single_kraft_node_reachable_as_the_settings_say():
    services = load_compose()["services"]
    kafka = environment(services["kafka"])
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node_id = kafka["KAFKA_NODE_ID"]
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:9093"
    listeners = dict(item.split("://", 1) for item in kafka["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols)
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    # what llmq's containers connect to is what the broker advertises to them
    for name in LLMQ_SERVICES:
        assert environment(services[name])["LLMQ_KAFKA_BOOTSTRAP"] == advertised["PLAINTEXT"], name


def test_topics_are_created_before_llmq_starts_with_the_partitions_of_the_settings():
    services = load_compose()["services"]
    script = " ".join(command_args(services["kafka-init"]["command"]))
    creates = re.findall(r"--create --if-not-exists\s*\\?\s*--topic (\S+) --partitions (\d+)", script)
    topics = dict(creates)
    gateway_env = environment(services["gateway"])
    bulk_topic = gateway_env.get("LLMQ_BULK_TOPIC") or f"{gateway_env['LLMQ_REQUEST_TOPIC']}.bulk"
    webhooks = ServiceSettings()  # the compose file leaves the webhook and fine-tuning topics at their defaults
    assert set(topics) == {gateway_env["LLMQ_REQUEST_TOPIC"], bulk_topic, gateway_env["LLMQ_DLQ_TOPIC"],
                           webhooks.webhook_topic, webhooks.webhook_dlq_topic, webhooks.fine_tuning_topic}
    assert topics[webhooks.fine_tuning_topic] == str(webhooks.fine_tuning_partitions)
    assert topics["llmq.requests"] == topics[bulk_topic] == gateway_env["LLMQ_REQUEST_PARTITIONS"] == "8"
    assert topics[webhooks.webhook_topic] == "8"  # as many gateways as partitions share the deliveries
    for name in LLMQ_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["kafka-init"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_llmq_services_trace_to_the_collector_under_their_own_names_sampling_nothing_away():
    """In compose the collector samples (tail sampling sees whole traces, errors and slow ones
    included), so the processes' own sampler keeps every trace; the SDK reads these values."""
    services = load_compose()["services"]
    collector = services["otel-collector"]
    names = {"gateway": "llmq-gateway", "worker-cpu": "llmq-worker", "worker": "llmq-worker", "scaler": "llmq-scaler"}
    for service, otel_name in names.items():
        env = environment(services[service])
        assert env["OTEL_SERVICE_NAME"] == otel_name
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector" and str(endpoint.port) in collector["expose"]
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf" and endpoint.port == 4318
        assert sdk_sampler(env).startswith("ParentBased{root:AlwaysOnSampler,")
        assert env["LLMQ_HTTP_HOST"] == "0.0.0.0"
        assert env["LLMQ_METRICS_HOST"] == "0.0.0.0"  # where a worker's /metrics listens
    # head sampling stays a variable away: OTEL_TRACES_SAMPLER(_ARG) on the host reach the processes
    env = environment(interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"})["services"]["gateway"])
    assert sdk_sampler(env).startswith("ParentBased{root:TraceIdRatioBased{0.1},")


def sdk_sampler(env: dict[str, str]):
    """The sampler the OpenTelemetry SDK builds from these OTEL_TRACES_SAMPLER(_ARG) values, as
    it describes itself."""
    names = ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")
    with pytest.MonkeyPatch.context() as patch:
        for name in names:
            patch.setenv(name, env[name]) if name in env else patch.delenv(name, raising=False)
        return TracerProvider().sampler.get_description()


def collector_config() -> dict:
    return yaml.safe_load(COLLECTOR_FILE.read_text())


def test_collector_pipeline_uses_only_components_it_defines_and_exports_to_jaeger():
    """What `otelcol validate` would check first (there is no collector binary here): each
    component a pipeline names is configured, and the addresses point at compose services."""
    config, services = collector_config(), load_compose()["services"]
    [pipeline] = config["service"]["pipelines"].values()
    assert set(config["service"]["pipelines"]) == {"traces"}
    for kind in ("receivers", "processors", "exporters"):
        assert pipeline[kind] and set(pipeline[kind]) <= set(config[kind]), kind
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    # the memory limiter first, tail sampling before batching (it regroups spans by trace)
    assert pipeline["processors"][0] == "memory_limiter"
    assert pipeline["processors"].index("tail_sampling") < pipeline["processors"].index("batch")
    # OTLP in on both standard ports, the ones compose publishes
    protocols = config["receivers"]["otlp"]["protocols"]
    assert {protocols["grpc"]["endpoint"].rsplit(":", 1)[1], protocols["http"]["endpoint"].rsplit(":", 1)[1]} == \
        set(services["otel-collector"]["expose"]) - {"13133"}
    [exporter] = pipeline["exporters"]
    assert exporter.split("/")[0] == "otlp_http"
    target = urlsplit(config["exporters"][exporter]["endpoint"])
    assert target.hostname == "jaeger" and str(target.port) in services["jaeger"]["expose"]
    # compose runs it with this very file
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:") and ":latest" not in collector["image"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in collector["volumes"]}
    [config_flag] = [a for a in command_args(collector["command"]) if a.startswith("--config=")]
    assert mounted[config_flag.removeprefix("--config=")] == "./" + COLLECTOR_FILE.name


def test_collector_keeps_every_error_and_slow_trace_and_a_share_of_the_rest():
    sampling = collector_config()["processors"]["tail_sampling"]
    policies = {p["type"]: p for p in sampling["policies"]}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert 0 < policies["latency"]["latency"]["threshold_ms"] and "upper_threshold_ms" not in policies["latency"]["latency"]
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100
    # no policy that drops: a trace is kept when any one says so
    assert set(policies) == {"status_code", "latency", "probabilistic"}
    # the decision waits for the worker's spans of an ordinary request; kept traces' late spans follow
    assert int(sampling["decision_wait"].removesuffix("s")) >= 30
    assert sampling["decision_cache"]["sampled_cache_size"] >= sampling["num_traces"]


def test_gpu_reservation_is_there_to_uncomment():
    """The GPU worker's `deploy:` block is commented out (it fails on hosts without the
    NVIDIA toolkit); uncommented, it is valid Compose that reserves an NVIDIA GPU."""
    text = COMPOSE_FILE.read_text()
    block = text[text.index("\n  worker:\n"):text.index("\n  scaler:\n")].splitlines()
    start = block.index("    # deploy:")
    commented = [block[start]]
    for line in block[start + 1:]:
        if not line.startswith("    #   "):
            break
        commented.append(line)
    deploy = yaml.safe_load("\n".join(line.replace("# ", "", 1) for line in commented))
    reserved = deploy["deploy"]["resources"]["reservations"]["devices"][0]
    assert reserved == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    services = load_compose()["services"]
    services["worker"].update(deploy)
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate({"services": services})


def test_llmq_commands_parse_with_the_real_command_lines():
    """Each llmq service runs a console script of pyproject with flags that script accepts."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = {"gateway": gateway_parse, "worker": worker_parse, "scaler": scaler_parse, "trainer": trainer_parse}
    services = load_compose()["services"]
    runs = []
    for name in LLMQ_SERVICES:
        args = command_args(services[name]["command"])
        if args[:2] == ["sh", "-c"]:
            exec_line = [line for line in args[2].splitlines() if line.strip().startswith("exec ")][0]
            args = exec_line.split()[1:]
        runs.append(args)
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            runs += [c["command"] + c.get("args", []) for c in doc["spec"]["template"]["spec"]["containers"]]
    runs = [run[2].split("exec ", 1)[1].split() if run[:2] == ["sh", "-c"] else run for run in runs]
    assert {run[0] for run in runs} == set(LLMQ_ROLES)
    for run in runs:
        assert run[0] in scripts, run
        parsers[run[0]](run[1:])  # argparse exits on an unknown flag


# ---- Prometheus ------------------------------------------------------------------------------

def test_prometheus_scrapes_services_and_ports_that_exist_in_compose():
    """promtool is not available here: the config is parsed and each target checked against
    the compose services (host = service name, port = one the service exposes)."""
    services = load_compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets: dict[str, set[tuple[str, str]]] = {}
    for job in config["scrape_configs"]:
        assert set(job) <= {"job_name", "metrics_path", "scrape_interval", "static_configs", "dns_sd_configs"}, job
        found = targets.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            found |= {tuple(t.rsplit(":", 1)) for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            found |= {(name, str(dns["port"])) for name in dns["names"]}
    assert {"llmq-gateway", "llmq-worker", "llmq-scaler"} <= set(targets)
    for job, hosts in targets.items():
        for host, port in hosts:
            if host == "localhost":
                continue
            assert host in services, (job, host)
            exposed = {str(p) for p in services[host].get("expose", [])}
            exposed |= {str(p).rsplit(":", 1)[-1] for p in services[host].get("ports", [])}
            assert port in exposed, (job, host, port)
    # and the ports are the ones the processes listen on
    assert ("gateway", environment(services["gateway"])["LLMQ_HTTP_PORT"]) in targets["llmq-gateway"]
    for worker in ("worker", "worker-cpu"):
        assert (worker, environment(services[worker])["LLMQ_METRICS_PORT"]) in targets["llmq-worker"]
    assert ("scaler", environment(services["scaler"])["LLMQ_SCALER_METRICS_PORT"]) in targets["llmq-scaler"]


def test_grafana_dashboard_queries_metrics_that_llmq_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "llmq-overview.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"\bllmq_[a-z_]+[a-z]", " ".join(exprs)))
    sources = "".join(p.read_text() for d in ("gateway", "workers", "scaler") for p in (ROOT / d).rglob("*.py"))
    for metric in used:
        base = re.sub(r"_(bucket|sum|count|total)$", "", metric)
        if base == "llmq_scaler_":  # the regex selector over all scaler metrics
            continue
        assert f'"{base}' in sources, metric


# ---- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_with_cpu_and_cuda_variants_and_a_non_root_user():
    """No Docker engine here: the Dockerfile is parsed line by line (continuations joined)."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    stages = [re.match(r"FROM\s+\S+\s+AS\s+(\S+)", i, re.I) for i in instructions if i.upper().startswith("FROM ")]
    assert [s.group(1) for s in stages if s] == ["build", "runtime"]
    assert any("COPY --from=build" in i for i in instructions)
    assert "ARG VARIANT=cpu" in instructions
    assert "https://download.pytorch.org/whl/cpu" in text and "cuda)" in text
    assert any(re.match(r"ARG PYTHON_IMAGE=python:3\.11-slim$", i) for i in instructions)
    assert [i for i in instructions if i.startswith("USER ")] == ["USER llmq"]
    assert instructions[-1] == 'CMD ["gateway"]'
    # the context is the repository root: everything it copies exists there
    for instruction in instructions:
        if instruction.startswith("COPY ") and "--from" not in instruction:
            for source in instruction.split()[1:-1]:
                assert (ROOT / source).exists(), source
    # the role commands are console scripts of the project
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(LLMQ_ROLES) <= set(scripts)


# ---- Kubernetes ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_official_schemas(version):
    """kubernetes-validate ships the schemas of each Kubernetes release and needs no network;
    strict: unknown fields are errors too."""
    checked = 0
    for name, doc in k8s_documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        k8s_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 12
    broken = by_kind("Deployment")["llmq-gateway"]
    broken["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(broken, version, strict=True)


def test_kubernetes_processes_head_sample_a_tenth_of_traces():
    """No collector ships with the manifests, so the processes sample: the gateway decides by
    trace id, the workers follow the parent's flag (parentbased); the SDK reads these values."""
    config = by_kind("ConfigMap")["llmq-config"]["data"]
    assert sdk_sampler(config).startswith("ParentBased{root:TraceIdRatioBased{0.1},")
    # every llmq process reads the ConfigMap
    for name, deployment in by_kind("Deployment").items():
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert {"configMapRef": {"name": "llmq-config"}} in container["envFrom"], name


def test_kustomization_lists_every_manifest_but_keda():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", KEDA_FILE.name}
    assert listed == present
    assert all(doc["metadata"].get("namespace", "llmq") == "llmq" for name, doc in k8s_documents()
               if name in listed and doc["kind"] != "Namespace")


def test_the_scalers_may_scale_the_worker_and_trainer_deployments_and_nothing_else():
    role = by_kind("Role")["llmq-scaler"]
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                              "resourceNames": ["llmq-worker", "llmq-trainer"], "verbs": ["get", "patch", "update"]}]
    binding = by_kind("RoleBinding")["llmq-scaler"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "llmq-scaler"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmq-scaler", "namespace": "llmq"}]
    assert "llmq-scaler" in by_kind("ServiceAccount")
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    for name, pool, target in (("llmq-scaler", None, "llmq-worker"), ("llmq-scaler-trainers", "trainers", "llmq-trainer")):
        scaler = by_kind("Deployment")[name]
        pod = scaler["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "llmq-scaler"
        assert scaler["spec"]["replicas"] == 1
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["LLMQ_SCALER_BACKEND"]["value"] == "kubernetes"
        assert env.get("LLMQ_SCALER_POOL", {}).get("value") == pool, name
        assert env["LLMQ_SCALER_DEPLOYMENT"]["value"] == target in by_kind("Deployment")
        assert env["LLMQ_SCALER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        # the values are ones the scaler accepts
        ScalerSettings(**{k.removeprefix("LLMQ_SCALER_").lower(): v["value"] for k, v in env.items()
                          if k.startswith("LLMQ_SCALER_") and "value" in v})


def test_worker_deployment_leaves_replicas_to_the_scaler_and_drains_on_stop():
    worker = by_kind("Deployment")["llmq-worker"]
    assert "replicas" not in worker["spec"]  # a re-apply must not reset the scaler's count
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"]["path"] == "/metrics"


def test_services_select_pods_and_name_their_ports():
    deployments = by_kind("Deployment")
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"]
        matches = [d for d in deployments.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, name
        container_ports = {p["name"]: p["containerPort"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports or port["targetPort"] in container_ports.values(), (name, port)
    for deployment in deployments.values():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()


def test_gateway_probes_and_ports_follow_the_settings():
    config = by_kind("ConfigMap")["llmq-config"]["data"]
    gateway = by_kind("Deployment")["llmq-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert str(gateway["ports"][0]["containerPort"]) == config["LLMQ_HTTP_PORT"]
    assert config["LLMQ_HTTP_HOST"] == "0.0.0.0"
    worker = by_kind("Deployment")["llmq-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert str(worker["ports"][0]["containerPort"]) == config["LLMQ_METRICS_PORT"]
    scaler = by_kind("Deployment")["llmq-scaler"]["spec"]["template"]["spec"]["containers"][0]
    scaler_env = {e["name"]: e.get("value") for e in scaler["env"]}
    assert str(scaler["ports"][0]["containerPort"]) == scaler_env["LLMQ_SCALER_METRICS_PORT"]
    assert scaler_env["LLMQ_SCALER_METRICS_HOST"] == "0.0.0.0"
    # each Deployment reads the ConfigMap that exists
    for deployment in by_kind("Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            refs = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
            assert refs == ["llmq-config"]


def test_keda_scaled_object_matches_its_crd_schema():
    """KEDA's ScaledObject is a CRD that kubernetes-validate does not know: checked against the
    CRD's schema vendored in deploy/schemas (see its README), plus the CRD's one CEL rule."""
    schema = json.loads(KEDA_SCHEMA.read_text())
    objects = [doc for doc in yaml.safe_load_all(KEDA_FILE.read_text()) if doc and doc["kind"] == "ScaledObject"]
    assert objects
    for scaled in objects:
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.Draft7Validator(schema).validate(scaled)
        spec = scaled["spec"]
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
        assert spec["scaleTargetRef"]["name"] in by_kind("Deployment")


# ---- every LLMQ_* variable is a setting ------------------------------------------------------

def known_variables() -> set[str]:
    names = set()
    for cls in (StackSettings, ScalerSettings, ClientSettings, TrainerSettings):
        for field in cls.model_fields:
            names.update(env_names(cls, field))
    return names


def test_every_llmq_variable_in_deploy_is_a_setting():
    """Anywhere in deploy/ (compose, Dockerfile, manifests, README, the KEDA file): each
    LLMQ_* name sets a field of the gateway's or workers' settings (LLMQ_ + name, or a name the
    field still accepts) or of scaler.settings.ScalerSettings (LLMQ_SCALER_ + name). A misspelt one would be ignored
    silently by pydantic-settings (extra="ignore")."""
    known = known_variables()
    assert {"LLMQ_KAFKA_BOOTSTRAP", "LLMQ_METRICS_PORT", "LLMQ_SCALER_MIN", "LLMQ_SCALER_METRICS_PORT"} <= known
    seen: dict[str, set[str]] = {}
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "schemas" not in p.parts):
        for name in re.findall(r"\bLLMQ_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            seen.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(files) for name, files in seen.items() if name not in known}
    assert unknown == {}
    assert len(seen) >= 15
    # and the values set in compose and the ConfigMap are ones the settings accept
    services = load_compose()["services"]
    for name in LLMQ_SERVICES:
        env = environment(services[name])
        StackSettings(**{k.removeprefix("LLMQ_").lower(): v for k, v in env.items()
                    if k.startswith("LLMQ_") and not k.startswith("LLMQ_SCALER_")})
        ScalerSettings(**{k.removeprefix("LLMQ_SCALER_").lower(): v for k, v in env.items()
                          if k.startswith("LLMQ_SCALER_")})
    config = by_kind("ConfigMap")["llmq-config"]["data"]
    StackSettings(**{k.removeprefix("LLMQ_").lower(): v for k, v in config.items() if k.startswith("LLMQ_")})
