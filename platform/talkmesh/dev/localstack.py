"""A local Ray head and an MLflow server on 127.0.0.1, for ``make demo``, the job-submission
test and the benchmarks.

    with LocalStack("outputs/stack") as stack:          # ray start --head + mlflow server
        res = stack.submit_job(["python", "jobs/faceformer.py", "train.epochs=2"],
                               env_vars={"TALKMESH_CACHE": "/tmp/cache"})
        assert res.succeeded, res.logs
        print(stack.dashboard_url, stack.mlflow_uri)
    # everything it started is stopped here (also at interpreter exit and on SIGTERM/SIGHUP)

What it starts (both from the running interpreter's environment, so that Ray workers
import talkmesh):

- ``ray start --head --block`` bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
  notes/ray-mlflow.md §8) with **every** port chosen free at run time (GCS, dashboard,
  client server, object manager, node manager, dashboard agent, runtime-env agent,
  metrics, a private worker-port range), a private ``--temp-dir``, ``--num-cpus`` and the
  ``TRAIN_DRIVER`` resource that sweep trial drivers hold (§3). Token authentication is on
  (``RAY_AUTH_MODE=token``; the token is Ray's, ``~/.ray/auth_token`` unless
  ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` say otherwise).
- ``mlflow server`` with a SQLite backend and a proxied artifact store under the work
  directory, one worker, on 127.0.0.1.

Stopping never runs ``ray stop`` (which stops every Ray on the machine): the ``ray start
--block`` process is sent SIGTERM, which makes Ray shut down the processes of *that* node,
then whatever is left of this stack (its process groups, and processes whose command line
names its private temp directory) is terminated. The MLflow server's process group is
terminated. :meth:`LocalStack.stop` is idempotent.

Ray's Unix sockets live in the temp dir and a socket path has at most 107 bytes, so when
``<work_dir>/ray`` is too long the temp dir is a short directory under the system temp
dir; its logs are copied to ``<work_dir>/ray-logs`` when the stack stops and the
directory is removed.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["JobResult", "LocalStack", "StackError", "free_ports", "is_listening"]

LOOPBACK = "127.0.0.1"
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
_MAX_TEMP_DIR_CHARS = 40  # + "/session_<date>_<time>_<us>_<pid>/sockets/plasma_store" <= 107 (AF_UNIX)
_WORKER_PORTS = 200  # size of the private worker-port range


class StackError(RuntimeError):
    """The local stack could not be started (or a client command against it failed)."""


@dataclasses.dataclass
class JobResult:
    """The outcome of :meth:`LocalStack.submit_job`."""

    submission_id: str
    status: str  # SUCCEEDED / FAILED / STOPPED, or PENDING / RUNNING when it timed out, UNKNOWN
    returncode: int | None  # of ``ray job submit``
    logs: str  # what ``ray job submit`` printed: submission messages and the job's own logs
    wall_s: float
    timed_out: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


# --------------------------------------------------------------------------------------
# Ports and processes
# --------------------------------------------------------------------------------------


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` right now (held together while
    choosing, so they differ; another process may still take one before it is used)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bindable(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port_range(size: int, exclude: set[int], lo: int = 20000, hi: int = 30000) -> tuple[int, int]:
    """A run of ``size`` consecutive ports in [lo, hi) that are free now and not in ``exclude``."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(lo, hi - size)
        ports = range(start, start + size)
        if not exclude.intersection(ports) and all(_bindable(p) for p in ports):
            return start, start + size - 1
    raise StackError(f"no run of {size} free ports between {lo} and {hi} on {LOOPBACK}")


def is_listening(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_PRCTL: Any = None


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``), so a killed demo leaves no Ray head or MLflow
    server behind. ``prctl`` is looked up here, in the parent: between fork and exec the
    child only calls it (no dynamic loading there, which could deadlock a threaded parent)."""
    global _PRCTL
    if not sys.platform.startswith("linux"):
        return None
    if _PRCTL is None:
        try:
            import ctypes

            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _PRCTL = False
    if not _PRCTL:
        return None
    prctl = _PRCTL

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return hook


def _pids_mentioning(text: str) -> list[int]:
    """Pids of live processes (other than this one) whose command line contains ``text`` (Linux /proc)."""
    out = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    me = os.getpid()
    needle = text.encode()
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmd:
            out.append(int(d.name))
    return out


def _pids_in_group(pgid: int) -> list[int]:
    """Pids of live processes in process group ``pgid`` (Linux /proc)."""
    out = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _terminate_pids(pids: Sequence[int], grace_s: float) -> None:
    """SIGTERM ``pids``, wait up to ``grace_s``, SIGKILL the rest."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if _alive(p)]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = [p for p in live if _alive(p)]
        if not live:
            return


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _default_num_cpus() -> int:
    return max(2, os.cpu_count() or 1)


