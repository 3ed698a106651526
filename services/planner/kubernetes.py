"""The kubernetes connector: sets the worker Deployments' replicas through their scale subresource.

It speaks to the API with lightkube (docs/decisions/0004-kubernetes-client.md). Each change of
target is a read and a write of ``/apis/apps/v1/namespaces/<ns>/deployments/<name>/scale``
(``autoscaling/v1`` ``Scale``): a GET for the replicas the Deployment has, then, when they are
not already where the decision points, a JSON merge patch of ``spec.replicas`` carrying the
``resourceVersion`` read, so that a change made in between is refused (409) rather than
overwritten. It only moves a Deployment the way the decision goes: the planner counts
registered workers, which lag the Deployment (pods starting, pods draining), so "up to 3 from
2" leaves a Deployment already at 3 or more alone instead of taking a starting pod away.

A write that fails (API unreachable, slow, refusing) is logged with its reason and tried again
at the next decision while the planner still wants that target; nothing here raises into the
planner's loop.

With one Deployment for both roles (``--k8s-workers-deployment``), the pools are not
Deployments: the connector scales that one to the sum of the pools' targets, once every pool
has decided in an interval, and the planner moves pods between roles with ``RoleSwitch``
over the bus (a new pod starts in the role of the pod template, and is switched if the other
pool is the one short). Which pod a scale-down removes is the ReplicaSet's choice; its
SIGTERM drains it, and a draining decode worker hands its streams to a peer.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx2
import msgspec
import yaml  # type: ignore[import-untyped]  # no stubs in the venv; only YAMLError is used
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig, SingleConfig
from lightkube.config.kubeconfig import SERVICE_ACCOUNT
from lightkube.config.models import Cluster, User
from lightkube.models.autoscaling_v1 import ScaleSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import DeploymentScale
from lightkube.types import PatchType

from services.planner.config import KubernetesConfig
from services.planner.policy import Decision
from services.planner.signals import Role
from shared.errors import Unavailable

logger = logging.getLogger(__name__)

# The field manager the API server records for our writes (metadata.managedFields).
FIELD_MANAGER = "baton-planner"

# What a call to the API may raise besides a bug of ours: HTTP and transport errors (ApiError,
# for a Kubernetes Status, is one), a token file gone, a body that is not what it should be.
_API_ERRORS = (httpx2.HTTPError, ConfigError, msgspec.MsgspecError, ValueError, OSError)


@dataclass(frozen=True, slots=True)
class Replicas:
    """A Deployment's replicas as its scale subresource tells them."""

    desired: int  # spec.replicas
    current: int  # status.replicas: the pods the controller has, ready or not
    resource_version: str


@dataclass(frozen=True, slots=True)
class _Target:
    """A target not yet written: its size, its direction, and the tries so far."""

    num_replicas: int
    is_up: bool
    num_attempts: int = 0


def load_kube_config(
    config: KubernetesConfig, service_account: str = SERVICE_ACCOUNT
) -> tuple[SingleConfig, str]:
    """The API server with its credentials, and the namespace of the Deployments.

    From ``k8s_kubeconfig`` when set; else in a pod, its service account (token, CA, and the
    pod's namespace); else ``$KUBECONFIG`` or ``~/.kube/config`` (lightkube reads those two
    places itself). ``k8s_api_url`` replaces the server found; with no credentials found at
    all it is used alone (``kubectl proxy``). Raises ``ValueError`` naming what is missing."""
    try:
        if config.k8s_kubeconfig:
            found = KubeConfig.from_file(config.k8s_kubeconfig).get()
        else:
            found = KubeConfig.from_env(service_account=service_account).get()
    except (ConfigError, KeyError, OSError, yaml.YAMLError, msgspec.MsgspecError) as exc:
        if config.k8s_kubeconfig or not config.k8s_api_url:
            raise ValueError(f"no Kubernetes API credentials: {_describe(exc)}") from exc
        found = None
    if found is None:
        found = KubeConfig.from_one(cluster=Cluster(server=config.k8s_api_url), user=User()).get()
        assert found is not None  # from_one sets the current context
    if config.k8s_api_url:
        cluster = msgspec.structs.replace(found.cluster, server=config.k8s_api_url)
        found = found._replace(cluster=cluster)
    return found, config.k8s_namespace or found.namespace


