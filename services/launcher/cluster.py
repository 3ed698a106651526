"""A local cluster as child processes: the one implementation behind `baton up`, the e2e tests
and the benches.

It starts nats-server and etcd on free loopback ports (unless their URLs are given), then the
routers, prefill workers, decode workers and the frontend, each as ``python -m services.<name>``
with its own extra flags; waits until every router answers HTTP and the frontend is ready with
every worker; and stops them in tiers: the frontend, the workers, the routers, the servers.

With ``ClusterSpec.supervise`` (what `baton up` runs), a process that exits once the cluster is
ready is restarted with the same command line, log file and (for the servers) port, after an
exponential backoff; the cluster never stops because one process died.

With ``ClusterSpec.planner`` it also runs the planner and follows its scale commands
(``pools.py``); a decode worker it adds is a warm standby handed its assignment
(``standby.py``) when one is ready.
"""

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from services.launcher.pools import WorkerPools
from services.launcher.processes import Child, stop_process, wait_popen
from services.launcher.spec import ClusterSpec
from services.launcher.standby import StandbyPool, worker_command
from shared.local_credentials import LocalCredentials
from shared.security import BusSecurity, ClusterSecurity, EtcdSecurity
from shared.servers import ServerProcess, check_port_free, free_port, start_etcd, start_nats

