"""Every error loomcfm raises on purpose, under one base class.

A front door (the CLI, a KFP step) catches :class:`LoomcfmError` and shows its message, which names the
dotted config key, file or URI at fault and what is expected; anything else escaping is a bug and keeps its
traceback. Each class also keeps the built-in base that callers and tests already catch it by
(``ValueError`` for bad input, ``RuntimeError`` for a service or state that cannot be used).

:func:`retry_can_fix` is the one rule for which failures a retry of the same work may cure (an unreachable
service) and which it cannot (bad input, a damaged dataset, a full disk); Ray Train's failure policy and
anything else that retries asks it.
"""

from __future__ import annotations

import difflib
import errno

# OS errors a retry of the same work on the same machine cannot cure.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class LoomcfmError(Exception):
    """The base of every deliberate loomcfm error: its message is meant for the user, without a traceback.

    ``retryable`` says whether retrying the same work may succeed; most of ours are about inputs and state
    that a retry meets again.
    """

    retryable = False


def retry_can_fix(exc: BaseException) -> bool:
    """Whether retrying the work that raised ``exc`` may succeed: not for our deliberate errors (unless
    marked ``retryable``) nor a full or read-only disk; yes for anything else (a lost node, a transient
    device error), which is what retries are for."""
    if isinstance(exc, LoomcfmError):
        return exc.retryable
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    return True


class ConfigError(LoomcfmError, ValueError):
    """A config that cannot be used; the message names the dotted key and what is expected."""


class UsageError(LoomcfmError, ValueError):
    """Arguments or inputs a function cannot work with (a method string, a launcher, a batch larger than
    the dataset); the message names them and what is expected."""


class StorageError(LoomcfmError, RuntimeError):
    """A storage operation that cannot succeed; the message says which URI and why."""


class StorageUnavailable(StorageError):
    """The object store did not answer (after the client's own retries); a later retry may succeed."""

    retryable = True


class UriError(StorageError, ValueError):
    """A location that is not one of the URI forms storage takes (:func:`loomcfm_core.storage.check_uri`)."""


class SourceError(LoomcfmError, ValueError):
    """An input that cannot be cached; the message names the file and what was expected."""


class CheckpointError(LoomcfmError, ValueError):
    """A file that is not a usable checkpoint for this run: not one of ours or the reference's, or weights
    and state that do not fit the configured model and coupling."""


class MetricsError(LoomcfmError, RuntimeError):
    """A feature network or reference statistics that cannot be used; says which file and what to do."""


class TrackingError(LoomcfmError, RuntimeError):
    """The tracking store cannot be used; the message names the URI or experiment and what to fix."""


class LeaseError(LoomcfmError, RuntimeError):
    """The run folder is being trained by another process (named in the message), or this training lost
    the folder's lease."""


class TrackingUnavailable(TrackingError):
    """The MLflow tracking server did not answer; a later retry may succeed."""

    retryable = True


class RayJobError(LoomcfmError, RuntimeError):
    """The RayJob failed, was stopped, or did not finish in time; the message carries KubeRay's reason."""


class ClusterCheckError(LoomcfmError, RuntimeError):
    """``loomcfm cluster check`` found what a run on this cluster would fail on (its table says what)."""


class TrainingError(LoomcfmError, RuntimeError):
    """Training reached a state it must not continue from (ranks whose coupling tables diverged)."""


def did_you_mean(word: str, candidates: list[str] | dict, prefix: str = "", suffix: str = "") -> str:
    """``; did you mean X?`` for the close matches of a misspelt name among ``candidates`` (empty if none),
    each shown between ``prefix`` and ``suffix``: the one suggestion every unknown name gets (a ``--set``
    key, a key in a config file, a preset, a schedule key)."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(prefix + c + suffix for c in close)}?" if close else ""
