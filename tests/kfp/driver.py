"""What the KFP v2 backend does with a compiled package's resources and Kubernetes platform spec, re-implemented
from its source so a package that kfp.local accepts can be checked against the stricter backend.

Source: kubeflow/pipelines tag 2.17.0 (4a3592cb), ``backend/src/v2/driver/``:
- ``driver.go`` ``initPodSpecPatch`` (resources block, lines 358-477) and ``getPodResource`` (170-203): a new
  string field (``resourceCpuLimit``...) is resolved and parsed with ``k8sres.ParseQuantity`` (an error fails
  the task); otherwise the deprecated float (``cpuLimit``, ``memoryLimit`` in G) is formatted with ``%v``/``%vG``.
  The accelerator limit is set only when both its type and count resolve non-empty.
- ``resolve.go`` ``resolvePodSpecInputRuntimeParameter`` (818-831): a field holding an input channel becomes
  the executor input's ``GetStringValue()``, which is "" for anything but a protobuf string (a number
  parameter!); ``util.go`` 40-78: the channel pattern ``\\$.inputs.parameters\\['(.+?)'\\]``, searched
  unanchored.
- ``k8s.go`` ``extendPodSpecPatch``: ``tolerationJson`` must resolve to a struct or list, ``nodeSelectorJson``
  to a struct (``resolveK8sJsonParameter``: ``GetStructValue()``), Secret/ConfigMap names to non-empty strings.
- The value of a root parameter arrives with the type the run gave it: a JSON number for NUMBER_INTEGER, a
  string for STRING (``backend/src/apiserver/template/v2_template.go`` ``validatePipelineJobInputs`` admits only
  those kinds).
"""

from __future__ import annotations

import re
from decimal import Decimal

from loomcfm_core.errors import ConfigError
from loomcfm_core.kube.settings import parse_quantity as _parse_quantity  # quantity.go, ParseQuantity

CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")


class DriverError(Exception):
    """What fails the driver (and with it the task) on a cluster."""


def parse_quantity(text: str) -> Decimal:
    if text == "":
        raise DriverError("failed to init podSpecPatch: quantities must match the regular expression")
    try:
        return _parse_quantity(text)
    except ConfigError as exc:
        raise DriverError(f"failed to init podSpecPatch: {exc}") from None


def get_string_value(value) -> str:
    """structpb ``Value.GetStringValue()``."""
    return value if isinstance(value, str) else ""


def resolve(field: str, params: dict) -> str:
    match = CHANNEL.search(field)
    if not match:
        return field
    if match.group(1) not in params:
        raise DriverError("executorInput did not contain container Image input parameter")
    return get_string_value(params[match.group(1)])


def task_parameters(task: dict, root_values: dict) -> dict:
    """The executor input parameters of a root DAG task for a run with ``root_values`` (typed as JSON)."""
    out = {}
    for name, spec in task.get("inputs", {}).get("parameters", {}).items():
        if "componentInputParameter" in spec:
            out[name] = root_values[spec["componentInputParameter"]]
        elif "runtimeValue" in spec:
            out[name] = spec["runtimeValue"]["constant"]
    return out


def pod_resources(resources: dict, params: dict) -> dict:
    """``{"limits": {...}, "requests": {...}}`` as the driver puts them into the pod (Decimal quantities)."""
    limits, requests = {}, {}
    for new, old, fmt, bucket, key in [("resourceMemoryLimit", "memoryLimit", "%sG", limits, "memory"),
                                       ("resourceMemoryRequest", "memoryRequest", "%sG", requests, "memory"),
                                       ("resourceCpuLimit", "cpuLimit", "%s", limits, "cpu"),
                                       ("resourceCpuRequest", "cpuRequest", "%s", requests, "cpu")]:
        if resources.get(new):
            bucket[key] = parse_quantity(resolve(resources[new], params))
        elif resources.get(old):
            bucket[key] = parse_quantity(fmt % resources[old])
    accelerator = resources.get("accelerator")
    if accelerator is not None:
        kind = resolve(accelerator["resourceType"], params) if accelerator.get("resourceType") \
            else accelerator.get("type", "")
        count = resolve(accelerator["resourceCount"], params) if accelerator.get("resourceCount") \
            else str(accelerator["count"]) if int(accelerator.get("count", 0)) > 0 else ""
        if kind and count:
            limits[kind] = parse_quantity(count)
    return {"limits": limits, "requests": requests}


def _input(spec: dict, params: dict, root_values: dict):
    if "componentInputParameter" in spec:
        return root_values[spec["componentInputParameter"]]
    if "runtimeValue" in spec:
        return spec["runtimeValue"]["constant"]
    raise DriverError(f"unsupported parameter input {spec}")


def pod_platform(config: dict, root_values: dict) -> dict:
    """Tolerations, node selector, env from Secrets/ConfigMaps/fields and emptyDir volumes of one executor's
    ``platforms.kubernetes`` config, resolved for a run (``k8s.go`` ``extendPodSpecPatch``)."""
    out = {"tolerations": [], "nodeSelector": {}, "env": {}, "emptyDir": []}
    for toleration in config.get("tolerations", []):
        if "tolerationJson" in toleration:
            value = _input(toleration["tolerationJson"], {}, root_values)
            if isinstance(value, dict):
                value = [value] if value else []
            if not isinstance(value, list):
                raise DriverError("encountered unexpected toleration proto value, must be either struct or list type")
            out["tolerations"] += value
        else:
            out["tolerations"].append(toleration)
    selector = config.get("nodeSelector", {})
    if "nodeSelectorJson" in selector:
        value = _input(selector["nodeSelectorJson"], {}, root_values)
        out["nodeSelector"] = value if isinstance(value, dict) else {}  # GetStructValue() of a non-struct: {}
    elif selector.get("labels"):
        out["nodeSelector"] = dict(selector["labels"])
    for kind, name_key in (("secretAsEnv", "secretNameParameter"), ("configMapAsEnv", "configMapNameParameter")):
        for source in config.get(kind, []):
            name = _input(source[name_key], {}, root_values)
            if not isinstance(name, str) or not name:
                raise DriverError(f"{kind}: the name must resolve to a non-empty string, got {name!r}")
            for pair in source["keyToEnv"]:
                out["env"][pair["envVar"]] = (kind, name, pair.get("secretKey") or pair.get("configMapKey"))
    for field in config.get("fieldPathAsEnv", []):
        out["env"][field["name"]] = ("fieldPath", field["fieldPath"], None)
    for volume in config.get("emptyDirMounts", []):
        if volume.get("sizeLimit"):
            parse_quantity(volume["sizeLimit"])  # k8sres.MustParse: a bad size panics the driver
        out["emptyDir"].append(volume)
    return out
