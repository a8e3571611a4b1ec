"""What each overlay of deploy/k8s/ renders to: valid for the KubeRay CRDs and for Kubernetes, and
shaped as docs/deploy.md says (a head without model traffic, one gateway per worker, probes,
auth, metrics, the model volume, the GPU group)."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import yaml
from k8s_objects import (  # noqa: F401 (k8s, rendered: fixtures)
    K8S, OVERLAYS, PROJECT, SCHEMAS, env, groups, k8s, only, ports, ray_container, rendered, workers)

pytestmark = pytest.mark.timeout(120)

GATEWAY_RESOURCE = "deepserve_gateway"
GENERATORS = ("digit-diffusion", "digit-dcgan")
needs_schemas = pytest.mark.skipif(
    not (SCHEMAS / "kuberay").is_dir(),
    reason=f"no KubeRay CRD schemas at {SCHEMAS}/kuberay (they sit beside the project in CI, not in a clone)")


def all_containers(rayservice):
    """(group, container) for every container of every group."""
    return [(name, c) for name, g in groups(rayservice).items() for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------- schemas


def _closed(schema):
    """The schema with unknown fields refused where it lists properties (as `kubectl apply`'s
    strict field validation does; a CRD schema alone would let a misspelt field through)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_schema(filename: str, version: str = "v1"):
    crd = yaml.safe_load((SCHEMAS / "kuberay" / filename).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _closed(served["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def crd_validators():
    import jsonschema

    rayservice = crd_schema("ray.io_rayservices.yaml")
    raycluster_spec = crd_schema("ray.io_rayclusters.yaml")["properties"]["spec"]
    return jsonschema.Draft7Validator(rayservice), jsonschema.Draft7Validator(raycluster_spec)


@needs_schemas
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_validates_against_the_kuberay_crds(rendered, crd_validators, overlay):
    rayservice_validator, raycluster_validator = crd_validators
    rayservice = only(rendered[overlay], "RayService")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in rayservice_validator.iter_errors(rayservice)]
    assert not errors, errors
    cluster = rayservice["spec"]["rayClusterConfig"]
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in raycluster_validator.iter_errors(cluster)]
    assert not errors, errors

    # ... and the validation bites: a misspelt field and a wrong type are refused.
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    messages = " ".join(e.message for e in rayservice_validator.iter_errors(broken))
    assert "minReplica" in messages and "'yes' is not of type 'boolean'" in messages


@pytest.mark.parametrize("version", ["1.27.0", "latest"])  # 1.27: gRPC probes are GA
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_and_pod_templates_validate_with_kubernetes_schemas(rendered, overlay, version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    core = [o for o in rendered[overlay] if o["apiVersion"] in ("v1", "apps/v1")]
    assert {o["kind"] for o in core} == {"PersistentVolumeClaim", "Service"}
    assert not [o for o in rendered[overlay] if o["kind"] == "Secret"], "no Secret ships: the token is made by hand"
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)
    for name, group in groups(only(rendered[overlay], "RayService")).items():
        template = group["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"deepserve-{name}", **template.get("metadata", {})}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)


# ---------------------------------------------------------------------------- the Serve config


def expected_serve_config(overlay: str) -> dict:
    """deploy/serve_config.yaml with the overrides docs/deploy.md lists."""
    config = yaml.safe_load((PROJECT / "deploy" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    app["args"]["repository"] = "/models"
    if overlay == "gpu":
        fractions = yaml.safe_load((K8S / "overlays" / "gpu" / "gpu-fractions.yaml").read_text())
        for d in app["deployments"]:
            if d["name"] in fractions:
                d["ray_actor_options"]["num_gpus"] = fractions[d["name"]]
    return config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_the_project_config_with_the_documented_overrides(rendered, overlay):
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(only(rendered[overlay], "RayService")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)
    assert schema.proxy_location.value == "Disabled"
    assert embedded == expected_serve_config(overlay)


def test_gpu_overlay_gives_the_generators_a_gpu_and_the_gateway_none(rendered):
    def actor_options(overlay):
        embedded = yaml.safe_load(only(rendered[overlay], "RayService")["spec"]["serveConfigV2"])
        (app,) = embedded["applications"]
        placed = {n: (m or {}).get("placement", "gateway") for n, m in app["args"]["models"].items()}
        return placed, {d["name"]: d.get("ray_actor_options", {}) for d in app["deployments"]}

    placed, gpu = actor_options("gpu")
    for name in GENERATORS:
        assert placed[name] == "deployment" and gpu[name]["num_gpus"] > 0, name
    assert "num_gpus" not in gpu["Gateway"]  # the models placed `gateway` stay on the CPU
    _, cpu = actor_options("cpu")
    assert not [n for n, o in cpu.items() if o.get("num_gpus")]


# ---------------------------------------------------------------------------- the cluster's shape


def start_param_resources(value: str) -> dict:
    """A `resources` start param as `ray start` gets it: KubeRay writes `--resources=<value>`
    into a bash command line."""
    (arg,) = shlex.split(f"--resources={value}")
    return json.loads(arg.split("=", 1)[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_head_takes_no_model_traffic(rendered, overlay):
    rayservice = only(rendered[overlay], "RayService")
    head = groups(rayservice)["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert GATEWAY_RESOURCE not in start_param_resources(head["rayStartParams"].get("resources", '"{}"'))
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_offers_one_gateway(rendered, overlay):
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    for name, group in workers(only(rendered[overlay], "RayService")).items():
        params = group["rayStartParams"]
        assert start_param_resources(params["resources"]) == {GATEWAY_RESOURCE: 1}, name
        # ... and Ray's autoscaler reads the quoting the same way (it plans nodes for pending gateways).
        assert _get_custom_resources({}, params, name) == {GATEWAY_RESOURCE: 1}, name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes(rendered, overlay):
    rayservice = only(rendered[overlay], "RayService")
    # KubeRay builds the serve Service from the head container's `serve-*` ports.
    assert ports(ray_container(groups(rayservice)["head"]))["serve-grpc"] == 9000
    for name, group in groups(rayservice).items():
        container = ray_container(group)
        assert ports(container)["metrics"] == 8080 == int(group["rayStartParams"]["metrics-export-port"]), name
    for name, group in workers(rayservice).items():
        container = ray_container(group)
        assert ports(container)["serve-grpc"] == 9000, name
        readiness = container["readinessProbe"]
        assert readiness["grpc"]["port"] == 9000 and readiness["grpc"].get("service", "") == "", name
        liveness = container["livenessProbe"]
        assert "grpc" not in liveness and "exec" not in liveness, name
        assert liveness["httpGet"]["port"] not in (8000, 9000), name  # the raylet, not Serve
        assert liveness["httpGet"]["path"] == "/api/local_raylet_healthz", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_the_ray_env_and_the_token_from_a_secret(rendered, overlay):
    rayservice = only(rendered[overlay], "RayService")
    auth = rayservice["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for name, container in all_containers(rayservice):
        variables = env(container)
        assert variables["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"]["value"] == "0", name
        assert variables["RAY_AUTH_MODE"]["value"] == "token", name
        token = variables["RAY_AUTH_TOKEN"]
        assert "value" not in token, name
        assert token["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}, name
        assert variables["DEEPSERVE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_and_limits_on_every_container(rendered, overlay):
    rayservice = only(rendered[overlay], "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    sized = [(name, c["resources"]) for name, c in all_containers(rayservice)]
    sized.append(("autoscaler", cluster["autoscalerOptions"]["resources"]))
    for name, resources in sized:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), (name, kind)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_volume_and_repository_cache(rendered, overlay):
    rayservice = only(rendered[overlay], "RayService")
    pvc = only(rendered[overlay], "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    repository = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["repository"]
    for name, group in groups(rayservice).items():
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in ray_container(group)["volumeMounts"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], name
        assert mounts["models"] == {"name": "models", "mountPath": repository, "readOnly": True}, name
        assert "emptyDir" in volumes["repository-cache"], name
        cache = env(ray_container(group))["DEEPSERVE_REPOSITORY_CACHE"]["value"]
        assert cache.startswith(mounts["repository-cache"]["mountPath"] + "/"), name


def test_gpu_worker_group(rendered):
    rayservice = only(rendered["gpu"], "RayService")
    gpu = workers(rayservice)["gpu-workers"]
    spec = gpu["template"]["spec"]
    limits = ray_container(gpu)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert gpu["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert ray_container(gpu)["image"].endswith("-gpu")
    # The CPU group and the cpu overlay have no GPU.
    for overlay, name in (("gpu", "cpu-workers"), ("cpu", "cpu-workers")):
        group = workers(only(rendered[overlay], "RayService"))[name]
        assert "nvidia.com/gpu" not in json.dumps(group), overlay
    assert set(workers(only(rendered["cpu"], "RayService"))) == {"cpu-workers"}


# ---------------------------------------------------------------------------- metrics and Services


def pod_labels(group_name: str, group: dict) -> dict:
    """A pod's labels: its template's plus those KubeRay sets (ray.io/node-type among them)."""
    node_type = "head" if group_name == "head" else "worker"
    return {**group["template"]["metadata"]["labels"], "ray.io/node-type": node_type, "ray.io/group": group_name}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_scrapes_every_ray_pod_on_its_metrics_port(rendered, overlay):
    monitor = only(rendered[overlay], "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, group in groups(only(rendered[overlay], "RayService")).items():
        assert selector["matchLabels"].items() <= pod_labels(name, group).items(), name
        assert endpoint["port"] in ports(ray_container(group)), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_headless_service_selects_the_gateways_only(rendered, overlay):
    service = only(rendered[overlay], "Service")
    assert service["spec"]["clusterIP"] == "None"
    selector = service["spec"]["selector"].items()
    (port,) = service["spec"]["ports"]
    for name, group in groups(only(rendered[overlay], "RayService")).items():
        selected = selector <= pod_labels(name, group).items()
        assert selected == (name != "head"), name
        if selected:
            assert ports(ray_container(group))[port["targetPort"]] == port["port"] == 9000, name
