"""Talking to the Kubernetes API server: credentials, error bodies, and riding out its bad moments.

The ``kubernetes`` client raises ``ApiException`` for every non-2xx answer with the HTTP reason phrase in
``reason`` (``kubernetes/client/rest.py``); what the server meant (``AlreadyExists`` or ``Conflict``, both
409) is the ``reason`` of the ``Status`` object in the body (k8s.io/apimachinery ``pkg/api/errors``). The
client does not retry 5xx, 429 or dropped connections; :class:`Patience` does, through tenacity: capped
exponential backoff, honouring ``Retry-After``, within a bounded time of consecutive failures.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from loomcfm_core.errors import RayJobError

if TYPE_CHECKING:
    from tenacity import RetryCallState

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TRANSIENT = (429, 500, 502, 503, 504)
REQUEST_TIMEOUT = (5, 15)  # connect, read: short enough for a SIGTERM'd pod's grace period (30 s)
log = logging.getLogger(__name__)


@dataclass
class KubeApi:
    """The two API groups the launcher uses, for one namespace."""

    custom: Any  # kubernetes.client.CustomObjectsApi
    core: Any  # kubernetes.client.CoreV1Api
    namespace: str

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                        _request_timeout=REQUEST_TIMEOUT)

    def create(self, body: dict) -> dict:
        # Strict: a field the CRD does not know is an error here, not silently pruned by the API server.
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body,
                                                           field_validation="Strict",
                                                           _request_timeout=REQUEST_TIMEOUT)

    def patch(self, name: str, patch: dict) -> dict:
        """A JSON merge patch (RFC 7386) of the RayJob's metadata."""
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, patch,
                                                          _request_timeout=REQUEST_TIMEOUT)

    def delete(self, name: str, timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                    propagation_policy="Background", _request_timeout=timeout)

    def fresh(self) -> KubeApi:
        """The same API over a new connection pool: what a signal handler uses, since the main thread it
        interrupts may hold the old pool's lock."""
        from kubernetes import client

        api = client.ApiClient(configuration=self.core.api_client.configuration)
        return KubeApi(client.CustomObjectsApi(api), client.CoreV1Api(api), self.namespace)


def connect(namespace: str) -> KubeApi:
    """In a pod, its service account (a KFP step); elsewhere ``$KUBECONFIG`` or ``~/.kube/config`` (a laptop)."""
    import os

    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:  # $KUBECONFIG read now (the client reads it once, at import), ':'-separated files merged as kubectl does
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as exc:
            raise RayJobError(f"no Kubernetes credentials: not in a pod, and no usable kubeconfig ($KUBECONFIG "
                              f"or ~/.kube/config): {exc}") from exc
    api = client.ApiClient()
    return KubeApi(client.CustomObjectsApi(api), client.CoreV1Api(api), namespace)


def reason(exc: Exception) -> str:
    """The API server's reason (``AlreadyExists``, ``NotFound``, ``Conflict``, ``Invalid`` ...), or ''."""
    try:
        return json.loads(getattr(exc, "body", None) or "{}").get("reason", "")
    except (ValueError, AttributeError):
        return ""


def status_code(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def describe(exc: Exception) -> str:
    """One line: the HTTP status and the server's message, or the connection error."""
    try:
        message = json.loads(getattr(exc, "body", None) or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    code = status_code(exc)
    return f"{code} {reason(exc) or getattr(exc, 'reason', '')}: {message}".strip() if code else repr(exc)


def transient(exc: Exception) -> bool:
    """Worth trying again: overload, a failing or restarting API server, a dropped connection."""
    from urllib3.exceptions import HTTPError as Urllib3Error

    code = status_code(exc)
    if code is not None and code != 0:
        return code in TRANSIENT
    return isinstance(exc, (Urllib3Error, OSError)) or code == 0


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


class Patience:
    """Calls the API again after transient failures (:func:`transient`), for at most ``budget_s`` of
    consecutive failures, waiting ``Retry-After`` when the server says so, else ``base_s`` doubling up to
    ``cap_s``.

    Waits are on ``stop`` so a SIGTERM cuts them short (the pod has a 30 s grace period), and ``stop`` set
    ends the retries; a call that could not succeed raises :class:`RayJobError` naming what it was doing.
    (The client's own urllib3 ``Retry`` cannot be the one: it counts attempts rather than time, sleeps where
    no SIGTERM can cut the wait short, and is one setting per API client, not per launcher.)
    """

    def __init__(self, budget_s: float = 300.0, stop: threading.Event | None = None, base_s: float = 1.0,
                 cap_s: float = 30.0):
        self.budget_s, self.base_s, self.cap_s = budget_s, base_s, cap_s
        self.stop = stop or threading.Event()

    def call(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from tenacity import (RetryError, Retrying, retry_if_exception, stop_after_delay, stop_when_event_set,
                              wait_exponential)
        from urllib3.exceptions import HTTPError as Urllib3Error

        backoff = wait_exponential(multiplier=self.base_s, max=self.cap_s)

        def wait(state: RetryCallState) -> float:
            return _retry_after(state.outcome.exception()) or backoff(state)

        def retried(exc: BaseException) -> bool:
            return isinstance(exc, (ApiException, Urllib3Error, OSError)) and transient(exc)

        def waiting(state: RetryCallState) -> None:
            log.warning("cannot %s (%s); trying again in %.1f s", what, describe(state.outcome.exception()),
                        state.next_action.sleep)

        attempts = Retrying(retry=retry_if_exception(retried), wait=wait, sleep=self.stop.wait,
                            stop=stop_after_delay(self.budget_s) | stop_when_event_set(self.stop),
                            before_sleep=waiting)
        try:
            return attempts(fn, *args, **kwargs)
        except RetryError as gave_up:
            last = gave_up.last_attempt
            raise RayJobError(f"cannot {what}: the Kubernetes API failed {last.attempt_number} times in a row over "
                              f"{attempts.statistics['delay_since_first_attempt']:.0f} s; last: "
                              f"{describe(last.exception())}") from last.exception()
