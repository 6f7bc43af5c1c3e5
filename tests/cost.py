"""What a test costs, found while it runs: the markers that keep ``make test-fast`` fast cannot be forgotten.

A test (or a fixture it uses) that starts a Ray cluster must be marked ``ray``; one that runs a pipeline on
``kfp.local`` must be marked ``kfp_local``; one that starts a ``loomcfm`` command or another Python process
that imports the library (each spends 5-10 s of CPU importing torch, MLflow and Ray) must be marked
``process`` (all declared in ``pyproject.toml``, where ``--strict-markers`` refuses an undeclared one).
``make test-fast`` deselects the three, so a new test that starts Ray but is not marked would silently make
the fast tier slow: this plugin fails it instead, naming the marker it needs.

How a start is seen, whichever process makes it:

- a Ray head writes a new ``session_*`` folder under Ray's temp dir (``/tmp/ray`` unless ``RAY_TMPDIR``:
  ``ray/_private/utils.py`` ``get_ray_temp_dir``), whether ``ray.init`` runs in this process, in a ``loomcfm``
  subprocess or in a kfp.local step;
- a ``ray start`` command (a node in a network namespace, with a temp dir of its own) or a kfp.local step
  (``python -m kfp.dsl.executor_main``, kfp 2.17 ``kfp/local/subprocess_task_handler.py``) is a
  :class:`subprocess.Popen` of this process, recorded here; so is a ``loomcfm`` command or a Python
  interpreter given ``loomcfm_core`` (``process``).

A cost found while a fixture is set up belongs to every test that uses the fixture, so a module-scoped
training is required to be marked on each of its readers, not only on the first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MARKERS = {
    "ray": "starts a Ray cluster (in-process, in a loomcfm subprocess, in a kfp.local step, or `ray start` nodes)",
    "kfp_local": "runs a pipeline on kfp.local (a subprocess per step)",
    "process": "starts a loomcfm command, or another Python process that imports loomcfm_core, in a process of "
               "its own",
}
_OWN = "LOOMCFM_TESTS_RAY_TMPDIR"  # the RAY_TMPDIR a test process made for itself
_commands: list[list[str]] = []
_fixture_costs: dict[str, set[str]] = {}


def _ray_sessions() -> set[str]:
    root = Path(os.environ.get("RAY_TMPDIR") or "/tmp") / "ray"
    return {p.name for p in root.glob("session_2*")} if root.is_dir() else set()


def _install_popen_recorder() -> None:
    original = subprocess.Popen.__init__
    if getattr(original, "_records_commands", False):
        return

    def init(self, args, *rest, **kwargs):
        _commands.append([str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)])
        original(self, args, *rest, **kwargs)

    init._records_commands = True
    subprocess.Popen.__init__ = init


class _Watch:
    """The costs of what runs between its creation and :meth:`found`."""

    def __init__(self) -> None:
        self.sessions, self.start = _ray_sessions(), len(_commands)

    def found(self) -> set[str]:
        costs = set()
        commands = _commands[self.start:]
        if _ray_sessions() - self.sessions or any(_is_ray_start(c) for c in commands):
            costs.add("ray")
        if any("kfp.dsl.executor_main" in part for c in commands for part in c):
            costs.add("kfp_local")
        elif any(_is_our_process(c) for c in commands):
            costs.add("process")
        return costs


def _is_our_process(command: list[str]) -> bool:
    """``loomcfm ...`` (the console script, or a shell script that starts with it) or a Python interpreter given
    ``loomcfm_core`` (``-m loomcfm_core.cli``, a ``-c`` script importing it)."""
    program = Path(command[0]).name if command else ""
    if program == "loomcfm":
        return True
    if program in ("bash", "sh") and "-c" in command[:-1]:
        return re.match(r"\s*loomcfm\s", command[command.index("-c") + 1]) is not None
    return program.startswith("python") and any("loomcfm_core" in part for part in command[1:])


def _is_ray_start(command: list[str]) -> bool:
    names = [Path(part).name for part in command]
    return "ray" in names and "start" in command[names.index("ray") + 1:]


def pytest_configure(config) -> None:
    """Record commands; give this pytest process a Ray temp dir of its own (inherited by every Ray it starts,
    in-process or in a subprocess), so that the sessions it sees are its own and that a Ray of another test
    run on the host (another checkout, an xdist worker) is never found by ``ray.init``'s address lookup
    (``ray_current_cluster`` in the temp dir). Short: Ray's socket paths must stay under 108 bytes."""
    _install_popen_recorder()
    inherited = os.environ.get("RAY_TMPDIR")
    if inherited is None or inherited == os.environ.get(_OWN):  # an xdist worker inherits its controller's
        own = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        os.environ["RAY_TMPDIR"] = os.environ[_OWN] = own
        config.add_cleanup(lambda: shutil.rmtree(own, ignore_errors=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    watch = _Watch()
    yield
    if costs := watch.found():
        _fixture_costs.setdefault(fixturedef.argname, set()).update(costs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    watch = _Watch()
    yield
    item.stash[_found] = watch.found()


_found = pytest.StashKey[set]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or report.failed:
        return
    costs = set(item.stash.get(_found, set()))
    for name in item.fixturenames:
        costs |= _fixture_costs.get(name, set())
    marks = {mark.name for mark in item.iter_markers()}
    if marks & {"ray", "kfp_local"}:
        costs.discard("process")  # out of the fast tier already: its processes need not be named too
    missing = costs - marks
    if missing:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} {', '.join(MARKERS[m] for m in sorted(missing))}, but is not marked so: "
                           f"add {', '.join(f'@pytest.mark.{m}' for m in sorted(missing))} (or a module-level "
                           f"pytestmark), so that `make test-fast` leaves it out")


def pytest_collection_modifyitems(items) -> None:
    """The test files that run kfp.local pipelines first, then those that start Ray, then the rest (each in
    collection order): with ``--dist loadfile --no-loadscope-reorder`` (the Makefile) pytest-xdist hands the
    workers files in this order, so the long runs start first and the many short files fill the end. Its
    default order (most tests first) left the one-test two-node and pod-host Ray files for last, one
    worker training for minutes while the other sat idle (CI: 300 s)."""
    files: dict[str, int] = {}
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        rank = 0 if "kfp_local" in marks else 1 if "ray" in marks else 2
        files[item.path] = min(rank, files.get(item.path, 2))
    items.sort(key=lambda item: files[item.path])  # stable: collection order within a rank
