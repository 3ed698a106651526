"""etcd for Baton: leases that re-register themselves, live prefix views, the model registry.

A thin asyncio layer over etcd3aio (docs/decisions/0002-etcd-client.md says why that client).
What it adds to the client:

- every unary call is bounded by ``call_timeout_s`` and every etcd failure surfaces as
  ``Unavailable``, so callers handle one error class;
- ``register`` keeps a key alive under a lease and, when the lease is lost (etcd restarted
  and the lease expired, or someone revoked it), grants a new one and puts the key again;
- ``watch_prefix`` keeps a dict of every key under a prefix, listed once and then watched from
  the listed revision + 1, so no event falls between the list and the watch; after a
  reconnect or a compaction it lists and watches again.

Keys are ``str`` (built by ``proto.subjects``), values ``bytes``; typed values are msgpack via
``shared.codec``. Every background task is owned by a ``Registration`` or a ``WatchView``, and
``Discovery.close`` stops whichever are still running.
"""

from shared.discovery.client import Discovery
from shared.discovery.registration import Registration
from shared.discovery.watch import WatchView, WorkerDirectory

__all__ = ["Discovery", "Registration", "WatchView", "WorkerDirectory"]