class KubernetesConnector:
    """Sets ``spec.replicas`` of each planned pool's Deployment (``deployments``: role to
    Deployment name, in ``namespace``) when the planner changes its target; with
    ``workers_deployment``, of that one Deployment, to the pools' total."""

    def __init__(
        self,
        client: AsyncClient,
        namespace: str,
        deployments: Mapping[Role, str],
        timeout_s: float,
        workers_deployment: str = "",
    ) -> None:
        self._client = client
        self.namespace = namespace
        self.workers_deployment = workers_deployment
        self.deployments = (
            dict.fromkeys(deployments, workers_deployment)
            if workers_deployment
            else dict(deployments)
        )
        self._timeout_s = timeout_s
        self._targets: dict[str, _Target] = {}  # by Deployment
        self._interval: dict[Role, Decision] = {}  # one Deployment: this interval's so far

    async def replicas(self, role: Role) -> Replicas:
        """Read the pool's Deployment's scale. Raises ``Unavailable`` with the reason."""
        return await self._read(self.deployments[role])

    async def _read(self, name: str) -> Replicas:
        try:
            scale = await self._client.get(DeploymentScale, name, namespace=self.namespace)
        except _API_ERRORS as exc:
            raise Unavailable(f"GET {self._path(name)}: {_describe(exc)}") from exc
        return _replicas(scale)

    async def scale(self, name: str, num_replicas: int, *, is_up: bool) -> tuple[Replicas, bool]:
        """Move Deployment ``name`` to ``num_replicas`` unless it is already there or past
        it in the direction ``is_up`` says. The replicas after, and whether it wrote.
        Raises ``Unavailable`` with the reason (409 when the Deployment changed between the
        read and the write)."""
        before = await self._read(name)
        is_done = before.desired >= num_replicas if is_up else before.desired <= num_replicas
        if is_done:
            return before, False
        patch = DeploymentScale(
            metadata=ObjectMeta(
                name=name,
                namespace=self.namespace,
                resourceVersion=before.resource_version or None,  # none read: unconditional
            ),
            spec=ScaleSpec(replicas=num_replicas),
        )
        try:
            scale = await self._client.patch(
                DeploymentScale,
                name,
                patch,
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )
        except _API_ERRORS as exc:
            raise Unavailable(f"PATCH {self._path(name)}: {_describe(exc)}") from exc
        return _replicas(scale), True

    async def apply(self, role: Role, decision: Decision) -> None:
        """Write a change of target; try a failed one again while the planner holds it. With
        one Deployment for both roles, the total once every pool has decided this interval."""
        if not self.workers_deployment:
            await self._apply(role.value, self.deployments[role], decision)
            return
        self._interval[role] = decision
        if len(self._interval) < len(self.deployments):
            return
        decisions = [self._interval.pop(r) for r in self.deployments]
        changed = [d for d in decisions if d.is_change] or decisions
        total = Decision(
            desired=sum(d.desired for d in decisions),
            previous=sum(d.previous for d in decisions),
            reason=changed[0].reason,
            detail="; ".join(
                f"{r.value} {d.previous} -> {d.desired}"
                for r, d in zip(self.deployments, decisions, strict=True)
            ),
        )
        await self._apply("total", self.workers_deployment, total)

    async def _apply(self, role: str, name: str, decision: Decision) -> None:
        target = self._targets.get(name)
        if decision.is_change:
            target = _Target(decision.desired, is_up=decision.desired > decision.previous)
        elif target is None or target.num_replicas != decision.desired:
            # Nothing to write, or the planner gave up the target that failed.
            self._targets.pop(name, None)
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                after, is_written = await self.scale(name, target.num_replicas, is_up=target.is_up)
        except (Unavailable, TimeoutError) as exc:
            target = _Target(target.num_replicas, target.is_up, target.num_attempts + 1)
            self._targets[name] = target
            reason = str(exc) or f"no answer within {self._timeout_s} s"
            logger.warning(
                "kubernetes: scaling failed role=%s deployment=%s/%s replicas=%d attempt=%d "
                "reason=%s; trying again at the next decision",
                role,
                self.namespace,
                name,
                target.num_replicas,
                target.num_attempts,
                reason,
            )
            return
        self._targets.pop(name, None)
        logger.info(
            "kubernetes: %s role=%s deployment=%s/%s replicas=%d pods=%d target=%d decision=%s",
            "scaled" if is_written else "already there",
            role,
            self.namespace,
            name,
            after.desired,
            after.current,
            target.num_replicas,
            decision.reason,
        )

    async def log_replicas(self) -> None:
        """Log every planned Deployment's replicas, or why they cannot be read (a missing
        Deployment or role binding shows at start-up, not at the first scaling)."""
        roles_of: dict[str, list[str]] = {}  # one Deployment for both roles is read once
        for role, name in self.deployments.items():
            roles_of.setdefault(name, []).append(role.value)
        for name, roles in roles_of.items():
            try:
                async with asyncio.timeout(self._timeout_s):
                    found = await self._read(name)
            except (Unavailable, TimeoutError) as exc:
                logger.warning(
                    "kubernetes: cannot read role=%s deployment=%s/%s reason=%s",
                    ",".join(roles),
                    self.namespace,
                    name,
                    str(exc) or f"no answer within {self._timeout_s} s",
                )
                continue
            logger.info(
                "kubernetes: role=%s deployment=%s/%s replicas=%d pods=%d",
                ",".join(roles),
                self.namespace,
                name,
                found.desired,
                found.current,
            )

    def _path(self, name: str) -> str:
        server = self._client.config.cluster.server.rstrip("/")
        return f"{server}/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/scale"


