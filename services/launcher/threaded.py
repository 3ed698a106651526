"""A local cluster for synchronous callers (the benches): `local_cluster` on a background loop."""

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future

from services.launcher.cluster import ClusterSpec, LocalCluster, local_cluster


@contextlib.contextmanager
def cluster_in_thread(spec: ClusterSpec) -> Iterator[LocalCluster]:
    """Start a cluster on an event loop of its own in a background thread, yield it once it is
    ready, and stop it (then join the thread) on the way out, also when the block raises.

    From the caller's thread read its plain attributes (``url``, ``api``, ``pids``,
    ``router_urls``, ``children[i].name``); its processes belong to the other loop, so signal
    them through ``os.kill(pid, ...)`` rather than their methods."""
    handle: Future[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]] = Future()
    started: Future[LocalCluster] = Future()
    finished: Future[None] = Future()

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        handle.set_result((asyncio.get_running_loop(), task))
        async with local_cluster(spec) as cluster:
            started.set_result(cluster)
            await asyncio.Event().wait()  # until the caller cancels this task

    def main() -> None:
        try:
            with asyncio.Runner() as runner:
                runner.run(run())
        except asyncio.CancelledError:
            finished.set_result(None)
        except BaseException as exc:  # handed over to the caller's thread
            finished.set_exception(exc)
        else:
            finished.set_result(None)
        error = finished.exception() or RuntimeError("the cluster stopped before it was ready")
        for future in (handle, started):
            if not future.done():
                future.set_exception(error)

    thread = threading.Thread(target=main, name="baton-cluster")
    thread.start()
    try:
        yield started.result()
    finally:
        if handle.exception() is None:  # waits for the loop to start: an instant
            loop, task = handle.result()
            with contextlib.suppress(RuntimeError):  # the loop has closed: start-up failed
                loop.call_soon_threadsafe(task.cancel)
        thread.join()
    finished.result()
