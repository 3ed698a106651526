"""A real HTTP server answering as the Kubernetes API does for the part of it the planner's
kubernetes connector uses: the ``scale`` subresource of Deployments.

No API server runs on these machines, so the tests run this one and check what the
connector sent (every request is recorded) against the Kubernetes schemas. What it plays,
from the API's conventions:

- ``GET`` and ``PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale``, answering an
  ``autoscaling/v1`` ``Scale``; a PATCH must be a JSON merge patch (or a strategic merge
  patch, the same on this object; anything else is 415), is merged into the current Scale
  (RFC 7386), and is refused 409 when it names a ``metadata.resourceVersion`` that is not the
  current one, 422 when ``spec.replicas`` is not an integer >= 0, 400 when it changes the
  kind or the name;
- every other path, and Deployments it does not hold, 404; other methods, 405;
- a bearer token: none or a wrong one is 401, a read-only one may GET but its PATCH is 403;
- errors as a ``v1`` ``Status`` with ``Content-Type: application/json``;
- ``outage``: every request answered with that status (e.g. 503, an API server that is down);
  ``stall``: requests held until that event is set (an API server that does not answer);
  ``write_between``: another writer changes a Deployment right after its next GET.
"""

import asyncio
import copy
import importlib.resources
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from aiohttp import web
from referencing import Registry, Resource

PATH = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"
PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
# The oldest Kubernetes still commonly run, and the newest schema kubernetes-validate bundles.
KUBERNETES_VERSIONS = (
    "1.29",
    kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version()),
)


@dataclass
class Recorded:
    """One request as it arrived, and the answer it got."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    authorization: str
    body: Any  # the JSON sent, or None
    status: int = 0
    answer: Any = None  # the JSON answered


@dataclass
class Deployment:
    replicas: int
    selector: str
    resource_version: int = 1
    uid: str = "00000000-0000-4000-8000-000000000000"


@dataclass
class KubernetesAPI:
    token: str
    read_only_token: str = "read-only-token"
    deployments: dict[tuple[str, str], Deployment] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    outage: int | None = None
    stall: asyncio.Event | None = None  # requests wait until it is set
    write_between: dict[str, int] = field(default_factory=dict)  # name -> replicas
    url: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _next_resource_version: int = 100

    def add(self, namespace: str, name: str, replicas: int) -> None:
        component = name.removeprefix("baton-")
        selector = f"app.kubernetes.io/component={component},app.kubernetes.io/name=baton"
        self.deployments[namespace, name] = Deployment(replicas, selector)

    def replicas(self, namespace: str, name: str) -> int:
        return self.deployments[namespace, name].replicas

    def of(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds; checked after every request (the caller's timeout)."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", PATH, self._scale)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    async def _record(self, request: web.Request) -> Recorded:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        recorded = Recorded(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            content_type=request.headers.get("Content-Type", ""),
            authorization=request.headers.get("Authorization", ""),
            body=body,
        )
        self.requests.append(recorded)
        return recorded

    async def _answer(
        self, recorded: Recorded, status: int, answer: dict[str, Any]
    ) -> web.Response:
        recorded.status, recorded.answer = status, answer
        async with self._changed:
            self._changed.notify_all()
        # The API server's exact content type: lightkube reads a Status only under it.
        return web.Response(
            status=status, body=json.dumps(answer).encode(), content_type="application/json"
        )

    async def _unknown(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        return await self._answer(
            recorded,
            404,
            status_body(404, "NotFound", "the server could not find the requested resource"),
        )

    async def _scale(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        if self.stall is not None:
            await self.stall.wait()
        if self.outage is not None:
            reason = "ServiceUnavailable" if self.outage == 503 else "InternalError"
            answer = status_body(self.outage, reason, "the API is down")
            return await self._answer(recorded, self.outage, answer)
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        denied = self._authorize(recorded, namespace, name)
        if denied is not None:
            return await self._answer(recorded, denied[0], denied[1])
        deployment = self.deployments.get((namespace, name))
        if deployment is None:
            message = f'deployments.apps "{name}" not found'
            return await self._answer(
                recorded, 404, status_body(404, "NotFound", message, name=name)
            )
        if request.method == "GET":
            answer = scale_body(namespace, name, deployment)
            if name in self.write_between:  # another writer, between this read and its write
                deployment.replicas = self.write_between.pop(name)
                deployment.resource_version = self._bump()
            return await self._answer(recorded, 200, answer)
        if request.method != "PATCH":
            message = "the server does not allow this method on the requested resource"
            return await self._answer(recorded, 405, status_body(405, "MethodNotAllowed", message))
        status, answer = self._patch(recorded, namespace, name, deployment)
        return await self._answer(recorded, status, answer)

    def _authorize(
        self, recorded: Recorded, namespace: str, name: str
    ) -> tuple[int, dict[str, Any]] | None:
        token = recorded.authorization.removeprefix("Bearer ")
        if not recorded.authorization.startswith("Bearer ") or token not in (
            self.token,
            self.read_only_token,
        ):
            return 401, status_body(401, "Unauthorized", "Unauthorized")
        if token == self.read_only_token and recorded.method != "GET":
            message = (
                f'deployments.apps "{name}" is forbidden: User '
                f'"system:serviceaccount:{namespace}:reader" cannot {recorded.method.lower()} '
                f'resource "deployments/scale" in API group "apps" in the namespace "{namespace}"'
            )
            return 403, status_body(403, "Forbidden", message, name=name)
        return None

    def _patch(
        self, recorded: Recorded, namespace: str, name: str, deployment: Deployment
    ) -> tuple[int, dict[str, Any]]:
        if recorded.content_type.split(";")[0].strip() not in PATCH_TYPES:
            message = (
                "the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(PATCH_TYPES)}"
            )
            return 415, status_body(415, "UnsupportedMediaType", message)
        if not isinstance(recorded.body, dict):
            return 400, status_body(400, "BadRequest", "the patch is not a JSON object")
        current = scale_body(namespace, name, deployment)
        patched = merge_patch(current, recorded.body)
        kept = ("apiVersion", "kind")
        if (
            any(patched.get(k) != current[k] for k in kept)
            or patched.get("metadata", {}).get("name") != name
        ):
            return 400, status_body(400, "BadRequest", "the patch changes the kind or the name")
        version = (patched.get("metadata") or {}).get("resourceVersion")
        if version != str(deployment.resource_version):
            message = (
                f'Operation cannot be fulfilled on deployments.apps "{name}": the object has '
                f"been modified; please apply your changes to the latest version and try again"
            )
            return 409, status_body(409, "Conflict", message, name=name)
        replicas = (patched.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            message = (
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: {replicas!r}'
            )
            return 422, status_body(422, "Invalid", message, name=name)
        deployment.replicas = replicas
        deployment.resource_version = self._bump()
        return 200, scale_body(namespace, name, deployment)

    def _bump(self) -> int:
        self._next_resource_version += 1
        return self._next_resource_version


def scale_body(namespace: str, name: str, deployment: Deployment) -> dict[str, Any]:
    """The ``autoscaling/v1`` ``Scale`` of a Deployment as the API answers it (the pods follow
    ``spec`` at once here: no controller runs)."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": deployment.uid,
            "resourceVersion": str(deployment.resource_version),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"replicas": deployment.replicas},
        "status": {"replicas": deployment.replicas, "selector": deployment.selector},
    }


