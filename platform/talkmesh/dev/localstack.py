"""A local Ray head and an MLflow server on 127.0.0.1, for ``make demo``, the job-submission
test and the benchmarks.

    with LocalStack("outputs/stack") as stack:          # ray start --head + mlflow server
        res = stack.submit_job(["python", "jobs/faceformer.py", "train.epochs=2"],
                               env_vars={"TALKMESH_CACHE": "/tmp/cache"})
        assert res.succeeded, res.logs
        print(stack.dashboard_url, stack.mlflow_uri)
    # everything it started is stopped here (also at interpreter exit and on SIGTERM/SIGHUP)

- ``ray start --head --block`` from the running interpreter's environment (so Ray workers import
  talkmesh), bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, notes/ray-mlflow.md §8),
  every port chosen free at run time, a private ``--temp-dir``, ``--num-cpus`` and the
  ``TRAIN_DRIVER`` resource that sweep trial drivers hold (§3). Token authentication is on with a
  token of this stack's own, in ``<work_dir>/ray_auth_token`` (mode 0600), so the stack needs no
  ``~/.ray/auth_token``; :meth:`LocalStack.env` hands it to clients (``RAY_AUTH_TOKEN_PATH``).
- ``mlflow server`` with a SQLite backend and a proxied artifact store under the work directory,
  one worker, on 127.0.0.1.

Jobs go through :class:`ray.job_submission.JobSubmissionClient`; processes are watched and stopped
with ``psutil``. Stopping never runs ``ray stop`` (it stops every Ray on the machine): ``ray start
--block`` gets SIGTERM, which makes Ray shut down the processes of *that* node, then whatever is
left of the process trees this stack started is terminated. :meth:`LocalStack.stop` is idempotent.

Ray's Unix sockets live in the temp dir and a socket path has at most 107 bytes, so when
``<work_dir>/ray`` is too long the temp dir is a short directory under the system temp dir; its
logs are copied to ``<work_dir>/ray-logs`` when the stack stops and the directory is removed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import os
import random
import secrets
import shlex
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
_MAX_TEMP_DIR_CHARS = 40  # + "/session_<date>_<time>_<us>_<pid>/sockets/plasma_store" <= 107 (AF_UNIX)
_WORKER_PORTS = 200  # size of the private worker-port range
_RAY_PORTS = ("gcs", "dashboard", "client_server", "object_manager", "node_manager",
              "dashboard_agent_http", "dashboard_agent_grpc", "runtime_env_agent", "metrics_export")  # fmt: skip


class StackError(RuntimeError):
    """The local stack could not be started (or a client command against it failed)."""


@dataclasses.dataclass
class JobResult:
    """The outcome of :meth:`LocalStack.submit_job`."""

    submission_id: str
    status: str  # SUCCEEDED / FAILED / STOPPED, or PENDING / RUNNING when it timed out
    returncode: int | None  # the entrypoint's exit code (None when it did not exit by itself)
    logs: str  # the job's own output (driver stdout + stderr)
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


def is_listening(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port_range(size: int, exclude: set[int], lo: int = 20000, hi: int = 30000) -> tuple[int, int]:
    """A run of ``size`` consecutive ports in [lo, hi) that are free now and not in ``exclude``
    (Ray takes a worker-port range, not a list; the kernel hands out single ports only)."""

    def bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                return False
        return True

    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(lo, hi - size)
        ports = range(start, start + size)
        if not exclude.intersection(ports) and all(bindable(p) for p in ports):
            return start, start + size - 1
    raise StackError(f"no run of {size} free ports between {lo} and {hi} on {LOOPBACK}")


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies, even by SIGKILL, so a
    killed demo leaves no Ray head or MLflow server behind. Hand-written because neither
    ``subprocess`` nor ``psutil`` exposes Linux ``PR_SET_PDEATHSIG``. ``prctl`` is looked up here, in
    the parent: between fork and exec the child only calls it (no dynamic loading there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _alive(proc: Any) -> bool:
    """Whether a ``psutil.Process`` still runs (a zombie does not; a reused pid is not it)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(procs: Sequence[Any], grace_s: float) -> None:
    """SIGTERM the live ``psutil.Process`` es in ``procs`` and their descendants, wait up to
    ``grace_s``, SIGKILL what is left and wait until it is gone: a killed process can take many
    seconds to exit on a machine short of memory or disk bandwidth (it frees its memory first)."""
    import psutil

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 120.0)):
        live = {p.pid: p for p in procs if _alive(p)}
        for p in list(live.values()):
            with contextlib.suppress(psutil.Error):
                live.update((c.pid, c) for c in p.children(recursive=True))
        for p in live.values():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, left = psutil.wait_procs(list(live.values()), timeout=wait_s)
        if not left:
            return


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path}: not readable)"


