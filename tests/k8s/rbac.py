"""Kubernetes RBAC authorization and the API server's 403, for the API double (tests/k8s/apiserver.py).

Built from the Kubernetes source, read at the commits named in /work/notes/research-issue20.md §2c:

* ``plugin/pkg/auth/authorizer/rbac/rbac.go`` ``RuleAllows``: the requested resource is ``resource/subresource``
  when there is a subresource; ``pkg/apis/rbac/v1/evaluation_helpers.go`` ``VerbMatches`` (``*`` or exact),
  ``APIGroupMatches`` (``*`` or exact; the core group is ``""``), ``ResourceMatches`` (``*``, the exact
  combined resource, or ``*/<subresource>``: ``pods`` does not grant ``pods/log``), ``ResourceNameMatches``
  (an empty list matches every name, else the exact name: a ``resourceNames`` rule never grants ``list`` or
  ``create``).
* ``pkg/registry/rbac/validation/rule.go`` ``VisitRulesFor``: every ClusterRoleBinding, then (namespaced
  requests) the RoleBindings of the request's namespace, each binding's Role (same namespace) or ClusterRole;
  ``appliesToUser``: a ServiceAccount subject is the user ``system:serviceaccount:<ns>:<name>``, a Group one
  of the user's groups; ``roleBindingDescriber``/``clusterRoleBindingDescriber`` for the allowed reason; a
  binding to a missing role is a resolution error, reported as ``RBAC: <errors>`` when nothing allows.
* k8s.io/apiserver v0.34.10 ``pkg/authorization/authorizerfactory`` privileged groups: ``system:masters`` is
  allowed everything; the bootstrap ClusterRole ``system:basic-user`` lets every authenticated user create
  SelfSubjectAccessReviews (``plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go``).
* k8s.io/apiserver v0.34.10 ``pkg/endpoints/handlers/responsewriters/errors.go`` ``ForbiddenStatusError`` /
  ``forbiddenMessage`` and k8s.io/apimachinery ``pkg/api/errors/errors.go`` ``NewForbidden``: the 403 body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
BASIC_USER = [{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews",
                                                                    "selfsubjectrulesreviews"], "verbs": ["create"]}]


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = (AUTHENTICATED,)


def service_account(namespace: str, name: str) -> User:
    """``serviceaccount.MakeUsername`` and the groups a ServiceAccount token carries."""
    return User(f"system:serviceaccount:{namespace}:{name}", ("system:serviceaccounts",
                                                              f"system:serviceaccounts:{namespace}", AUTHENTICATED))


ADMIN = User("kubernetes-admin", (MASTERS, AUTHENTICATED))


@dataclass(frozen=True)
class Request:
    """``authorizer.Attributes`` of a resource request."""

    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def rule_allows(rule: dict, req: Request) -> bool:
    combined = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    verbs, groups = rule.get("verbs") or [], rule.get("apiGroups") or []
    if not ("*" in verbs or req.verb in verbs) or not ("*" in groups or req.group in groups):
        return False
    matched = False
    for resource in rule.get("resources") or []:
        if resource in ("*", combined) or (req.subresource and resource == f"*/{req.subresource}"):
            matched = True
            break
    names = rule.get("resourceNames") or []
    return matched and (not names or req.name in names)


def _applies(subject: dict, user: User, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{namespace}:{subject.get('name')}"
    if kind == "User":
        return user.name == subject.get("name")
    if kind == "Group":
        return subject.get("name") in user.groups
    return False


def _describe(subject: dict, binding_namespace: str) -> str:
    if subject.get("kind") == "ServiceAccount":
        return f'ServiceAccount "{subject["name"]}/{subject.get("namespace") or binding_namespace}"'
    return f'{subject["kind"]} "{subject["name"]}"'


Lookup = Callable[[str, str, str], dict | None]  # (resource, namespace, name) -> object or None


def authorize(user: User, req: Request, bindings: Iterable[dict], lookup: Lookup) -> tuple[bool, str]:
    """(allowed, reason) as the RBAC authorizer decides; ``bindings`` are every ClusterRoleBinding and the
    RoleBindings of ``req.namespace``."""
    if MASTERS in user.groups:
        return True, ""
    if AUTHENTICATED in user.groups and any(rule_allows(r, req) for r in BASIC_USER):
        return True, 'RBAC: allowed by ClusterRoleBinding "system:basic-user" of ClusterRole "system:basic-user" ' \
                     'to Group "system:authenticated"'
    errors = []
    for binding in bindings:
        kind, meta = binding["kind"], binding["metadata"]
        namespace = meta.get("namespace", "")
        if kind == "RoleBinding" and namespace != req.namespace:
            continue
        subject = next((s for s in binding.get("subjects") or [] if _applies(s, user, namespace)), None)
        if subject is None:
            continue
        ref = binding["roleRef"]
        role = lookup("roles" if ref["kind"] == "Role" else "clusterroles",
                      namespace if ref["kind"] == "Role" else "", ref["name"])
        if role is None:
            errors.append(f'{ref["kind"].lower()}.rbac.authorization.k8s.io "{ref["name"]}" not found')
            continue
        if any(rule_allows(rule, req) for rule in role.get("rules") or []):
            where = f'{meta["name"]}/{namespace}' if kind == "RoleBinding" else meta["name"]
            return True, (f'RBAC: allowed by {kind} "{where}" of {ref["kind"]} "{ref["name"]}" to '
                          f'{_describe(subject, namespace)}')
    return False, f"RBAC: [{', '.join(errors)}]" if len(errors) > 1 else (f"RBAC: {errors[0]}" if errors else "")


def forbidden(user: User, req: Request, reason: str) -> tuple[str, dict]:
    """The 403 ``Status`` message and details of a denied request."""
    resource = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    where = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    msg = f'User "{user.name}" cannot {req.verb} resource "{resource}" in API group "{req.group}" {where}'
    if reason:
        msg = f"{msg}: {reason}"
    qualified = f"{req.resource}.{req.group}" if req.group else req.resource
    message = f'{qualified} "{req.name}" is forbidden: {msg}' if req.name else f"{qualified} is forbidden: {msg}"
    details = {"name": req.name, "group": req.group, "kind": req.resource}
    return message, {k: v for k, v in details.items() if v}