# Stacks still running at interpreter exit or on SIGTERM/SIGHUP are stopped (held here
# until stopped, so a dropped reference does not leak the services).
_LIVE: set[LocalStack] = set()
_HANDLERS_INSTALLED = False
_LOCK = threading.Lock()


def _stop_all() -> None:
    for stack in list(_LIVE):
        with contextlib.suppress(Exception):
            stack.stop()


def _on_signal(signum: int, frame: Any) -> None:
    _stop_all()
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    """atexit always; SIGTERM/SIGHUP only from the main thread and only where the program
    has not installed its own handler (an interrupted demo still cleans up)."""
    global _HANDLERS_INSTALLED
    with _LOCK:
        if _HANDLERS_INSTALLED:
            return
        atexit.register(_stop_all)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                    signal.signal(sig, _on_signal)
        _HANDLERS_INSTALLED = True


# --------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------


class LocalStack:
    """A Ray head (with dashboard and job server) and an MLflow server on 127.0.0.1.

    Args:
        work_dir: where the MLflow database and artifacts, the logs and (when the path is
            short enough) Ray's temp dir go; created if missing.
        num_cpus: CPUs the Ray head offers (default: the machine's, at least 2).
        resources: custom Ray resources (default ``{"TRAIN_DRIVER": 2}``, see notes §3).
        object_store_memory: bytes for Ray's object store (small by default: jobs here pass
            checkpoints through the file system, and the machine is shared).
        start_ray / start_mlflow: start only one of the two (e.g. a benchmark needs no MLflow).
        start_timeout_s: how long each service may take to answer before start() fails
            (the first MLflow start migrates a fresh database, ~20 s on 2 cores).
        env: extra environment for the Ray head (inherited by its workers and job drivers).
        echo: where progress lines go (None = silent).

    On Linux the services are told to exit (SIGTERM) when the thread that started them
    ends, so call :meth:`start` from a thread that outlives the stack (normally the main
    thread). Deploying Serve against the head: ``with stack.client_environ():
    ray.init(address=stack.ray_address); serve.start(http_options={"host": "127.0.0.1",
    "port": free_ports(1)[0]}); serve.run(app)``, or ``stack.run_cli(["serve", "deploy",
    path])`` / ``subprocess.Popen(["serve", "run", path], env=stack.env())``. Serve's
    actors run on this head, so :meth:`stop` ends them too.
    """

    def __init__(
        self,
        work_dir: str | Path,
        *,
        num_cpus: int | None = None,
        resources: Mapping[str, float] | None = None,
        object_store_memory: int | None = 256 * 1024**2,
        start_ray: bool = True,
        start_mlflow: bool = True,
        start_timeout_s: float = 180.0,
        env: Mapping[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if not (start_ray or start_mlflow):
            raise ValueError("LocalStack: start_ray and start_mlflow are both False; nothing to start")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"LocalStack: num_cpus must be >= 1, got {num_cpus}")
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.num_cpus = num_cpus or _default_num_cpus()
        self.resources = dict({"TRAIN_DRIVER": 2} if resources is None else resources)
        self.object_store_memory = object_store_memory
        self.start_ray = start_ray
        self.start_mlflow = start_mlflow
        self.start_timeout_s = start_timeout_s
        self.extra_env = dict(env or {})
        self.echo = echo
        self.bin_dir = Path(sys.executable).parent  # the venv's ray / mlflow / serve
        self.ports: dict[str, int] = {}
        self.worker_ports: tuple[int, int] | None = None
        self.temp_dir: Path | None = None
        self._temp_is_private = False  # a short dir outside work_dir: copied back and removed on stop
        self._ray: subprocess.Popen | None = None
        self._mlflow: subprocess.Popen | None = None
        self._logs: list[Any] = []
        self._started = False
        self._stopped = False

    # ---- addresses ------------------------------------------------------------------

    @property
    def ray_address(self) -> str:
        """GCS address (``ray.init(address=...)``, ``RAY_ADDRESS`` for drivers)."""
        self._need("ray")
        return f"{LOOPBACK}:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / job server / ``serve deploy`` address."""
        self._need("ray")
        return f"http://{LOOPBACK}:{self.ports['dashboard']}"

    @property
    def mlflow_uri(self) -> str:
        """MLflow tracking (and registry) URI of the server."""
        self._need("mlflow")
        return f"http://{LOOPBACK}:{self.ports['mlflow']}"

    @property
    def logs_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def mlflow_db(self) -> Path:
        return self.work_dir / "mlflow.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir / "mlartifacts"

    def _need(self, what: str) -> None:
        if not self._started:
            raise StackError("LocalStack is not started; call start() or use it as a context manager")
        if what == "ray" and not self.start_ray:
            raise StackError("this LocalStack runs no Ray head (start_ray=False)")
        if what == "mlflow" and not self.start_mlflow:
            raise StackError("this LocalStack runs no MLflow server (start_mlflow=False)")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and processes (``ray job submit``, ``serve
        deploy``, a Python driver): ``base`` (default ``os.environ``) plus the addresses,
        token auth and loopback settings. Never changes ``os.environ``."""
        env = dict(os.environ if base is None else base)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if self.start_ray:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_ADDRESS"] = self.ray_address  # ray.init() / serve.run attach here
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url  # ray job ...
            env["RAY_DASHBOARD_ADDRESS"] = self.dashboard_url  # serve deploy / status
        if self.start_mlflow:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
            env["MLFLOW_REGISTRY_URI"] = self.mlflow_uri
        return env

    @contextlib.contextmanager
    def client_environ(self) -> Iterator[dict[str, str]]:
        """Temporarily apply :meth:`env` to ``os.environ`` (for an in-process
        ``ray.init(address=stack.ray_address)`` / ``serve.run`` against the head); the
        previous values come back afterwards.

        Ray reads ``RAY_AUTH_MODE`` into its cached config; when ``ray`` was imported before
        (with token auth off), the cache is refreshed here, otherwise ``ray.init`` fails with
        "Authentication token is missing or incorrect". Setting ``RAY_AUTH_MODE=token``
        before importing ray avoids the question."""
        new = self.env()
        saved = {k: os.environ.get(k) for k in new}
        os.environ.update(new)
        _refresh_ray_config()
        try:
            yield new
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def all_ports(self) -> list[int]:
        """Every TCP port this stack chose (services and the worker range)."""
        ports = sorted(set(self.ports.values()))
        if self.worker_ports:
            ports += list(range(self.worker_ports[0], self.worker_ports[1] + 1))
        return ports

    def listening_ports(self) -> list[int]:
        """The stack's ports that still accept connections (empty after :meth:`stop`)."""
        return [p for p in self.all_ports() if is_listening(p, timeout=0.2)]

    # ---- start ----------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _say(self, msg: str) -> None:
        if self.echo is not None:
            self.echo(msg)

    def start(self) -> LocalStack:
        """Start the services (Ray and MLflow concurrently) and wait until both answer."""
        if self._started:
            return self
        if self._stopped:
            raise StackError("a stopped LocalStack cannot be restarted; make a new one")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        _install_handlers()
        _LIVE.add(self)
        self._started = True
        try:
            if self.start_mlflow:
                self._spawn_mlflow()
            if self.start_ray:
                self._spawn_ray()
            if self.start_ray:
                self._wait_ray()
            if self.start_mlflow:
                self._wait_mlflow()
        except BaseException:
            self.stop()
            raise
        return self

    def _popen(self, cmd: list[str], log_name: str, env: Mapping[str, str]) -> subprocess.Popen:
        log = open(self.logs_dir / log_name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(self.work_dir),
            start_new_session=True,  # own process group: stop() terminates exactly this
            preexec_fn=_pdeathsig_hook(),
        )

    def _spawn_mlflow(self) -> None:
        (self.ports["mlflow"],) = free_ports(1)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.bin_dir / "mlflow"),
            "server",
            "--backend-store-uri", f"sqlite:///{self.mlflow_db}",
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", LOOPBACK,
            "--port", str(self.ports["mlflow"]),
            "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(k, None)
        # No GenAI job runner: it starts seven huey consumer processes that tracking and the
        # model registry do not use (and that outlive a killed server for a while).
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self._say(f"[stack] mlflow server on {LOOPBACK}:{self.ports['mlflow']} (store {self.mlflow_db})")
        self._mlflow = self._popen(cmd, "mlflow-server.log", env)

    def _choose_temp_dir(self) -> Path:
        inside = self.work_dir / "ray"
        if len(str(inside)) <= _MAX_TEMP_DIR_CHARS:
            inside.mkdir(parents=True, exist_ok=True)
            return inside
        self._temp_is_private = True
        return Path(tempfile.mkdtemp(prefix="tmray-", dir="/tmp" if Path("/tmp").is_dir() else None))

    def _spawn_ray(self) -> None:
        names = ["gcs", "dashboard", "client_server", "object_manager", "node_manager",
                 "dashboard_agent_http", "dashboard_agent_grpc", "runtime_env_agent", "metrics_export"]  # fmt: skip
        taken = set(self.ports.values())
        ports = [p for p in free_ports(len(names) + len(taken)) if p not in taken][: len(names)]
        self.ports.update(zip(names, ports, strict=True))
        self.worker_ports = _free_port_range(_WORKER_PORTS, set(self.ports.values()))
        self.temp_dir = self._choose_temp_dir()
        p = self.ports
        cmd = [
            str(self.bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--dashboard-host={LOOPBACK}",
            "--include-dashboard=true",
            f"--port={p['gcs']}",
            f"--dashboard-port={p['dashboard']}",
            f"--ray-client-server-port={p['client_server']}",
            f"--object-manager-port={p['object_manager']}",
            f"--node-manager-port={p['node_manager']}",
            f"--dashboard-agent-listen-port={p['dashboard_agent_http']}",
            f"--dashboard-agent-grpc-port={p['dashboard_agent_grpc']}",
            f"--runtime-env-agent-port={p['runtime_env_agent']}",
            f"--metrics-export-port={p['metrics_export']}",
            f"--min-worker-port={self.worker_ports[0]}",
            f"--max-worker-port={self.worker_ports[1]}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0" if not _has_cuda_env() else "",
            f"--resources={json.dumps(self.resources)}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]
        if self.object_store_memory:
            cmd.append(f"--object-store-memory={int(self.object_store_memory)}")
        cmd = [c for c in cmd if c]
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
            env.pop(k, None)  # never attach to somebody else's cluster
        env.update(
            {
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # really bind 127.0.0.1 (notes §8)
                "RAY_AUTH_MODE": "token",
                "RAY_USAGE_STATS_ENABLED": "0",
                # SIGTERM to `ray start --block` drains the node for up to 30 s by default;
                # nothing here needs draining (Serve apps are shut down by their owner)
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                # so that job drivers started by this head find the venv's executables first
                "PATH": f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        if self.start_mlflow:  # jobs and workers log to this server unless a job says otherwise
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        env.update(self.extra_env)
        self._say(f"[stack] ray head: GCS {LOOPBACK}:{p['gcs']}, dashboard {LOOPBACK}:{p['dashboard']}, "
                  f"{self.num_cpus} CPUs, resources {self.resources}, temp dir {self.temp_dir}")  # fmt: skip
        self._ray = self._popen(cmd, "ray-head.log", env)

    def _failure(self, what: str, why: str, logs: Sequence[Path]) -> StackError:
        parts = [f"LocalStack: {what} {why}"]
        for path in logs:
            if path.is_file():
                parts.append(f"---- last lines of {path} ----\n{_tail(path)}")
        return StackError("\n".join(parts))

    def _ray_logs(self) -> list[Path]:
        files = [self.logs_dir / "ray-head.log"]
        if self.temp_dir is not None:
            sess = self.temp_dir / "session_latest" / "logs"
            files += [sess / n for n in ("gcs_server.out", "raylet.out", "dashboard.log", "dashboard_agent.log")]
        return files

    def _http_get(self, url: str, auth: bool = False, timeout: float = 5.0) -> tuple[int, bytes]:
        req = urllib.request.Request(url)
        if auth:
            token = ray_auth_token()
            if token:
                req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback http only
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait(self, what: str, proc: subprocess.Popen, ready: Callable[[], bool], logs: Sequence[Path]) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise self._failure(what, f"exited with code {proc.returncode} while starting", logs)
            try:
                if ready():
                    self._say(f"[stack] {what} ready after {time.monotonic() - t0:.1f} s")
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise self._failure(what, f"did not answer within {self.start_timeout_s:.0f} s", logs)
            time.sleep(0.5)

    def _wait_ray(self) -> None:
        assert self._ray is not None

        def ready() -> bool:
            if not is_listening(self.ports["gcs"]):
                return False
            # the job server answers (with the token) once the dashboard's job module is up
            status, body = self._http_get(f"{self.dashboard_url}/api/jobs/", auth=True)
            if status in (401, 403):
                raise StackError(f"the Ray dashboard refused the auth token ({status}): {body[:200]!r}")
            return status == 200

        self._wait("Ray head", self._ray, ready, self._ray_logs())

    def _wait_mlflow(self) -> None:
        assert self._mlflow is not None

        def ready() -> bool:
            status, body = self._http_get(f"{self.mlflow_uri}/health")
            return status == 200

        self._wait("MLflow server", self._mlflow, ready, [self.logs_dir / "mlflow-server.log"])

    # ---- client commands --------------------------------------------------------------

    def run_cli(
        self, args: Sequence[str], *, cwd: str | Path | None = None, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a venv executable (``ray``, ``serve``, ``mlflow``, ``python``) with the client
        environment, e.g. ``stack.run_cli(["serve", "deploy", "serve/config.yaml"])``."""
        exe = self.bin_dir / args[0]
        cmd = [str(exe) if exe.exists() else args[0], *args[1:]]
        res = subprocess.run(cmd, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise StackError(
                f"`{' '.join(args)}` exited with {res.returncode}:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
            )
        return res

    def job_info(self, submission_id: str) -> dict[str, Any] | None:
        """The job server's record of a job (``status``, ``message``, ...), None if unknown."""
        status, body = self._http_get(f"{self.dashboard_url}/api/jobs/{submission_id}", auth=True, timeout=10.0)
        if status == 404:
            return None
        if status != 200:
            raise StackError(f"job server: GET /api/jobs/{submission_id} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def job_logs(self, submission_id: str) -> str:
        status, body = self._http_get(f"{self.dashboard_url}/api/jobs/{submission_id}/logs", auth=True, timeout=30.0)
        if status != 200:
            raise StackError(f"job server: logs of {submission_id} answered {status}: {body[:300]!r}")
        return json.loads(body).get("logs", "")

    def stop_job(self, submission_id: str) -> None:
        self.run_cli(["ray", "job", "stop", "--address", self.dashboard_url, submission_id], check=False, timeout=60)

    def submit_job(
        self,
        entrypoint: Sequence[str],
        *,
        working_dir: str | Path = ".",
        env_vars: Mapping[str, str] | None = None,
        submission_id: str | None = None,
        timeout: float = 1800.0,
        excludes: Sequence[str] = (),
        echo: Callable[[str], None] | None = None,
    ) -> JobResult:
        """``ray job submit --working-dir . --submission-id ID --runtime-env-json
        '{"env_vars": {...}}' -- <entrypoint>`` run from ``working_dir`` with the client
        environment; waits for the job (its logs streamed through ``echo`` as they come
        and returned in the result). ``env_vars`` reach the driver and every worker; the
        MLflow URI of this stack is added unless given. On ``timeout`` the job is
        stopped and the result says ``timed_out``.

        The working directory is uploaded (<= 500 MiB): ``.gitignore`` and ``.rayignore``
        decide what stays out.
        """
        self._need("ray")
        if not entrypoint:
            raise ValueError("submit_job: entrypoint is empty; expected e.g. ['python', 'jobs/faceformer.py']")
        sid = submission_id or f"talkmesh-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise ValueError(f"submit_job: working_dir {wd} is not a directory")
        ship = dict(env_vars or {})
        # Ray's own helpers inside the job (e.g. Train's placement-group cleaner) look the
        # cluster up by address; without it they fail when other Rays run on the machine.
        ship.setdefault("RAY_ADDRESS", self.ray_address)
        if self.start_mlflow:
            ship.setdefault("MLFLOW_TRACKING_URI", self.mlflow_uri)
        runtime_env: dict[str, Any] = {"env_vars": {str(k): str(v) for k, v in ship.items()}}
        if excludes:
            runtime_env["excludes"] = list(excludes)
        cmd = [
            str(self.bin_dir / "ray"), "job", "submit",
            "--address", self.dashboard_url,
            "--working-dir", ".",
            "--submission-id", sid,
            "--runtime-env-json", json.dumps(runtime_env),
            "--log-style=record", "--log-color=false",
            "--", *entrypoint,
        ]  # fmt: skip
        self._say(f"[stack] ray job submit {sid}: {' '.join(entrypoint)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=str(wd),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if echo is not None:
                    echo(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop_job(sid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except BaseException:  # interrupted: do not leave the job running
            with contextlib.suppress(Exception):
                self.stop_job(sid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        reader.join(timeout=10)
        wall = time.monotonic() - t0
        status = "UNKNOWN"
        # the submit command returns once the job is terminal; the record may lag a moment
        for _ in range(20):
            try:
                info = self.job_info(sid)
            except (StackError, OSError, ValueError):
                info = None
            if info is not None:
                status = str(info.get("status", "UNKNOWN"))
                if status in TERMINAL_JOB_STATES or timed_out:
                    break
            time.sleep(0.5)
        res = JobResult(sid, status, proc.returncode, "".join(lines), wall, timed_out)
        self._say(f"[stack] job {sid}: {status} after {wall:.1f} s")
        return res

    # ---- stop -----------------------------------------------------------------------

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop everything this stack started; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE.discard(self)
        if self._ray is not None:
            self._stop_ray(grace_s)
        if self._mlflow is not None:
            self._stop_group(self._mlflow, grace_s=10.0)
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()
        if self._temp_is_private and self.temp_dir is not None:
            src = self.temp_dir / "session_latest" / "logs"
            if src.is_dir():
                with contextlib.suppress(OSError, shutil.Error):
                    shutil.copytree(src, self.work_dir / "ray-logs", dirs_exist_ok=True, symlinks=False)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._say("[stack] stopped")

    def leftover_pids(self) -> list[int]:
        """Live processes of this stack: members of its services' process groups and
        processes whose command line names its Ray temp dir (empty after :meth:`stop`)."""
        pids: set[int] = set()
        for proc in (self._ray, self._mlflow):
            if proc is not None:
                pids.update(_pids_in_group(proc.pid))
        if self.temp_dir is not None:
            pids.update(_pids_mentioning(str(self.temp_dir)))
        return sorted(p for p in pids if _alive(p))

    def _stop_group(self, proc: subprocess.Popen, grace_s: float) -> None:
        """SIGTERM the process group of ``proc`` (its session), wait, SIGKILL what is left."""
        pgid = proc.pid  # start_new_session: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            members = _pids_in_group(pgid)
            if proc.poll() is None or members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                proc.poll()
                if proc.returncode is not None and not _pids_in_group(pgid):
                    return
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)

    def _stop_ray(self, grace_s: float) -> None:
        """SIGTERM ``ray start --block`` (Ray stops the processes of this node), then the
        process group and anything naming this stack's temp dir (workers, agents)."""
        assert self._ray is not None
        proc = self._ray
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        self._stop_group(proc, grace_s=5.0)
        if self.temp_dir is not None:
            leftovers = _pids_mentioning(str(self.temp_dir))
            if leftovers:
                _terminate_pids(leftovers, grace_s=5.0)


def _refresh_ray_config() -> None:
    """Make an already imported ray re-read RAY_AUTH_MODE (what ray itself does when it
    turns token auth on for a new local cluster)."""
    if "ray._raylet" not in sys.modules:
        return
    with contextlib.suppress(Exception):
        sys.modules["ray._raylet"].Config.initialize("")


def _has_cuda_env() -> bool:
    """Whether to let Ray detect GPUs (it does so itself); False pins ``--num-gpus=0`` on
    machines without NVIDIA devices, avoiding a slow probe."""
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def ray_auth_token() -> str | None:
    """The Ray auth token a client would send: ``RAY_AUTH_TOKEN``, the file at
    ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
