"""The compiled packages as the KFP v2 backend reads them (tests/kfp/driver.py re-implements the driver's rules
from kubeflow/pipelines 2.17.0): resources that reach the pod, the Kubernetes platform spec, caching."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from pipelines import runner
from pipelines.common import (DISPLAY, ENV_CONFIG_KEYS, FIXED_RESOURCES, GPU_TOLERATIONS, MLFLOW_SECRET_KEYS,
                              RUN_ID_FIELD, S3_SECRET_KEYS, SHM_SIZE, STEP_RESOURCES)
from tests.kfp.driver import DriverError, get_string_value, parse_quantity, pod_platform, pod_resources, \
    task_parameters

PACKAGES = sorted(p.relative_to(runner.COMPILED).as_posix() for p in runner.COMPILED.rglob("*.yaml"))
# What each task is, by its display name (pipelines.common.DISPLAY), as the resources kind that sizes it. The
# ablation's arm runs inside a ParallelFor with the train step's resources as constants (kfp.local cannot
# resolve a loop task's resource parameters); the check and a watch-only train step are sized by what they do.
KINDS = {"ablation_plan": "prepare", "ablation_report": "prepare", "ablation_arm": "train", "reflow": "train",
         "evaluate_reflow": "evaluate", "train_rayjob": "watch", "reflow_rayjob": "watch"}
CONSTANT_RESOURCES = {"ablation_arm", *FIXED_RESOURCES}
GPU_KINDS = {"evaluate", "pairs", "train"}  # a step that may use GPUs (the arm does not: its resources are fixed)
RESOURCES = {**STEP_RESOURCES, **FIXED_RESOURCES}
# Inputs whose value is different in every run: KFP resolves these before computing the cache key
# (backend/src/v2/driver/resolve.go resolveInputParameter; cacheutils/cache.go GenerateCacheKey).
RUN_SPECIFIC = re.compile(r"\{\{\$\.pipeline_(job|task)_")


def load(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((runner.COMPILED / name).read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def root_values(spec: dict, **given) -> dict:
    """A run's root parameter values: the given ones, else the defaults (typed as JSON, as the API stores them)."""
    values = {name: p["defaultValue"] for name, p in spec["root"]["inputDefinitions"]["parameters"].items()
              if "defaultValue" in p}
    values.setdefault("checkpoint_uri", "s3://loomcfm/loomcfm/runs/x/checkpoints/step-00000001.pt")
    return {**values, **given}


def tasks(spec: dict):
    """Every container task, with the root parameter each parameter of its scope comes from: a ``ParallelFor``
    body is a sub-DAG whose inputs are its loop task's (``pipelinechannel--s3_secret`` <- ``s3_secret``)."""
    root = {name: name for name in spec["root"]["inputDefinitions"]["parameters"]}
    yield from _walk(spec, spec["root"]["dag"]["tasks"], root)


def _walk(spec: dict, dag_tasks: dict, root_of: dict):
    for name, task in dag_tasks.items():
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            inner = {key: root_of[source["componentInputParameter"]]
                     for key, source in task["inputs"]["parameters"].items() if "componentInputParameter" in source}
            # the loop item and upstream outputs come from no root parameter
            inner.update({key: None for key in component["inputDefinitions"]["parameters"] if key not in inner})
            yield from _walk(spec, component["dag"]["tasks"], inner)
        else:
            yield name, task, component["executorLabel"], root_of


def in_scope(values: dict, root_of: dict) -> dict:
    """A run's root values as the parameters of a task's scope (None for those no root parameter gives)."""
    return {key: values.get(root) for key, root in root_of.items() if root is None or root in values}


def what(task: dict) -> str:
    """The DISPLAY key of a task."""
    return next(key for key, shown in DISPLAY.items() if shown == task["taskInfo"]["name"])


def step_kind(task: dict) -> str:
    return KINDS.get(what(task), what(task))


def gpu_step(task: dict) -> bool:
    return step_kind(task) in GPU_KINDS and what(task) != "ablation_arm"


