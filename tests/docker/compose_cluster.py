"""Drive `docker compose` (v2) or `docker-compose` (1.29) from a test: a throwaway build
context with a wheelhouse, one image, one project, torn down with `down`."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# What the image and the compose files need; copied to a temp dir with the wheelhouse beside.
CONTEXT_FILES = (
    "Dockerfile",
    ".dockerignore",
    "compose.yaml",
    "compose.gpu.yaml",
    "pyproject.toml",
    "README.md",
    "proto",
    "shared",
    "services",
    "tests/docker/compose.disagg.yaml",
)
DISAGG_OVERRIDE = "tests/docker/compose.disagg.yaml"


def run(args: Sequence[str], *, cwd: Path | None = None, timeout_s: float = 120.0, env=None) -> str:
    """Run a command; its stdout, or AssertionError with its output when it fails."""
    result = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def docker_answers() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if result.returncode != 0:
        return "no Docker engine answers `docker info` (../shared/docker/engine.sh starts one)"
    return None


def compose_command() -> list[str] | None:
    """`docker compose` when the v2 plugin is installed, else `docker-compose`, else None."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) is None:
            continue
        try:
            result = subprocess.run(
                [*command, "version"], capture_output=True, timeout=15, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0:
            return command
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout_s: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@dataclass
class Timeline:
    """Log lines stamped with seconds since the start, for the report."""

    started: float = field(default_factory=time.monotonic)

    def log(self, text: str, *args: object) -> None:
        logger.info("[%6.1fs] %s", time.monotonic() - self.started, text % args)


@dataclass
class ComposeCluster:
    """One compose project from a copy of this checkout, built offline from a wheelhouse."""

    compose: list[str]
    context: Path
    base_image: str
    timeline: Timeline = field(default_factory=Timeline)
    project: str = field(default_factory=lambda: f"batontest{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)

    @property
    def image(self) -> str:
        return f"baton:{self.project}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BATON_IMAGE": self.image,
            "BATON_DOCKER_BASE": self.base_image,
            "BATON_WHEELS": "wheels",
            "BATON_COMPOSE_PORT": str(self.port),
        }

    def run(self, *args: str, files: Sequence[str] = ("compose.yaml",), timeout_s=300.0) -> str:
        file_args = [arg for f in files for arg in ("-f", f)]
        command = [*self.compose, "-p", self.project, *file_args, *args]
        return run(command, cwd=self.context, env=self.env(), timeout_s=timeout_s)

    def prepare(self) -> None:
        """Copy the sources and build a wheelhouse from them (the host's pip, index or cache)."""
        for name in CONTEXT_FILES:
            source, target = REPO / name, self.context / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
        wheels = self.context / "wheels"
        run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), ".", "setuptools"],
            cwd=self.context,
            timeout_s=600,
        )
        size_mb = sum(p.stat().st_size for p in wheels.iterdir()) / 2**20
        num_wheels = len(list(wheels.iterdir()))
        self.timeline.log("wheelhouse built: %d wheels, %.0f MiB", num_wheels, size_mb)

    def container_ids(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).split()

    def state(self, container_id: str) -> str:
        return run(["docker", "inspect", "-f", "{{json .State}}", container_id]).strip()

    def wait_healthy(self, service: str, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            states = [json.loads(self.state(c)) for c in self.container_ids(service)]
            if states and all(s.get("Health", {}).get("Status") == "healthy" for s in states):
                return
            time.sleep(0.5)
        raise AssertionError(f"{service} not healthy within {deadline_s} s:\n{self.logs()}")

    def wait_ready(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if http_get(f"{self.api}/ready")[0] == 200:
                return
            time.sleep(0.5)
        raise AssertionError(f"frontend not ready within {deadline_s} s:\n{self.logs()}")

    def exec_get(self, container_id: str, url: str) -> str:
        """GET ``url`` from inside a container (its ports are not published)."""
        code = (
            "import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())"
        )
        return run(["docker", "exec", container_id, "python3", "-c", code, url])

    def logs(self) -> str:
        try:
            return self.run("ps") + self.run("logs", "--no-color", "--tail", "40", timeout_s=60)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            return f"(no logs: {exc})"

    def down(self) -> None:
        self.run("down", "--remove-orphans", "--timeout", "50", timeout_s=300)
        subprocess.run(["docker", "rmi", "-f", self.image], capture_output=True, check=False)