# Stacks still running at interpreter exit or on SIGTERM/SIGHUP are stopped (held here until
# stopped, so a dropped reference does not leak the services). Neither Ray nor psutil does this.
_LIVE: set[LocalStack] = set()
_HANDLERS_INSTALLED = threading.Event()


def _stop_all() -> None:
    for stack in list(_LIVE):
        with contextlib.suppress(Exception):
            stack.stop()


def _on_signal(signum: int, frame: Any) -> None:
    _stop_all()
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    """atexit always; SIGTERM/SIGHUP only from the main thread and only where the program has not
    installed its own handler (an interrupted demo still cleans up)."""
    if _HANDLERS_INSTALLED.is_set():
        return
    _HANDLERS_INSTALLED.set()
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def _refresh_ray_config() -> None:
    """Make an already imported ray re-read ``RAY_AUTH_MODE`` and the token: Ray caches both at first
    use and has no public call to re-read them (its own ``ray.init`` does this for a new cluster)."""
    if "ray._raylet" not in sys.modules:
        return
    raylet = sys.modules["ray._raylet"]
    with contextlib.suppress(Exception):
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


# --------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------


class LocalStack:
    """A Ray head (with dashboard and job server) and an MLflow server on 127.0.0.1.

    Args:
        work_dir: where the MLflow database and artifacts, the logs, the Ray auth token and (when
            the path is short enough) Ray's temp dir go; created if missing.
        num_cpus: CPUs the Ray head offers (default: the machine's, at least 2).
        resources: custom Ray resources (default ``{"TRAIN_DRIVER": 2}``, see notes §3).
        object_store_memory: bytes for Ray's object store (small by default: jobs here pass
            checkpoints through the file system, and the machine is shared).
        start_ray / start_mlflow: start only one of the two (e.g. a benchmark needs no MLflow).
        start_timeout_s: how long each service may take to answer before start() fails (the
            first MLflow start migrates a fresh database: ~20 s on 2 idle cores, minutes on busy ones).
        env: extra environment for the Ray head (inherited by its workers and job drivers).
        echo: where progress lines go (None = silent).

    On Linux the services are told to exit (SIGTERM) when the thread that started them ends, so
    call :meth:`start` from a thread that outlives the stack (normally the main thread). Deploying
    Serve against the head: ``with stack.client_environ(): ray.init(address=stack.ray_address);
    serve.start(http_options={"host": "127.0.0.1", "port": free_ports(1)[0]}); serve.run(app)``, or
    ``stack.run_cli(["serve", "deploy", path])``. Serve's actors run on this head, so :meth:`stop`
    ends them too.
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
        start_timeout_s: float = 300.0,
        env: Mapping[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if not (start_ray or start_mlflow):
            raise ValueError("LocalStack: start_ray and start_mlflow are both False; nothing to start")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"LocalStack: num_cpus must be >= 1, got {num_cpus}")
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.num_cpus = num_cpus or max(2, os.cpu_count() or 1)
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
        self._services: dict[str, subprocess.Popen] = {}  # "ray" / "mlflow" -> its leader process
        self._seen: dict[int, Any] = {}  # pid -> psutil.Process of every process seen in the services' trees
        self._logs: list[Any] = []
        self._client: Any = None
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

    @property
    def token_file(self) -> Path:
        """This stack's Ray auth token (``RAY_AUTH_TOKEN_PATH``; also for the dashboard's login)."""
        return self.work_dir / "ray_auth_token"

    def _need(self, what: str) -> None:
        if not self._started:
            raise StackError("LocalStack is not started; call start() or use it as a context manager")
        if what == "ray" and not self.start_ray:
            raise StackError("this LocalStack runs no Ray head (start_ray=False)")
        if what == "mlflow" and not self.start_mlflow:
            raise StackError("this LocalStack runs no MLflow server (start_mlflow=False)")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and processes (``ray job``, ``serve deploy``, a Python
        driver): ``base`` (default ``os.environ``) plus the addresses, this stack's token and the
        loopback setting. Never changes ``os.environ``."""
        env = dict(os.environ if base is None else base)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if self.start_ray:
            env.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
            env["RAY_ADDRESS"] = self.ray_address  # ray.init() / serve.run attach here
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url  # ray job ...
            env["RAY_DASHBOARD_ADDRESS"] = self.dashboard_url  # serve deploy / status
        if self.start_mlflow:
            env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = self.mlflow_uri
        return env

    @contextlib.contextmanager
    def client_environ(self) -> Iterator[dict[str, str]]:
        """Temporarily apply :meth:`env` to ``os.environ`` (for an in-process ``ray.init(address=
        stack.ray_address)`` / ``serve.run`` against the head); the previous values come back
        afterwards. An already imported ray is made to re-read the auth mode and token."""
        new = self.env()
        saved = {k: os.environ.get(k) for k in {*new, *os.environ}}
        os.environ.clear()
        os.environ.update(new)
        _refresh_ray_config()
        try:
            yield new
        finally:
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items() if v is not None})

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
                self._wait("ray", self._ray_ready, self._ray_logs())
            if self.start_mlflow:
                self._wait("mlflow", self._mlflow_ready, [self.logs_dir / "mlflow-server.log"])
        except BaseException:
            self.stop()
            raise
        return self

    def _popen(self, name: str, log_name: str, cmd: list[str], env: Mapping[str, str]) -> None:
        log = open(self.logs_dir / log_name, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        self._services[name] = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(self.work_dir),
            start_new_session=True,  # Ctrl-C in a terminal goes to the owner, which stops the stack
            preexec_fn=_pdeathsig_hook(),
        )

    def _spawn_mlflow(self) -> None:
        (self.ports["mlflow"],) = free_ports(1)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.bin_dir / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.mlflow_db}",
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", LOOPBACK, "--port", str(self.ports["mlflow"]), "--workers", "1",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        # No GenAI job runner: it starts seven huey consumer processes that tracking and the
        # model registry do not use (and that outlive a killed server for a while).
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self._say(f"[stack] mlflow server on {LOOPBACK}:{self.ports['mlflow']} (store {self.mlflow_db})")
        self._popen("mlflow", "mlflow-server.log", cmd, env)

    def _choose_temp_dir(self) -> Path:
        inside = self.work_dir / "ray"
        if len(str(inside)) <= _MAX_TEMP_DIR_CHARS:
            inside.mkdir(parents=True, exist_ok=True)
            return inside
        self._temp_is_private = True
        return Path(tempfile.mkdtemp(prefix="tmray-"))

    def _ray_command(self) -> list[str]:
        taken = {v for k, v in self.ports.items() if k == "mlflow"}
        ports = [p for p in free_ports(len(_RAY_PORTS) + len(taken)) if p not in taken][: len(_RAY_PORTS)]
        self.ports.update(zip(_RAY_PORTS, ports, strict=True))
        self.worker_ports = _free_port_range(_WORKER_PORTS, set(self.ports.values()))
        p, flag = self.ports, lambda name, port: f"--{name}={p[port]}"
        cmd = [
            str(self.bin_dir / "ray"), "start", "--head", "--block",
            f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}", "--include-dashboard=true",
            flag("port", "gcs"), flag("dashboard-port", "dashboard"), flag("ray-client-server-port", "client_server"),
            flag("object-manager-port", "object_manager"), flag("node-manager-port", "node_manager"),
            flag("dashboard-agent-listen-port", "dashboard_agent_http"),
            flag("dashboard-agent-grpc-port", "dashboard_agent_grpc"),
            flag("runtime-env-agent-port", "runtime_env_agent"), flag("metrics-export-port", "metrics_export"),
            f"--min-worker-port={self.worker_ports[0]}", f"--max-worker-port={self.worker_ports[1]}",
            f"--num-cpus={self.num_cpus}", f"--resources={json.dumps(self.resources)}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats", "--log-style=record", "--log-color=false",
        ]  # fmt: skip
        if not (Path("/dev/nvidia0").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
            cmd.append("--num-gpus=0")  # no NVIDIA device: skip Ray's slow GPU probe
        if self.object_store_memory:
            cmd.append(f"--object-store-memory={int(self.object_store_memory)}")
        return cmd

    def _ray_env(self) -> dict[str, str]:
        drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN")
        env = {k: v for k, v in os.environ.items() if k not in drop}  # never attach to somebody else's cluster
        env.update(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # really bind 127.0.0.1 (notes §8)
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),  # inherited by workers and job drivers
            RAY_USAGE_STATS_ENABLED="0",
            # SIGTERM to `ray start --block` drains the node for up to 30 s by default; nothing
            # here needs draining (Serve apps are shut down by their owner)
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # so that job drivers started by this head find the venv's executables first
            PATH=f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        if self.start_mlflow:  # jobs and workers log to this server unless a job says otherwise
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        env.update(self.extra_env)
        return env

    def _spawn_ray(self) -> None:
        if not self.token_file.is_file():
            self.token_file.touch(mode=0o600)
            self.token_file.write_text(secrets.token_hex(32))
        if self.temp_dir is None:
            self.temp_dir = self._choose_temp_dir()
        cmd = self._ray_command()
        self._say(f"[stack] ray head: GCS {self.ray_address}, dashboard {self.dashboard_url}, "
                  f"{self.num_cpus} CPUs, resources {self.resources}, temp dir {self.temp_dir}")  # fmt: skip
        self._client = None
        self._popen("ray", "ray-head.log", cmd, self._ray_env())

    # ---- readiness ------------------------------------------------------------------------

    def _ray_logs(self) -> list[Path]:
        files = [self.logs_dir / "ray-head.log"]
        if self.temp_dir is not None:
            sess = self.temp_dir / "session_latest" / "logs"
            files += [sess / n for n in ("gcs_server.out", "raylet.out", "dashboard.log", "dashboard_agent.log")]
        return files

    def _ray_ready(self) -> bool:
        """The job server answers an authenticated request (the client checks the version on creation)."""
        if not is_listening(self.ports["gcs"]):
            return False
        self.job_client.list_jobs()
        return True

    def _mlflow_ready(self) -> bool:
        with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=5.0) as r:  # noqa: S310 - loopback http
            return r.status == 200

    def _wait(self, name: str, ready: Callable[[], bool], logs: Sequence[Path]) -> None:
        """Poll ``ready`` until it is true; the deadline counts from now, not from the spawn."""
        proc, t0 = self._services[name], time.monotonic()
        while True:
            if proc.poll() is not None:
                raise StackError(self._failure(name, f"exited with code {proc.returncode} while starting", logs))
            with contextlib.suppress(OSError, ValueError, RuntimeError, ConnectionError):
                if ready():
                    self._say(f"[stack] {name} ready after {time.monotonic() - t0:.1f} s")
                    return
            if time.monotonic() - t0 > self.start_timeout_s:
                raise StackError(self._failure(name, f"did not answer within {self.start_timeout_s:.0f} s", logs))
            time.sleep(0.5)

    @staticmethod
    def _failure(name: str, why: str, logs: Sequence[Path]) -> str:
        parts = [f"LocalStack: {name} {why}"]
        parts += [f"---- last lines of {p} ----\n{_tail(p)}" for p in logs if p.is_file()]
        return "\n".join(parts)

    # ---- clients ------------------------------------------------------------------------

    @property
    def job_client(self) -> Any:
        """A :class:`ray.job_submission.JobSubmissionClient` for this head, sending this stack's token."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
            self._client = JobSubmissionClient(self.dashboard_url, headers=headers)
        return self._client

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
        """Submit ``entrypoint`` with ``working_dir`` uploaded (<= 500 MiB; ``.gitignore`` and
        ``.rayignore`` decide what stays out) and wait for it, its logs streamed through ``echo``
        as they come. ``env_vars`` reach the driver and every worker; this stack's GCS address and
        MLflow URI are added unless given. On ``timeout`` the job is stopped and the result says
        ``timed_out``; an interrupted wait stops the job too."""
        self._need("ray")
        if not entrypoint:
            raise ValueError("submit_job: entrypoint is empty; expected e.g. ['python', 'jobs/faceformer.py']")
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise ValueError(f"submit_job: working_dir {wd} is not a directory")
        sid = submission_id or f"talkmesh-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._say(f"[stack] submit job {sid}: {shlex.join(entrypoint)}")
        t0 = time.monotonic()
        self.job_client.submit_job(
            entrypoint=shlex.join(entrypoint), submission_id=sid, runtime_env=self._runtime_env(wd, env_vars, excludes)
        )
        try:
            timed_out = not self._follow(sid, timeout, echo)
        except BaseException:  # interrupted: do not leave the job running
            with contextlib.suppress(Exception):
                self.job_client.stop_job(sid)
            raise
        if timed_out:
            self.job_client.stop_job(sid)
            self._wait_terminal(sid, timeout_s=60.0)
        info = self.job_client.get_job_info(sid)
        res = JobResult(sid, info.status.value, info.driver_exit_code, self.job_client.get_job_logs(sid),
                        time.monotonic() - t0, timed_out)  # fmt: skip
        self._say(f"[stack] job {sid}: {res.status} after {res.wall_s:.1f} s")
        return res

    def _runtime_env(self, wd: Path, env_vars: Mapping[str, str] | None, excludes: Sequence[str]) -> dict[str, Any]:
        ship = {str(k): str(v) for k, v in (env_vars or {}).items()}
        # Ray's own helpers inside the job (e.g. Train's placement-group cleaner) look the
        # cluster up by address; without it they fail when other Rays run on the machine.
        ship.setdefault("RAY_ADDRESS", self.ray_address)
        if self.start_mlflow:
            ship.setdefault("MLFLOW_TRACKING_URI", self.mlflow_uri)
        runtime_env: dict[str, Any] = {"working_dir": str(wd), "env_vars": ship}
        if excludes:
            runtime_env["excludes"] = list(excludes)
        return runtime_env

    def _follow(self, sid: str, timeout: float, echo: Callable[[str], None] | None) -> bool:
        """Stream the job's log lines to ``echo`` until it ends (True) or ``timeout`` passes (False)."""

        async def tail() -> None:
            partial = ""
            async for chunk in self.job_client.tail_job_logs(sid):
                *lines, partial = (partial + chunk).split("\n")
                for line in lines if echo is not None else ():
                    echo(line)
            if partial and echo is not None:
                echo(partial)

        t0 = time.monotonic()
        try:
            asyncio.run(asyncio.wait_for(tail(), timeout))
        except TimeoutError:
            return False
        except RuntimeError:  # the log stream broke off (e.g. the dashboard restarted): poll the status
            return self._wait_terminal(sid, timeout - (time.monotonic() - t0))
        return True

    def _wait_terminal(self, sid: str, timeout_s: float) -> bool:
        """Poll the job's status until it is terminal (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while not self.job_client.get_job_status(sid).is_terminal():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    # ---- stop -----------------------------------------------------------------------

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop everything this stack started; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE.discard(self)
        self._client = None
        self._stop_service("ray", grace_s)
        self._stop_service("mlflow", grace_s=10.0)
        _terminate(list(self._seen.values()), grace_s=5.0)  # anything that left its parent meanwhile
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()
        if self._temp_is_private and self.temp_dir is not None:
            src = self.temp_dir / "session_latest" / "logs"
            with contextlib.suppress(OSError, shutil.Error):
                if src.is_dir():
                    shutil.copytree(src, self.work_dir / "ray-logs", dirs_exist_ok=True, symlinks=False)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._say("[stack] stopped")

    def _tree(self, name: str) -> list[Any]:
        """The live process tree of service ``name`` (its leader first); every member is remembered."""
        import psutil

        proc = self._services.get(name)
        if proc is None:
            return []
        try:
            leader = psutil.Process(proc.pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        self._seen.update((p.pid, p) for p in tree)
        return tree

    def _stop_service(self, name: str, grace_s: float) -> None:
        """SIGTERM the service's leader (``ray start --block`` then shuts its node down), wait, then
        terminate whatever is left of the tree it had."""
        proc = self._services.get(name)
        if proc is None:
            return
        tree = self._tree(name)
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        _terminate(tree[1:] + self._tree(name), grace_s=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)

    def leftover_pids(self) -> list[int]:
        """Live processes of this stack: its services' trees now and every process seen in them
        (empty after :meth:`stop`)."""
        procs = [*self._seen.values(), *self._tree("ray"), *self._tree("mlflow")]
        return sorted({p.pid for p in procs if _alive(p)})