@pytest.mark.parametrize("package", PACKAGES)
def test_resource_fields_reference_string_parameters(package):
    spec, _ = load(package)
    root = spec["root"]["inputDefinitions"]["parameters"]
    checked = 0
    for name, task, executor, root_of in tasks(spec):
        resources = spec["deploymentSpec"]["executors"][executor]["container"].get("resources", {})
        fields = {k: v for k, v in resources.items() if isinstance(v, str)}
        fields.update({f"accelerator.{k}": v for k, v in resources.get("accelerator", {}).items()})
        for field, value in fields.items():
            channel = re.fullmatch(r"\{\{\$\.inputs\.parameters\['pipelinechannel--(.+?)'\]\}\}", value)
            assert channel or "{{" not in value, f"{package} {name} {field}: text around a placeholder ({value!r}) " \
                "is dropped by the driver's unanchored match"
            if channel:
                parameter = channel.group(1)
                assert root[parameter]["parameterType"] == "STRING", \
                    f"{package} {name} {field} reads {parameter}, a {root[parameter]['parameterType']}: the driver's " \
                    "GetStringValue() makes it ''"
                source = task["inputs"]["parameters"][f"pipelinechannel--{parameter}"]["componentInputParameter"]
                assert root_of[source] == parameter, (package, name, field)
                checked += 1
    assert checked >= 4 * len([t for t in tasks(spec) if step_kind(t[1]) not in CONSTANT_RESOURCES
                               and what(t[1]) not in CONSTANT_RESOURCES])


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("gpus", ["0", "1", "8"])
def test_driver_sets_requests_and_limits_on_every_step(package, gpus):
    spec, _ = load(package)
    values = root_values(spec, accelerator_limit=gpus, train_accelerator_limit=gpus)
    for name, task, executor, root_of in tasks(spec):
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        pod = pod_resources(container.get("resources", {}), task_parameters(task, in_scope(values, root_of)))
        cpu, memory = RESOURCES[step_kind(task)]
        for bucket in ("limits", "requests"):
            assert pod[bucket]["cpu"] == parse_quantity(cpu), (package, name, pod)
            assert pod[bucket]["memory"] == parse_quantity(memory), (package, name, pod)
        if gpu_step(task):
            assert pod["limits"]["nvidia.com/gpu"] == int(gpus), (package, name, pod)
        else:
            assert "nvidia.com/gpu" not in pod["limits"], (package, name)


def test_driver_emulation_rejects_what_the_backend_rejects():
    """The emulation is strict where the driver is: an int GPU count vanishes, an int CPU fails the task."""
    spec, _ = load("loomcfm_pipeline.yaml")
    task = spec["root"]["dag"]["tasks"]["evaluate"]
    resources = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert get_string_value(1) == "" and get_string_value("1") == "1"
    silent = pod_resources(resources, task_parameters(task, root_values(spec, accelerator_limit=1)))
    assert "nvidia.com/gpu" not in silent["limits"]
    with pytest.raises(DriverError, match="quantities must match"):
        pod_resources(resources, task_parameters(task, root_values(spec, evaluate_cpu=4)))
    with pytest.raises(DriverError):
        pod_resources(resources, task_parameters(task, root_values(spec, evaluate_memory="16 GiB")))
    old_style = {"cpuLimit": 4.0, "memoryLimit": 16.0, "accelerator": {"type": "nvidia.com/gpu", "count": "2"}}
    assert pod_resources(old_style, {}) == {"limits": {"cpu": 4, "memory": parse_quantity("16G"),
                                                       "nvidia.com/gpu": 2}, "requests": {}}


