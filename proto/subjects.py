"""NATS subject names: built here and spelled nowhere else.

Every subject starts with ``baton.<namespace>`` so that several clusters (or test cases)
share one NATS server without seeing each other's traffic. Ids and namespaces must be
subject-safe tokens: letters, digits, ``-`` and ``_``.
"""

import re

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_token(value: str, what: str) -> str:
    """Return ``value`` if it is one subject token, else raise ``ValueError``."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} must match [A-Za-z0-9_-]+, got {value!r}")
    return value


def worker_inbox(namespace: str, worker_id: str) -> str:
    """Everything addressed to one worker: GenerateRequest or PrefillRequest (request-reply),
    AbortRequest, KVRelease, KVStateRequest, and RoleSwitch (request-reply) from the planner."""
    return f"baton.{check_token(namespace, 'namespace')}.worker.{check_token(worker_id, 'id')}"


def router_requests(namespace: str) -> str:
    """RouteRequest (request-reply), served by every router replica in one queue group."""
    return f"baton.{check_token(namespace, 'namespace')}.router.route"


ROUTER_QUEUE = "routers"


def stream_inbox(namespace: str, frontend_id: str) -> str:
    """TokenBatch messages for every stream one frontend process holds."""
    return f"baton.{check_token(namespace, 'namespace')}.stream.{check_token(frontend_id, 'id')}"


def answer_inbox(stream_subject: str, request_id: str) -> str:
    """Where a worker refuses one placement of a request (an ``ErrorReply``), and where NATS
    says nobody listens on the worker's inbox: under its frontend's stream inbox. The id is
    the frontend's own (a uuid's hex, ``-<n>`` after it), not checked again here."""
    return f"{stream_subject}.{request_id}"


def answer_inboxes(stream_subject: str) -> str:
    """The wildcard a frontend subscribes to for ``answer_inbox``."""
    return f"{stream_subject}.*"


def load_metrics(namespace: str, worker_id: str) -> str:
    """LoadMetrics published by one worker."""
    return f"baton.{check_token(namespace, 'namespace')}.load.{check_token(worker_id, 'id')}"


def load_metrics_all(namespace: str) -> str:
    """Wildcard over every worker's LoadMetrics."""
    return f"baton.{check_token(namespace, 'namespace')}.load.*"


def frontend_load(namespace: str, frontend_id: str) -> str:
    """FrontendLoad published by one frontend process."""
    ns = check_token(namespace, "namespace")
    return f"baton.{ns}.frontend_load.{check_token(frontend_id, 'id')}"


def frontend_load_all(namespace: str) -> str:
    """Wildcard over every frontend process's FrontendLoad."""
    return f"baton.{check_token(namespace, 'namespace')}.frontend_load.*"


def kv_events(namespace: str, worker_id: str) -> str:
    """KVEventBatch published by one worker."""
    return f"baton.{check_token(namespace, 'namespace')}.kv.{check_token(worker_id, 'id')}"


def kv_events_all(namespace: str) -> str:
    """Wildcard over every worker's KVEventBatch."""
    return f"baton.{check_token(namespace, 'namespace')}.kv.*"


# etcd keys live beside the subjects so that names are spelled in one place.


def etcd_prefix(namespace: str) -> str:
    return f"/baton/{check_token(namespace, 'namespace')}/"


def etcd_workers(namespace: str) -> str:
    return f"{etcd_prefix(namespace)}workers/"


def etcd_worker(namespace: str, worker_id: str) -> str:
    return f"{etcd_workers(namespace)}{check_token(worker_id, 'id')}"


def etcd_models(namespace: str) -> str:
    return f"{etcd_prefix(namespace)}models/"


def etcd_model(namespace: str, model: str) -> str:
    # Model names may hold '/', as in 'org/model': keep them readable, they end the key.
    if not model or any(c.isspace() for c in model):
        raise ValueError(f"model name must be non-empty without spaces, got {model!r}")
    return f"{etcd_models(namespace)}{model}"


def planner_scale(namespace: str) -> str:
    """ScaleCommand published by the planner: each pool's target number of workers."""
    return f"baton.{check_token(namespace, 'namespace')}.planner.scale"
