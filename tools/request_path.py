"""Which of the project's files one streaming request runs code in, in the order it reaches them.

Starts a disaggregated cluster (nats-server, etcd, a router, a prefill and a decode worker, the
frontend) from the checkout given by ``--tree``, sends one warm-up request, then records, in
every process, each project file whose Python functions are called while one streaming chat
completion is served (its prompt is long enough to be prefilled remotely), and prints them in the
order they were first reached, with the process. What runs in the window besides the request
(load reports, the engine loops) counts too, as it would in any measurement by time. Recording
uses ``sys.setprofile``, switched on and off by SIGUSR1 and SIGUSR2 through a
``sitecustomize`` module that only this tool puts on the services' path. Also counts import
cycles among the project's modules (static, from the AST; ``TYPE_CHECKING`` imports count).

    .venv/bin/python tools/request_path.py                # this checkout
    .venv/bin/python tools/request_path.py --tree ../old  # another checkout of the project
"""

import argparse
import ast
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SITECUSTOMIZE = """
import json, os, signal, sys, threading, time
_root = os.environ["BATON_PATH_ROOT"]
_out = os.environ["BATON_PATH_OUT"]
_seen = {}
def _profile(frame, event, arg):
    if event == "call":
        name = frame.f_code.co_filename
        if name.startswith(_root) and name not in _seen:
            _seen[name] = time.time()
def _start(*_):
    _seen.clear()
    sys.setprofile(_profile)
    threading.setprofile(_profile)
def _stop(*_):
    sys.setprofile(None)
    threading.setprofile(None)
    with open(f"{_out}/{os.getpid()}.json", "w") as f:
        json.dump({"argv": sys.argv, "seen": _seen}, f)
signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, workers: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as resp:
                body = json.loads(resp.read())
            if body.get("ready") and body.get("workers", 0) >= workers:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


def post(url: str, prompt_words: int) -> None:
    body = {
        "model": "baton-sim",
        "messages": [{"role": "user", "content": " ".join(["tokens"] * prompt_words)}],
        "max_tokens": 8,
        "stream": True,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        resp.read()


def import_cycles(tree: Path) -> list[list[str]]:
    """Strongly connected groups (of two or more modules) in the import graph of proto/,
    shared/ and services/, counting every import statement, TYPE_CHECKING ones included."""
    modules: dict[str, Path] = {}
    for top in ("proto", "shared", "services"):
        for path in (tree / top).rglob("*.py"):
            parts = path.relative_to(tree).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    has_worker = (tree / "services" / "worker").is_dir()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        out = Path(tmp) / "out"
        site.mkdir()
        out.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = dict(
            os.environ,
            PYTHONPATH=f"{site}:{tree}",
            BATON_PATH_ROOT=str(tree) + "/",
            BATON_PATH_OUT=str(out),
            BATON_LOG_LEVEL="warning",
            BATON_NAMESPACE="path",
            # Every prompt goes to the prefill worker, whatever decides it in that checkout.
            BATON_ROUTER_MIN_REMOTE_PREFILL_TOKENS="1",
            BATON_ROUTER_MIN_REMOTE_PREFILL_FRACTION="0",
            BATON_DECODE_MIN_REMOTE_PREFILL_TOKENS="1",
            BATON_DECODE_MIN_REMOTE_PREFILL_FRACTION="0",
            BATON_FRONTEND_ROUTE_TIMEOUT_S="5",
        )
        server_proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from shared.servers import start_nats, start_etcd; import json, sys, time;"
                "n = start_nats(); e = start_etcd();"
                "print(json.dumps([n.url, e.url]), flush=True); sys.stdin.read();"
                "n.stop(); e.stop()",
            ],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server_proc.stdout is not None
        nats_url, etcd_url = json.loads(server_proc.stdout.readline())
        env.update(BATON_NATS_URL=nats_url, BATON_ETCD_URL=etcd_url)
        port = free_port()
        if has_worker:
            prefill = ["services.worker", "--role", "prefill"]
            decode = ["services.worker", "--role", "decode"]
        else:
            prefill, decode = ["services.prefill"], ["services.decode"]
        commands = [
            ["services.router", "--port", str(free_port())],
            prefill,
            decode,
            ["services.frontend", "--port", str(port)],
        ]
        procs = [subprocess.Popen([sys.executable, "-m", *c], cwd=tree, env=env) for c in commands]
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, 2, 60)
            post(url, 600)  # warm-up: connections, caches, lazy imports
            for proc in procs:
                os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.5)
            post(url, 700)  # a prompt the warm-up did not cache
            time.sleep(0.5)
            for proc in procs:
                os.kill(proc.pid, signal.SIGUSR2)
            time.sleep(1.0)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            assert server_proc.stdin is not None
            server_proc.stdin.close()
            server_proc.wait(30)
        firsts: dict[str, tuple[float, str]] = {}
        for path in out.glob("*.json"):
            record = json.loads(path.read_text())
            argv = record["argv"]
            joined = " ".join(argv)
            who = next((a for a in ("router", "prefill", "decode", "frontend") if a in joined), "?")
            for name, t in record["seen"].items():
                rel = str(Path(name).relative_to(tree))
                if rel.split("/")[0] not in ("proto", "shared", "services"):
                    continue  # a virtual environment inside the checkout, say
                if rel not in firsts or t < firsts[rel][0]:
                    firsts[rel] = (t, who)
    ordered = sorted(firsts.items(), key=lambda item: item[1][0])
    print(f"files one streaming disaggregated request runs code in ({tree}):")
    for i, (rel, (_, who)) in enumerate(ordered, 1):
        print(f"  {i:3d}  {who:<9} {rel}")
    cycles = import_cycles(tree)
    print(f"total: {len(ordered)} files; import cycles: {len(cycles)}")
    for cycle in cycles:
        print(f"  cycle: {' <-> '.join(cycle)}")


if __name__ == "__main__":
    main()