@pytest.mark.parametrize("package", PACKAGES)
def test_platform_spec_names_secrets_config_map_toleration_and_node_selector(package):
    spec, executors = load(package)
    root = spec["root"]["inputDefinitions"]["parameters"]
    values = root_values(spec, node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"})
    for name, task, executor, root_of in tasks(spec):
        config = executors[executor]
        pod = pod_platform(config, in_scope(values, root_of))
        expected_env = {**{k: ("secretAsEnv", "loomcfm-s3", k) for k in S3_SECRET_KEYS},
                        **{k: ("secretAsEnv", "loomcfm-mlflow", k) for k in MLFLOW_SECRET_KEYS},
                        **{k: ("configMapAsEnv", "loomcfm-env", k) for k in ENV_CONFIG_KEYS},
                        "KFP_RUN_ID": ("fieldPath", RUN_ID_FIELD, None)}
        assert pod["env"] == expected_env, (package, name)
        for source in config["secretAsEnv"] + config["configMapAsEnv"]:
            parameter = (source.get("secretNameParameter") or source["configMapNameParameter"])["componentInputParameter"]
            assert root[root_of[parameter]]["parameterType"] == "STRING", (package, name, parameter)
        if gpu_step(task):
            assert pod["tolerations"] == GPU_TOLERATIONS and root["gpu_tolerations"]["parameterType"] == "LIST"
            assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
            assert root["node_selector"]["parameterType"] == "STRUCT", "a string selector would resolve to {}"
        else:
            assert not pod["tolerations"] and not pod["nodeSelector"], (package, name)
        shm = [v for v in pod["emptyDir"] if v["mountPath"] == "/dev/shm"]
        if step_kind(task) in ("prepare", "watch", "check"):
            assert not shm
        else:
            assert shm == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": SHM_SIZE, "volumeName": "dshm"}]
            assert parse_quantity(SHM_SIZE) < parse_quantity(RESOURCES[step_kind(task)][1]), \
                "shm counts against memory"


def test_platform_emulation_rejects_wrong_parameter_kinds():
    spec, executors = load("loomcfm_pipeline.yaml")
    config = executors["exec-evaluate"]
    assert pod_platform(config, root_values(spec, node_selector="gpu=true"))["nodeSelector"] == {}
    with pytest.raises(DriverError, match="struct or list"):
        pod_platform(config, root_values(spec, gpu_tolerations="nvidia.com/gpu"))
    with pytest.raises(DriverError, match="non-empty string"):
        pod_platform(config, root_values(spec, mlflow_secret=""))
    bad = copy.deepcopy(config)
    bad["emptyDirMounts"][0]["sizeLimit"] = "2 GiB"
    with pytest.raises(DriverError):
        pod_platform(bad, root_values(spec))


@pytest.mark.parametrize("package", PACKAGES)
def test_display_names_and_descriptions(package):
    spec, _ = load(package)
    assert spec["pipelineInfo"]["description"]
    for name, parameter in spec["root"]["inputDefinitions"]["parameters"].items():
        assert parameter.get("description"), f"{package}: parameter {name} has no description"
    shown = {name: task["taskInfo"]["name"] for name, task, _, _ in tasks(spec)}
    assert set(shown.values()) <= set(DISPLAY.values()) and len(set(shown.values())) == len(shown), shown
    assert shown["cache"] == "cache dataset"
    if package == "loomcfm_pipeline.yaml":
        assert (shown["cluster-check"], shown["train"], shown["train-2"], shown["evaluate-reflow"]) == \
            ("check cluster", "train (LOOM)", "train (reflow)", "evaluate (reflow)")
    if package == "rayjob/loomcfm_pipeline.yaml":
        assert (shown["train"], shown["train-2"]) == ("train (LOOM) as RayJob", "train (reflow) as RayJob")
    assert spec["root"]["inputDefinitions"]["parameters"]["config_yaml"]["defaultValue"] == "cluster"


@pytest.mark.parametrize("package", PACKAGES)
def test_deterministic_steps_are_cached_without_run_specific_inputs(package):
    """Every input is part of the backend's cache key (cacheutils/cache.go GenerateCacheKey): a cached step
    must have none that changes per run, directly or through a producer's per-run output."""
    spec, _ = load(package)
    per_run_outputs = {("prepare", "parent_run_id")}
    for name, task, _, _ in tasks(spec):
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        if name.startswith(("cache", "pairs", "evaluate", "ablation-plan")):
            assert cached, f"{package}: {name} is not cached"
        if name.startswith(("cluster-check", "prepare", "train", "ablation-arm", "ablation-report")):
            assert not cached, f"{package}: {name} has side effects and must not be cached"
        if not cached:
            continue
        for input_name, source in task["inputs"]["parameters"].items():
            constant = str(source.get("runtimeValue", {}).get("constant", ""))
            assert not RUN_SPECIFIC.search(constant), (package, name, input_name, constant)
            output = source.get("taskOutputParameter")
            if output:
                assert (output["producerTask"], output["outputParameterKey"]) not in per_run_outputs, \
                    (package, name, input_name)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_overlays_packages_ask_for_gpus_only_where_its_config_trains_on_them(overlay):
    """The packages compiled with an overlay's defaults (pipelines.runner.PLATFORMS) request GPUs for evaluate,
    pairs and training only where the overlay's config (k8s/overlays/<overlay>/config.yaml) uses them; a train
    step that watches a RayJob asks for at most half a CPU and 512 Mi, without /dev/shm or GPUs."""
    from loomcfm_core.config import load_config_text
    from tests.k8s.objects import K8S

    gpus = load_config_text((K8S / "overlays" / overlay / "config.yaml").read_text()).ray.use_gpu
    prefix = "" if overlay == "cpu" else f"{overlay}/"
    for package in [p for p in PACKAGES if p.startswith(prefix) and p.count("/") == prefix.count("/") + p.count(
            "rayjob/") and "ablation" not in p]:
        spec, executors = load(package)
        values = root_values(spec)
        assert (int(values["gpus_per_worker"]) > 0) == gpus, (package, "RayJob workers")
        for name, task, executor, root_of in tasks(spec):
            container = spec["deploymentSpec"]["executors"][executor]["container"]
            pod = pod_resources(container.get("resources", {}), task_parameters(task, in_scope(values, root_of)))
            platform = pod_platform(executors[executor], in_scope(values, root_of))
            if step_kind(task) == "watch":
                assert pod["limits"]["cpu"] <= parse_quantity("500m") and pod["limits"]["memory"] <= parse_quantity(
                    "512Mi") and "nvidia.com/gpu" not in pod["limits"] and not platform["emptyDir"], (package, name)
            elif step_kind(task) in GPU_KINDS:
                assert (pod["limits"].get("nvidia.com/gpu", 0) > 0) == gpus, (package, name, pod)
            else:
                assert "nvidia.com/gpu" not in pod["limits"], (package, name)


def test_a_resource_setting_on_a_task_without_a_container_is_refused_naming_the_setting():
    """pipelines/common.py replaces kfp's ``_ensure_container_spec_exists`` (whose ``inspect.stack()`` took most of
    the time a pipeline takes to build): the same refusal, naming the method that was called."""
    from kfp import dsl

    with pytest.raises(ValueError, match=r"^set_cpu_limit can only be used on single-step components"):
        @dsl.pipeline(name="p")
        def p():
            dsl.importer(artifact_uri="gs://b/x", artifact_class=dsl.Dataset).set_cpu_limit("1")