def status_body(code: int, reason: str, message: str, name: str = "") -> dict[str, Any]:
    """A ``v1`` ``Status`` of failure, as the API answers an error."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if name:
        body["details"] = {"name": name, "group": "apps", "kind": "deployments"}
    return body


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, ``null`` removes, the rest
    replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


async def start(api: KubernetesAPI, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Serve ``api`` on a free loopback port (``api.url`` says where); clean up the runner
    returned."""
    runner = web.AppRunner(api.build_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    api.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    return runner


def validate_status(document: dict[str, Any], version: str) -> None:
    """Check a v1 Status against its schema. kubernetes-validate files it by its group
    (``status-meta-v1.json``) while its apiVersion is ``v1``, so ``validate`` cannot find it
    from the document: load that file as ``validate`` does."""
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    (strict,) = [f for f in folder.iterdir() if f.name.startswith(f"v{version}.0-local-strict")]
    schema = json.loads((strict / "status-meta-v1.json").read_text())
    definitions = json.loads((strict / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(document)


def assert_valid_against_kubernetes_schemas(api: KubernetesAPI) -> None:
    """Every body sent is an autoscaling/v1 Scale; every answer a Scale or a v1 Status."""
    for request in api.requests:
        for version in KUBERNETES_VERSIONS:
            if request.body is not None:
                assert kubernetes_validate.validate(request.body, version, strict=True)
            if isinstance(request.answer, dict) and request.answer["kind"] == "Status":
                validate_status(request.answer, version)
            elif request.answer is not None:
                assert kubernetes_validate.validate(request.answer, version, strict=True)
        if request.method == "PATCH":
            assert request.body["kind"] == "Scale"
            assert request.body["apiVersion"] == "autoscaling/v1"


def write_kubeconfig(path: Path, server: str, token: str, namespace: str | None = None) -> Path:
    """A kubeconfig file at ``path`` whose one context reaches ``server`` with a bearer
    ``token`` (and sets ``namespace``)."""
    cluster: dict[str, Any] = {"server": server}
    context: dict[str, Any] = {"cluster": "test", "user": "planner"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": "planner", "user": {"token": token}}],
                "contexts": [{"name": "test", "context": context}],
                "current-context": "test",
            }
        )
    )
    return path