__all__ = ["Child", "ClusterSpec", "LocalCluster", "local_cluster"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1


class LocalCluster:
    """A cluster of child processes. Use it through :func:`local_cluster`; its processes are
    ``asyncio.subprocess.Process`` objects of the loop that started it.

    Supervised, ``restarts[name]`` counts the restarts of each child (by name) and of the
    servers it started (``nats``, ``etcd``), and :meth:`wait_restarted` waits for one."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.namespace = spec.namespace
        self.nats_url = spec.nats_url
        self.etcd_url = spec.etcd_url
        self.port = spec.port or free_port()
        self.url = f"http://{spec.host}:{self.port}"
        self.children: list[Child] = []
        self.servers: list[ServerProcess] = []  # the servers it started, not those it was given
        self.router_urls: list[str] = []
        self.restarts: dict[str, int] = {}
        self._server_names: list[str] = []  # parallel to servers
        self._started_at: dict[str, float] = {}  # loop.time() of each first start, by name
        self._restarted = asyncio.Condition()
        self._supervisor: asyncio.Task[None] | None = None
        self._is_stopped = False
        self._server_options: dict[str, dict[str, Any]] = {"nats": {}, "etcd": {}}
        self._security_env: dict[str, str] = {}  # what the children present to those servers
        self._secrets_dir = ""
        self.planner_urls: list[str] = []
        self._pools = WorkerPools(
            spec,
            self.children,
            self._started_at,
            spawn=self._spawn,
            exec_child=self._exec,
            supervise=self._supervise_child,
        )

    @property
    def api(self) -> str:
        """The OpenAI-compatible base URL."""
        return f"{self.url}/v1"

    @property
    def frontend(self) -> asyncio.subprocess.Process:
        return self._procs("frontend")[0]

    @property
    def workers(self) -> list[asyncio.subprocess.Process]:
        """The decode workers."""
        return self._procs("decode")

    @property
    def prefills(self) -> list[asyncio.subprocess.Process]:
        return self._procs("prefill")

    @property
    def routers(self) -> list[asyncio.subprocess.Process]:
        return self._procs("router")

    @property
    def retired(self) -> list[Child]:
        """The decode workers retired at the planner's request."""
        return self._pools.retired

    @property
    def standbys(self) -> StandbyPool | None:
        """The standby workers: with the planner, once it is followed."""
        return self._pools.standbys

    @property
    def pids(self) -> list[int]:
        """Every process it runs now: servers first, then the services in start order, then
        the standby workers."""
        standbys = self.standbys.standbys if self.standbys is not None else []
        return (
            [s.proc.pid for s in self.servers]
            + [c.proc.pid for c in self.children]
            + [s.proc.pid for s in standbys]
        )

    def _procs(self, role: str) -> list[asyncio.subprocess.Process]:
        return [c.proc for c in self.children if c.role == role]

    async def start(self) -> None:
        """Start everything and wait until it is ready (then supervise it, if the spec says
        so); on failure, call :meth:`stop`. A process that exits during start-up is an error,
        not restarted: it is likely to exit again."""
        spec = self.spec
        try:
            check_port_free(spec.host, self.port)
        except OSError as exc:
            raise RuntimeError(f"cannot serve on {spec.host}:{self.port}: {exc}") from None
        if spec.log_dir:
            os.makedirs(spec.log_dir, exist_ok=True)
        if spec.secure:
            await asyncio.to_thread(self._create_credentials)
        if not self.nats_url:
            self.nats_url = await self._start_server(
                "nats", start_nats, **self._server_options["nats"]
            )
        if not self.etcd_url:
            self.etcd_url = await self._start_server(
                "etcd", start_etcd, **self._server_options["etcd"]
            )
        for i in range(spec.num_routers):
            port = free_port()
            self.router_urls.append(f"http://127.0.0.1:{port}")
            await self._spawn(f"router-{i}", "router", ["--port", str(port), *spec.router_args])
        for i in range(spec.num_prefill_workers):
            args = ["--role", "prefill", *spec.prefill_args]
            await self._spawn(f"prefill-{i}", "prefill", args)
        for i in range(spec.num_workers):
            await self._spawn(f"decode-{i}", "decode", ["--role", "decode", *spec.decode_args])
        frontend_args = ["--host", spec.host, "--port", str(self.port), *spec.frontend_args]
        frontend_args += ["--procs", str(spec.num_frontends)]
        await self._spawn("frontend", "frontend", frontend_args)
        try:
            async with asyncio.timeout(spec.ready_timeout_s):
                await self._wait_ready()
                if spec.planner:  # once every worker is up: it plans from the pool it sees
                    await self._start_planner()
                    await self._wait_ready()
        except TimeoutError:
            raise TimeoutError(
                f"cluster at {self.url} not ready with {self._num_workers} workers and "
                f"{spec.num_routers} routers in {spec.ready_timeout_s} s"
            ) from None
        if spec.supervise or spec.planner:
            self._supervisor = asyncio.create_task(self._supervise_all(), name="supervisor")

    async def serve(self, stopping: asyncio.Event) -> None:
        """Return when ``stopping`` is set; raise if supervision fails first (a bug: a
        restart that fails is logged and tried again)."""
        if self._supervisor is None:
            await stopping.wait()
            return
        waiting = asyncio.create_task(stopping.wait())
        try:
            await asyncio.wait([waiting, self._supervisor], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            await asyncio.wait([waiting])
        if not stopping.is_set() and self._supervisor.done():
            self._supervisor.result()
            raise RuntimeError("supervision ended")

    async def wait_restarted(self, name: str, count: int = 1) -> None:
        """Return once ``name`` (a child's name, ``nats`` or ``etcd``) has been restarted
        ``count`` times in all. The caller sets the deadline."""
        async with self._restarted:
            await self._restarted.wait_for(lambda: self.restarts.get(name, 0) >= count)

    async def stop(self) -> None:
        """End supervision, then SIGTERM each tier, kill what outlives ``stop_timeout_s``: the
        frontend, workers, routers, then the servers. Safe to call twice."""
        if self._is_stopped:
            return
        self._is_stopped = True
        if self._supervisor is not None:
            # Waits for a restart in progress (bounded by the servers' own start-up deadlines),
            # so that what it started is in the lists below.
            self._supervisor.cancel()
            await asyncio.wait([self._supervisor])
            if not self._supervisor.cancelled() and self._supervisor.exception() is not None:
                logger.error("supervision failed", exc_info=self._supervisor.exception())
        if self.standbys is not None:  # stopped by the supervisor's end already, unless it failed
            await self.standbys.stop()
        for roles in (("planner", "frontend"), ("decode", "prefill"), ("router",)):
            tier = [c for c in self.children if c.role in roles]
            timeout_s = self.spec.stop_timeout_s
            await asyncio.gather(*(stop_process(c.name, c.proc, timeout_s) for c in tier))
        for server in reversed(self.servers):
            await asyncio.to_thread(server.stop)
            if server.data_dir:
                await asyncio.to_thread(shutil.rmtree, server.data_dir, ignore_errors=True)
        if self._secrets_dir:
            await asyncio.to_thread(shutil.rmtree, self._secrets_dir, ignore_errors=True)

    async def _start_planner(self) -> None:
        port = free_port()
        self.planner_urls.append(f"http://127.0.0.1:{port}")
        max_workers = self.spec.max_workers or self.spec.num_workers
        args = ["--port", str(port), "--connector", "local", "--min-decode-workers", "1"]
        args += ["--max-decode-workers", str(max_workers)]
        if self.spec.num_prefill_workers:  # a prefill pool it may size (and switch into)
            max_prefill = self.spec.max_prefill_workers or self.spec.num_prefill_workers
            args += ["--min-prefill-workers", str(self.spec.min_prefill_workers)]
            args += ["--max-prefill-workers", str(max_prefill)]
        if self.spec.max_total_workers:
            args += ["--max-total-workers", str(self.spec.max_total_workers)]
        if self.spec.min_total_workers:
            args += ["--min-total-workers", str(self.spec.min_total_workers)]
        args += self.spec.planner_args
        await self._spawn("planner", "planner", args)

    @property
    def _num_workers(self) -> int:
        return self.spec.num_workers + self.spec.num_prefill_workers

    def _log(self, name: str) -> str | None:
        return os.path.join(self.spec.log_dir, f"{name}.log") if self.spec.log_dir else None

    def _create_credentials(self) -> None:
        """Secrets and certificates for the servers this cluster starts (``spec.secure``)."""
        self._secrets_dir = tempfile.mkdtemp(prefix="baton-secure-")
        credentials = LocalCredentials.create(self._secrets_dir)
        secured = ClusterSecurity(
            nats=credentials.nats_security() if not self.nats_url else BusSecurity(),
            etcd=credentials.etcd_security() if not self.etcd_url else EtcdSecurity(),
        )
        if not self.nats_url:
            self._server_options["nats"] = credentials.nats_server_options()
        if not self.etcd_url:
            self._server_options["etcd"] = credentials.etcd_server_options()
        self._security_env = secured.env()

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.spec.env,
            **self._security_env,
            "BATON_NAMESPACE": self.namespace,
            "BATON_NATS_URL": self.nats_url,
            "BATON_ETCD_URL": self.etcd_url,
            "BATON_LOG_LEVEL": self.spec.log_level,
        }

    async def _start_server(
        self, name: str, start: Callable[..., ServerProcess], slot: int | None = None, **kw: Any
    ) -> str:
        """Start a server in a thread (``start(**kw, log_path=...)``), into ``servers[slot]``
        or at the end; its URL. The thread cannot be cancelled, and asyncio.wait does not
        cancel what it waits on: a cancelled start-up waits for the thread and keeps the
        server, so that stop() stops it rather than leaving it running."""
        starting = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(start, log_path=self._log(name), **kw)
        )
        try:
            await asyncio.wait([starting])
        except asyncio.CancelledError:
            await asyncio.wait([starting])
            raise
        finally:
            if starting.done() and not starting.cancelled() and starting.exception() is None:
                if slot is None:
                    self.servers.append(starting.result())
                    self._server_names.append(name)
                    self._started_at[name] = asyncio.get_running_loop().time()
                else:
                    self.servers[slot] = starting.result()
        server: ServerProcess = starting.result()
        return server.url

    async def _spawn(self, name: str, role: str, args: list[str]) -> Child:
        if role in ("prefill", "decode"):
            command = worker_command(args)
        else:
            command = (sys.executable, "-m", f"services.{role}", *args)
        proc = await self._exec(name, command)
        logger.info("started %s pid=%d", name, proc.pid)
        self._started_at[name] = asyncio.get_running_loop().time()
        child = Child(name, role, proc, command)
        self.children.append(child)
        return child

    async def _exec(
        self, name: str, command: tuple[str, ...], stdin: socket.socket | None = None
    ) -> asyncio.subprocess.Process:
        log = self._log(name)
        # A local file opened once per child at start-up: not worth a thread.
        out = open(log, "ab") if log else None  # noqa: SIM115, ASYNC230
        try:
            return await asyncio.create_subprocess_exec(
                *command,
                env=self._env(),
                stdin=stdin.fileno() if stdin else None,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT if out else None,
            )
        finally:
            if out:
                out.close()

    async def _wait_ready(self) -> None:
        """Poll until every router answers and the frontend has every worker; raise if a child
        exits first. The caller sets the deadline."""
        timeout = aiohttp.ClientTimeout(total=1.0)
        # A new connection per poll: the frontend processes share the port, and the kernel
        # gives each connection to one of them; every one must have been seen ready.
        connector = aiohttp.TCPConnector(force_close=True)
        ready_frontends: set[str] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            pending = [f"{url}/ready" for url in [*self.router_urls, *self.planner_urls]]
            while True:
                self._raise_if_exited()
                pending = [url for url in pending if await _get_json(session, url) is None]
                if not pending:
                    body = await _get_json(session, f"{self.url}/ready") or {}
                    if body.get("ready") and int(body.get("workers", 0)) >= self._num_workers:
                        ready_frontends.add(str(body.get("frontend_id", "")))
                        if len(ready_frontends) >= self.spec.num_frontends:
                            return
                        await asyncio.sleep(_POLL_S / 10)  # soon: likely another process
                        continue
                await asyncio.sleep(_POLL_S)

    def _raise_if_exited(self) -> None:
        for child in self.children:
            if child.proc.returncode is not None:
                where = f"; see {self.spec.log_dir}/{child.name}.log" if self.spec.log_dir else ""
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode} during start-up{where}"
                )

    async def _supervise_all(self) -> None:
        """Watch every process (``spec.supervise``) and follow the planner (``spec.planner``)
        until cancelled (by stop())."""
        async with asyncio.TaskGroup() as tg:
            if self.spec.supervise:
                for slot, name in enumerate(self._server_names):
                    tg.create_task(self._supervise_server(slot, name), name=f"supervise {name}")
                for child in self.children:
                    tg.create_task(self._supervise_child(child), name=f"supervise {child.name}")
            if self.spec.planner:
                following = self._pools.follow(
                    tg,
                    namespace=self.namespace,
                    nats_url=self.nats_url,
                    etcd_url=self.etcd_url,
                    env=self._env(),
                )
                tg.create_task(following, name="planner commands")

    async def _supervise_child(self, child: Child) -> None:
        async def wait() -> int:
            code = await child.proc.wait()
            if child.is_retiring:
                raise _Retired
            return code

        async def restart() -> int:
            if child.is_retiring:  # retired while it waited to be restarted
                raise _Retired
            child.proc = await self._exec(child.name, child.command)
            return child.proc.pid

        with contextlib.suppress(_Retired):
            await self._supervise(child.name, wait, restart)

    async def _supervise_server(self, slot: int, name: str) -> None:
        async def wait() -> int:
            return await wait_popen(self.servers[slot].proc)

        async def restart() -> int:
            old = self.servers[slot]
            if name == "etcd":  # the same member: its data, and so the leases, survive
                await self._start_server(
                    name,
                    start_etcd,
                    slot,
                    port=old.port,
                    data_dir=old.data_dir,
                    **self._server_options["etcd"],
                )
            else:
                await self._start_server(
                    name, start_nats, slot, port=old.port, **self._server_options["nats"]
                )
            return self.servers[slot].proc.pid

        await self._supervise(name, wait, restart)

    async def _supervise(
        self,
        name: str,
        wait: Callable[[], Awaitable[int]],
        restart: Callable[[], Awaitable[int]],
    ) -> None:
        """Restart one process whenever it exits, with exponential backoff; until cancelled."""
        spec = self.spec
        loop = asyncio.get_running_loop()
        delay, attempt = spec.restart_backoff_s, 0
        up_since = self._started_at.get(name, loop.time())
        while True:
            code = await wait()
            up_s = loop.time() - up_since
            if up_s >= spec.restart_reset_s:
                delay, attempt = spec.restart_backoff_s, 0
            reason = f"exited with code {code} after {up_s:.1f} s"
            while True:
                attempt += 1
                logger.warning(
                    "%s %s; restarting in %.1f s (attempt %d)", name, reason, delay, attempt
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, spec.restart_backoff_max_s)
                try:
                    pid = await restart()
                except (OSError, RuntimeError, TimeoutError) as exc:
                    reason = f"failed to restart ({exc})"
                    continue
                break
            up_since = loop.time()
            async with self._restarted:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._restarted.notify_all()
            logger.warning("%s restarted pid=%d (attempt %d)", name, pid, attempt)


class _Retired(Exception):
    """A child retired at the planner's request exited: its supervision ends."""


@contextlib.asynccontextmanager
async def local_cluster(spec: ClusterSpec) -> AsyncIterator[LocalCluster]:
    """Run a ready cluster for the duration of the block; stop it on the way out."""
    cluster = LocalCluster(spec)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The JSON object of a 200 answer; None if there is none (yet)."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            body = await resp.json()
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    return body if isinstance(body, dict) else None
