"""Other projects' private names that an adapter module of ours relies on, and the check that they are there.

Private surface is used where no public call does the job, and only in one adapter module per project:
:mod:`loomcfm_core.training.ray_trainer` (Ray Train's failure policy and SIGINT handling) and
:mod:`loomcfm_core.mlflow_stack` (MLflow's stack of active runs); outside the library, ``pipelines/common.py``
replaces kfp's check behind ``PipelineTask.set_cpu_limit`` and the like. Each declares a
:class:`PrivateSurface`: the project's version pyproject.toml pins and every private name the adapter uses,
with the parameters it passes. The test suite checks each against the installed version, so an upgrade that
moves one fails there, naming the pinned version and the missing name, instead of a training failing at run
time.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from importlib import metadata


def resolve(dotted: str) -> tuple[object, str]:
    """The object a dotted name means (the longest importable module prefix, then attributes), and ``""``; or
    ``None`` and the first part of the name that is not there (an unimportable module included)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for depth, name in enumerate(parts[cut:], start=cut):
            if not hasattr(found, name):
                return None, ".".join(parts[:depth + 1])
            found = getattr(found, name)
        return found, ""
    return None, parts[0]


@dataclass(frozen=True)
class PrivateSurface:
    """What an adapter uses of one project's private API.

    Args:
        project: the distribution (``ray``, ``mlflow``).
        pinned: the version specifier pyproject.toml pins it to (``2.60.*``), which the surface was read from.
        names: dotted names that must exist.
        parameters: dotted callables and the parameters the adapter passes them, which they must accept.
    """

    project: str
    pinned: str
    names: tuple[str, ...]
    parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def missing(self) -> list[str]:
        """Every declared name that is not there, or a parameter a callable no longer takes; [] when intact."""
        out = []
        for name in (*self.names, *self.parameters):
            found, absent = resolve(name)
            if absent:
                out.append(f"{name} is missing" if absent == name else f"{name} ({absent} is missing)")
                continue
            accepted = inspect.signature(found).parameters if name in self.parameters else {}
            out += [f"{name}: parameter {p!r}" for p in self.parameters.get(name, ()) if p not in accepted]
        return out

    def report(self) -> str:
        """One line for a failed check: the installed and pinned versions and what is missing."""
        return (f"{self.project} {metadata.version(self.project)} (pyproject pins {self.pinned}) lacks private "
                f"names an adapter relies on: {'; '.join(self.missing())}")
