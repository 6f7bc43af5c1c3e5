"""Every setting that takes one of a fixed set of values, defined once: the modules that implement them
dispatch on these names, and the config schema (or the command line) checks against them.

A leaf: it imports nothing of the package but its errors, so the schema reads the allowed values without
depending on the modules that implement them (which take the config in turn): the config stays near the
bottom of the import graph, and importing it loads no torch.
"""

from __future__ import annotations

import re

from loomcfm_core.errors import SourceError, UsageError

# coupling.kind: all but ``pairs`` draw noise from seeds (loomcfm_core.coupling.SeedCoupling); coupling.cost.
SEED_COUPLINGS = ("independent", "minibatch_ot", "fixed", "loom")
COUPLINGS = (*SEED_COUPLINGS, "pairs")
COSTS = ("l2", "sqeuclidean")  # the distance, or its square
ASSIGNMENT_SOLVERS = ("lapjv", "scipy")  # coupling.solver (loomcfm_core.coupling_solve)
TARGET_DTYPES = ("uint8", "float32")  # reflow.target_dtype (loomcfm_core.data.pairs)
AUTOENCODERS = ("kl", "vq")  # model.autoencoder.kind (loomcfm_core.models.autoencoder)
FEATURE_NETWORKS = ("auto", "inception", "classifier")  # eval.feature_network (loomcfm_core.evaluation.metrics)
# ablation.arms (loomcfm_core.ablation): the couplings the ablation pipeline compares, in the order it reports
# them; ``loom_converge`` is LOOM after ``coupling.converge_epochs`` passes of reassignment with no network.
ABLATION_ARMS = (*SEED_COUPLINGS, "loom_converge")
# Where a training runs (``--launcher``, the KFP train step's ``launcher``; loomcfm_core.stages.train): its driver
# in this process, or a KubeRay RayJob's head (loomcfm_core.kube.launcher).
LAUNCHERS = ("local", "rayjob")

# Sampling methods ``<solver>-<steps>`` (sample.method, eval.methods, reflow.method; loomcfm_core.sampling).
SAMPLING_SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
_METHOD = re.compile(rf"^({'|'.join(SAMPLING_SOLVERS)})-([1-9][0-9]*)$")

# data.source ``<kind>:<argument>`` (loomcfm_core.data.sources): the argument each kind takes, "<dir>" for any
# folder, else the one name it reads.
ANY_FOLDER = "<dir>"
SOURCE_FORMS = {"builtin": "digits", "cifar10": ANY_FOLDER, "imagenet32": ANY_FOLDER, "imagefolder": ANY_FOLDER,
                "hdf5": ANY_FOLDER, "pairs": ANY_FOLDER}


def parse_method(method: str) -> tuple[str, int]:
    """``(solver, steps)`` of a method string; a :class:`UsageError` naming the forms otherwise."""
    match = _METHOD.match(method)
    if not match:
        raise UsageError(f"sampling method {method!r}: expected <solver>-<steps> with solver one of "
                         f"{', '.join(SAMPLING_SOLVERS)}, e.g. euler-4 or dopri5-1")
    return match.group(1), int(match.group(2))


def check_method(method: str) -> str:
    """``method`` when :func:`parse_method` takes it (what the config checks method strings with)."""
    parse_method(method)
    return method


# tracking.uri: the stores MLflow's client opens (a server, or a database it writes itself); ``None`` = the local
# SQLite store. ``server`` schemes need a host, and are the ones probed before work (loomcfm_core.tracking).
TRACKING_SERVER_SCHEMES = ("http", "https")
TRACKING_SCHEMES = (*TRACKING_SERVER_SCHEMES, "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def check_tracking_uri(uri: str | None) -> str | None:
    """``uri`` when MLflow can open it (what the config checks ``tracking.uri`` with); a :class:`UsageError`
    naming the forms otherwise. ``127.0.0.1:5000`` would be taken by MLflow for a local folder of that name,
    and ``http://`` without a host fails deep inside its HTTP client."""
    if uri is None:
        return uri
    scheme, sep, rest = uri.partition("://")
    base = scheme.split("+", 1)[0].lower()  # postgresql+psycopg2://
    if sep and base in TRACKING_SERVER_SCHEMES and rest.split("/", 1)[0]:
        return uri
    if base in TRACKING_SCHEMES and base not in TRACKING_SERVER_SCHEMES and (sep or uri.startswith(f"{base}:")):
        return uri
    hint = f"; did you mean http://{uri}?" if not sep and re.match(r"^[\w.-]+:\d+(/.*)?$", uri) else ""
    raise UsageError(f"{uri!r} is not an MLflow tracking URI: expected http(s)://host:port, sqlite:///path, "
                     f"postgresql://..., or no value for the local store{hint}")


def source_forms() -> list[str]:
    """The ``data.source`` strings there are readers for, e.g. ``cifar10:<dir>``."""
    return [f"{kind}:{form}" for kind, form in SOURCE_FORMS.items()]


def check_source(source: str) -> str:
    """``source`` when it names a kind there is a reader for, with an argument it takes (what the config
    checks ``data.source`` with); a :class:`SourceError` listing the forms otherwise."""
    kind, sep, argument = source.partition(":")
    form = SOURCE_FORMS.get(kind) if sep and argument else None
    if form is None:
        raise SourceError(f"expected one of {', '.join(source_forms())}, got {source!r}")
    if form != ANY_FOLDER and argument != form:
        raise SourceError(f"the only {kind} dataset is '{kind}:{form}', got {source!r}")
    return source