@asynccontextmanager
async def kubernetes_connector(
    config: KubernetesConfig, roles: Iterable[Role], *, service_account: str = SERVICE_ACCOUNT
) -> AsyncIterator[KubernetesConnector]:
    """A connector for the Deployments of ``roles``, its HTTP client closed on exit
    (``service_account``: where a pod's credentials are mounted)."""
    kube_config, namespace = load_kube_config(config, service_account)
    names = {Role.DECODE: config.k8s_decode_deployment, Role.PREFILL: config.k8s_prefill_deployment}
    client = AsyncClient(
        kube_config,
        namespace=namespace,
        field_manager=FIELD_MANAGER,
        timeout=httpx2.Timeout(config.k8s_timeout_s),
    )
    try:
        connector = KubernetesConnector(
            client,
            namespace,
            {role: names[role] for role in roles},
            config.k8s_timeout_s,
            config.k8s_workers_deployment,
        )
        logger.info(
            "kubernetes: api=%s namespace=%s deployments=%s",
            kube_config.cluster.server,
            namespace,
            ",".join(f"{role.value}:{name}" for role, name in connector.deployments.items()),
        )
        await connector.log_replicas()
        yield connector
    finally:
        await client.close()


def _replicas(scale: DeploymentScale) -> Replicas:
    spec, status, metadata = scale.spec, scale.status, scale.metadata
    return Replicas(
        desired=(spec.replicas or 0) if spec else 0,
        current=status.replicas if status else 0,
        resource_version=(metadata.resourceVersion or "") if metadata else "",
    )


def _describe(exc: BaseException) -> str:
    """One line saying why a call failed: the API's own Status where it sent one."""
    if isinstance(exc, ApiError):
        status = exc.status
        return f"{status.code} {status.reason}: {status.message}"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}"
    if isinstance(exc, httpx2.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
