"""Warm start: every run's process forked from one that has already imported the training stack.

A run's process spends its first seconds importing torch, transformers, TRL, PEFT, datasets and accelerate (6-16 s
depending on the machine) before a step that may take milliseconds. A *warm process* does those imports once and
then forks a child per run. The child is the run's own process, as `python -m <entry> ARGS` would start it: its
own pid, memory, signals and exit code; its standard streams are the ones the launcher passed (the run's
train.log); its arguments, environment and working folder are the run's. It then calls the entry's `main(argv)`
and ends like any interpreter (atexit handlers, exit code).

    proc = warm.Popen([sys.executable, "-m", "tunefleet.trainers.train", "--config", "run.yaml"], stdout=log)
    proc.wait()          # the same calls as subprocess.Popen: poll, wait, send_signal, terminate, kill

Which warm process serves a run:
- one named in the run's environment (`TUNEFLEET_WARM_SOCKET`): the sweep driver's, which its local Ray workers
  and its forked children inherit;
- else one this process starts on first use and keeps for its later runs (a Ray worker's, a SLURM task's),
  ended when this process ends.
A warm process serves only runs whose environment equals its own, apart from variables read when used rather than
at import (`PER_RUN_ENV`); another environment gets a warm process of its own.

Fork safety. The warm process imports and computes nothing, and forks from its only Python thread (numpy's
OpenBLAS and arrow's jemalloc keep helper threads that handle fork themselves). CUDA must not be initialised
before a fork: while preloading, CUDA availability is asked through NVML (PYTORCH_NVML_BASED_CUDA_CHECK), and on
a host with GPUs only the libraries that leave CUDA alone are preloaded (bitsandbytes initialises CUDA on import
there). A child that finds CUDA poisoned anyway replaces itself with a cold interpreter (exec, same pid and
streams). Gradient-collector state is frozen before forking (gc.freeze) so children neither copy nor scan it.

The ranks of an `accelerate launch` start warm too: torch elastic starts `python -m tunefleet.launcher.warm --rank
ARGS` for each (stdlib only: tens of milliseconds), which asks the warm process its launcher advertised to fork the
rank with the rank's environment and streams, relays signals to it and ends as it ended. Cold starts remain for
`TUNEFLEET_WARM_START=0` and any run whose warm process cannot be reached (the run's log says why).

Why one module of this size: the warm process's server, the launcher's client (`Popen`), the fork of a run and the
entry of an accelerate rank speak one message format and one set of environment rules; apart, each would hold half
of a protocol.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import io
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tunefleet.common.contract import START_KIND_ENV, STARTED_AT_ENV, WARM_SOCKET_ENV, WARM_SWITCH_ENV
from tunefleet.common.processes import process_lives

ENTRIES = ("tunefleet.trainers.train", "tunefleet.launcher.cli")
# Read when used, not at import: these may differ between the warm process and a run it forks.
# (PYTHONBREAKPOINT and SPT_NOENV: what Ray adds to its workers' environment; read by breakpoint() and setproctitle.
# PL_DISABLE_FORK, TUNE_*, TRAIN_COPY_...: what Ray Tune adds to a trial's, read by Lightning and Ray, which the warm
# process does not import. KMP_DUPLICATE_LIB_OK: what scikit-learn and threadpoolctl set on import, in a launcher
# after its warm process started; read by Intel's OpenMP when it loads. PYTEST_CURRENT_TEST: what pytest sets anew
# for every phase of every test, around launchers started by a test suite.)
PER_RUN_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "COLUMNS",
    "LINES",  # with COLUMNS: what a Ray job's driver is given
    "TERM",
    "PYTHONBREAKPOINT",
    "SPT_NOENV",
    "PL_DISABLE_FORK",
    "KMP_DUPLICATE_LIB_OK",
    "PYTEST_CURRENT_TEST",
    "TRAIN_COPY_DIRECTORY_CHECKPOINTS_INSTEAD_OF_MOVING",
    "DS_ACCELERATOR",  # imported early only on a host without GPUs, as "cpu": what terminal.calm sets there
    "TORCH_EXTENSIONS_DIR",  # where torch builds a C++ extension, read when one is loaded
)
PER_RUN_PREFIXES = (
    "TUNEFLEET_",
    "RAY_",
    "TUNE_",
    "SLURM_",
    "AWS_",
    "MLFLOW_",
    "_MLFLOW_",  # MLflow sets its telemetry session on import: a launcher that imported it passes it on
    "WANDB_",
    "MASTER_",
    "ACCELERATE_",
    "TORCHELASTIC_",
    "TORCHINDUCTOR_",  # compile caches: torch sets its own in a process that imported the inductor
    "TRITON_",
)
# What torch elastic and accelerate give each rank of a launch (read when the process group and accelerator start).
RANK_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_ASYNC_ERROR_HANDLING",
)
# Imported before any fork. Those after the first group initialise CUDA on import on a GPU host (bitsandbytes does,
# and PEFT and TRL import it), so there they load in each run instead.
PRELOAD_CUDA_SAFE = ("numpy", "torch", "transformers", "datasets", "accelerate", "safetensors", "tokenizers", "yaml")
PRELOAD_CPU_HOST = (
    "bitsandbytes",
    "peft",
    "trl",
    "trl.experimental.orpo",
    "deepspeed",
    "tunefleet.trainers.sft",
    "tunefleet.trainers.dpo",
    "tunefleet.trainers.orpo",
    "tunefleet.trainers.kto",
    "tunefleet.trainers.grpo",
    "tunefleet.trainers.train",
    "tunefleet.launcher.cli",
    "tunefleet.launcher.sweep_cli",
    "tunefleet.eval.cli",
    "tunefleet.eval.evaluate",
)
READY_TIMEOUT_S = 600
MAX_MESSAGE = 1 << 20


def env_key(env: dict) -> dict:
    """The part of an environment that the warm process's imports may have read."""
    return {
        k: v
        for k, v in env.items()
        if k not in PER_RUN_ENV
        and k not in RANK_ENV
        and not k.startswith(PER_RUN_PREFIXES)
        and k != "PYTORCH_NVML_BASED_CUDA_CHECK"
    }


def env_difference(ours: dict, theirs: dict) -> str | None:
    """The first variable (by name) on which two environments differ for a warm start, or None."""
    a, b = env_key(ours), env_key(theirs)
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return name
    return None


def pythonpath_refusal(ours: str, theirs: str) -> str | None:
    """Why a run's PYTHONPATH cannot be honoured in a child of this process, or None. A run may add folders (accelerate
    adds the working folder for DeepSpeed ranks) as long as none holds a module already imported here under the same
    top-level name (it would have been found first); it may not drop one of ours (modules came from there)."""
    mine, wanted = [p for p in ours.split(os.pathsep) if p], [p for p in theirs.split(os.pathsep) if p]
    if any(p not in wanted for p in mine):
        return f"its PYTHONPATH lacks {next(p for p in mine if p not in wanted)}"
    imported = {name.split(".")[0] for name in sys.modules}
    for folder in (p for p in wanted if p not in mine and os.path.isdir(p)):
        for entry in os.listdir(folder):
            name = entry[:-3] if entry.endswith(".py") else entry
            if name in imported and (entry.endswith(".py") or os.path.isdir(os.path.join(folder, entry))):
                return f"its PYTHONPATH folder {folder} holds {entry}, imported here from elsewhere"
    return None


def warm_entry(cmd: list[str]) -> str | None:
    """The entry module of a `python -m ENTRY ...` command this Python can fork, else None (pure)."""
    if len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m" and cmd[2] in ENTRIES:
        return cmd[2]
    return None


# ---------------------------------------------------------------- the launcher's side
class WarmProcess:
    """A run forked by a warm process, with the subprocess.Popen calls the launchers use.

    The warm process is the child's parent: it reaps it and sends the exit status here; signals go through it too,
    so they never reach a pid that was reused after the child ended."""

    def __init__(self, pid: int, conn: socket.socket):
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn
        self._reading = threading.Lock()
        self._ended = threading.Event()

    def _receive(self, timeout: float | None) -> None:
        """Read the exit status if it has come (waiting up to `timeout`). One thread reads; another thread that
        asks meanwhile (Ctrl-C's terminate while the run's own thread waits) waits for that reader instead."""
        if self.returncode is not None:
            return
        if not self._reading.acquire(blocking=False):
            self._ended.wait(timeout)
            return
        try:
            self._conn.settimeout(timeout)
            try:
                message = self._conn.recv(MAX_MESSAGE)
            except (TimeoutError, BlockingIOError):
                return
            except OSError:
                message = b""
            # no message: the warm process went away without saying; the child went with it (PDEATHSIG)
            self.returncode = json.loads(message)["exit"] if message else -signal.SIGKILL
            self._conn.close()
            self._ended.set()
        finally:
            self._reading.release()

    def poll(self) -> int | None:
        self._receive(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._receive(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"warm run {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(OSError):
                self._conn.send(json.dumps({"signal": int(signum)}).encode())

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmServer:
    """A warm process this process started: its socket, and the pipe whose end tells it to stop."""

    def __init__(self, env: dict):
        self.folder = tempfile.mkdtemp(prefix="tfwarm")  # 0700: only this user reaches the socket
        self.socket = os.path.join(self.folder, "sock")
        self.log = os.path.join(self.folder, "warm.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunefleet.launcher.warm", self.socket],
                stdin=subprocess.PIPE,  # the lifeline: at its end (this process gone), the warm process stops
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in env.items() if k != WARM_SOCKET_ENV},
                cwd=os.getcwd(),
            )
        # While it imports, a launcher it was advertised to waits for it as long as this pid lives
        Path(self.socket + ".pid").write_text(str(self.proc.pid))
        self.ready: bool | None = None

    def wait_ready(self) -> bool:
        if self.ready is None:
            self.ready = wait_ready(self.socket) and self.proc.poll() is None
        return self.ready

    def why_not(self) -> str:
        tail = Path(self.log).read_text(errors="replace").strip().splitlines()[-1:] if os.path.exists(self.log) else []
        return f"the warm process exited ({self.proc.poll()})" + (f": {tail[0]}" if tail else "")

    def stop(self) -> None:
        lifeline = self.proc.stdin
        if self.proc.poll() is None and lifeline is not None:
            with contextlib.suppress(OSError):
                lifeline.close()  # the warm process ends its runs (SIGTERM) and exits
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


_servers: dict[str, WarmServer] = {}
_servers_lock = threading.Lock()


def own_server(env: dict) -> WarmServer:
    """This process's warm process for `env` (started now if it has none)."""
    key = json.dumps(env_key(env), sort_keys=True)
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.proc.poll() is not None:
            if not _servers:
                atexit.register(stop_all)
            server = _servers[key] = WarmServer(env)
        return server


def prestart(env: dict | None = None) -> str | None:
    """Start this process's warm process now (it imports while the caller does other work); its socket path, which
    the caller may advertise to its own children and Ray workers through WARM_SOCKET_ENV. None when warm starts are off."""
    env = dict(os.environ if env is None else env)
    if not enabled(env):
        return None
    advertised = env.get(WARM_SOCKET_ENV)
    if advertised and os.path.exists(advertised):
        return advertised  # a warm process this one inherited (its parent's, or the sweep driver's) serves
    return own_server(env).socket


def with_advertised(env: dict) -> dict:
    """`env` naming a warm process that serves it (started now if needed), for processes that are not this one's
    children: the ranks torch elastic starts."""
    path = prestart(env)
    return {**env, WARM_SOCKET_ENV: path} if path else env


def own_sockets() -> set[str]:
    """The sockets of the warm processes this process started and keeps (one per environment its runs had)."""
    with _servers_lock:
        return {server.socket for server in _servers.values()}


def stop(sockets: set[str]) -> None:
    """End these warm processes of this process (and runs of theirs still going)."""
    with _servers_lock:
        ending = {key: server for key, server in _servers.items() if server.socket in sockets}
        for key in ending:
            del _servers[key]
    for server in ending.values():
        server.stop()


def stop_all() -> None:
    stop(own_sockets())


def enabled(env: dict) -> bool:
    return env.get(WARM_SWITCH_ENV, "1") != "0" and hasattr(os, "fork") and hasattr(socket, "send_fds")


def request(
    path: str, entry: str, argv: list[str], env: dict, cwd: str, fds: list[int], launched_at: float
) -> WarmProcess:
    """Ask the warm process at `path` to fork `entry` with these arguments, environment and streams.

    Raises OSError when it cannot be reached, RuntimeError (its reason) when it declines."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        message = {
            "entry": entry,
            "argv": argv,
            "env": env,
            "cwd": cwd,
            "started_at": launched_at,
            "executable": sys.executable,  # another interpreter (another venv) has other packages: never forked here
        }
        socket.send_fds(conn, [json.dumps(message).encode()], fds)
        reply = json.loads(conn.recv(MAX_MESSAGE) or b'{"refused": "the warm process closed the connection"}')
    except BaseException:
        conn.close()
        raise
    if "pid" not in reply:
        conn.close()
        raise RuntimeError(reply.get("refused", "refused"))
    return WarmProcess(reply["pid"], conn)


def Popen(cmd: list[str], stdout=None, stderr=None, env: dict | None = None, cwd: str | None = None):  # noqa: N802
    """subprocess.Popen for a run's command: forked warm when it can be, else a cold process (and the run's log
    says why). `stdout` is a file object (or None: this process's); `stderr` the same, or subprocess.STDOUT."""
    launched_at = time.time()  # a run's start-up includes any wait for the warm process it is forked from
    env = dict(os.environ if env is None else env)
    entry = warm_entry(cmd)
    if entry is None or not enabled(env):
        return cold(cmd, stdout, stderr, env, cwd)
    out = stdout.fileno() if stdout is not None else 1
    err = out if stderr is subprocess.STDOUT else (stderr.fileno() if stderr is not None else 2)
    streams = [0, out, err]
    cwd = os.path.abspath(cwd or os.getcwd())
    reasons = []
    advertised = env.get(WARM_SOCKET_ENV) or os.environ.get(WARM_SOCKET_ENV)
    if advertised and not wait_ready(advertised):
        reasons.append(f"{advertised}: not serving")
    elif advertised:
        try:
            return request(advertised, entry, cmd[3:], {**env, WARM_SOCKET_ENV: advertised}, cwd, streams, launched_at)
        except (OSError, RuntimeError) as exc:
            reasons.append(f"{advertised}: {exc}")
    server = own_server(env)
    if server.wait_ready():
        try:
            return request(
                server.socket, entry, cmd[3:], {**env, WARM_SOCKET_ENV: server.socket}, cwd, streams, launched_at
            )
        except (OSError, RuntimeError) as exc:
            reasons.append(str(exc))
    else:
        reasons.append(server.why_not())
    note = f"=== warm start unavailable ({'; '.join(reasons)}): starting cold\n"
    os.write(out, note.encode())
    return cold(cmd, stdout, stderr, env, cwd)


def cold(cmd, stdout, stderr, env, cwd) -> subprocess.Popen:
    env = {**env, STARTED_AT_ENV: repr(time.time()), START_KIND_ENV: "cold"}
    return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=cwd, preexec_fn=die_with_parent)


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the thread that started it dies (Ctrl-C, a killed worker)."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------- the warm process
@dataclasses.dataclass
class Request:
    entry: str
    argv: list[str]
    env: dict
    cwd: str
    started_at: float
    fds: list[int]  # stdin, stdout, stderr of the run


def gpu_host() -> bool:
    """Whether NVML sees a GPU (asked without initialising CUDA)."""
    import torch

    return torch.cuda.device_count() > 0 if torch.cuda.is_available() else False


def preload() -> list[str]:
    """Import the training stack; returns what was imported. Nothing here may start CUDA or a Python thread."""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # availability through NVML: no cuInit, no poisoned fork
    done = []
    for name in PRELOAD_CUDA_SAFE:
        __import__(name)
        done.append(name)
    on_gpu = gpu_host()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what tunefleet.common.terminal.calm sets on such a host
        for name in PRELOAD_CPU_HOST:
            __import__(name)
            done.append(name)
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised while preloading: runs must start cold on this host")
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        raise RuntimeError(f"a preloaded library started Python threads ({names}): runs must start cold")
    return done


class Server:
    """The warm process's loop: accept requests, fork, report exits, relay signals; stop when the lifeline ends."""

    def __init__(self, path: str, base_env: dict):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(64)
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, socket.socket] = {}  # pid -> the connection of the launcher that asked for it
        self.base_env = base_env  # as started, before preloading set anything
        self.uid = os.getuid()
        self.stopping = threading.Event()  # set by SIGTERM

    def serve(self) -> Request | None:
        """Loop until the lifeline ends (returns None) or, in a forked child, return that child's request."""
        # A terminal's Ctrl-C, or SLURM's USR1 sent to a whole process group, is for the runs and their launcher;
        # TERM (scancel, a shutting-down node) ends the runs as the lifeline's end does.
        for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wakeup_w)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "reap")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "lifeline")
        Path(self.path + ".ready").write_text(str(os.getpid()))
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                what = key.data
                if what == "accept":
                    request = self.accept()
                    if request is not None:
                        return request  # in the child
                elif what == "reap":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_r, 4096)
                elif what == "lifeline":
                    if not os.read(sys.stdin.fileno(), 4096):
                        self.shutdown()
                        return None
                else:
                    self.relay(what)
            self.reap()
            if self.stopping.is_set():
                self.shutdown()
                return None

    def accept(self) -> Request | None:
        conn, _ = self.listener.accept()
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != self.uid:
            conn.close()
            return None
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
            message = json.loads(data)
        except (OSError, ValueError):
            conn.close()
            return None
        refusal = self.refusal(message, fds)
        if refusal:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"refused": refusal}).encode())
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        request = Request(
            message["entry"], message["argv"], message["env"], message["cwd"], message["started_at"], fds
        )
        pid = os.fork()
        if pid == 0:
            self.close_in_child(conn)
            return request
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"pid": pid}).encode())
        return None

    def refusal(self, message: dict, fds: list[int]) -> str | None:
        if message.get("entry") not in ENTRIES:
            return f"unknown entry {message.get('entry')!r}"
        if len(fds) != 3:
            return "three standard streams expected"
        if message.get("executable") != sys.executable:
            return f"it runs {message.get('executable')}, this warm process {sys.executable}"
        env = message.get("env", {})
        different = env_difference({**self.base_env, "PYTHONPATH": ""}, {**env, "PYTHONPATH": ""})
        if different:
            return f"its environment differs from the warm process's in {different}"
        return pythonpath_refusal(self.base_env.get("PYTHONPATH", ""), env.get("PYTHONPATH", ""))

    def relay(self, pid: int) -> None:
        """A message from the launcher of child `pid`: a signal to pass on; or its end (the launcher is gone)."""
        conn = self.children[pid]
        try:
            data = conn.recv(MAX_MESSAGE)
        except OSError:
            data = b""
        if not data:  # the launcher died: the run follows it, as PR_SET_PDEATHSIG does for a cold child
            self.selector.unregister(conn)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            return
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(pid, int(json.loads(data)["signal"]))

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"exit": code}).encode())
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            conn.close()

    def shutdown(self) -> None:
        """The owner is gone: its runs get SIGTERM (they checkpoint and stop), then this process exits."""
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 60
        while self.children and time.time() < deadline:
            self.reap()
            time.sleep(0.1)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close_in_child(self, keep: socket.socket) -> None:
        """In a fresh child: none of the server's descriptors, signal set-up or wake-ups."""
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self.listener.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        for conn in self.children.values():
            conn.close()
        keep.close()


def become_run(request: Request) -> None:
    """Turn a forked child into what `python -m ENTRY ARGV` would have started, in the run's streams."""
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
    for fd in set(request.fds):
        if fd > 2:
            os.close(fd)
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    die_with_parent()
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    os.environ[STARTED_AT_ENV] = repr(request.started_at)
    os.environ[START_KIND_ENV] = "warm"
    module = sys.modules.get(request.entry)
    sys.argv = [module.__file__ if module else request.entry, *request.argv]
    sys.path[0] = request.cwd  # what `python -m` puts first
    added = [p for p in request.env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[1:1] = [os.path.abspath(p) for p in added]  # where the interpreter puts PYTHONPATH at start
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), line_buffering=True)
    sys.stdout = sys.__stdout__ = stream(1, unbuffered)
    sys.stderr = sys.__stderr__ = stream(2, True, errors="backslashreplace")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))  # what torch reads from the environment on its first parallel region


def stream(fd: int, unbuffered: bool, errors: str = "strict") -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    tty = raw.isatty()
    buffered = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(buffered, errors=errors, line_buffering=tty, write_through=unbuffered)


def cuda_poisoned() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda._is_in_bad_fork())


def run_request(request: Request) -> int:
    become_run(request)
    if cuda_poisoned():  # CUDA was touched before the fork after all: this child starts over cold
        sys.stdout.flush()
        os.environ[START_KIND_ENV] = "cold"
        os.execv(sys.executable, [sys.executable, "-m", request.entry, *request.argv])
    import importlib

    gc.enable()
    return importlib.import_module(request.entry).main(request.argv)


def wait_ready(path: str, timeout: float = READY_TIMEOUT_S) -> bool:
    """Wait until the warm process at `path` serves (True) or has failed or gone (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path + ".ready"):
            return True
        if os.path.exists(path + ".failed") or not warm_process_lives(path):
            return False
        time.sleep(0.05)
    return False


def warm_process_lives(path: str) -> bool:
    """A warm process for `path` was started and lives (it may still be importing)."""
    try:
        pid = int(Path(path + ".pid").read_text())
    except (OSError, ValueError):
        return False  # none was started there (an address that is stale, or wrong)
    return process_lives(pid)


def rank(argv: list[str]) -> int:
    """One rank of an `accelerate launch` (launch.launch_command): forked by the warm process that WARM_SOCKET_ENV names,
    with this process's environment (torch elastic's RANK, MASTER_PORT, ...), working folder and streams. This
    process relays the signals it gets (torch elastic stops ranks with SIGTERM) and ends as the rank ended. With no
    warm process to ask, or one that declines, this process becomes the rank itself, cold (exec)."""
    entry = "tunefleet.trainers.train"
    launched_at = time.time()
    path = os.environ.get(WARM_SOCKET_ENV)
    if path and enabled(dict(os.environ)) and wait_ready(path):
        try:
            proc = request(path, entry, argv, dict(os.environ), os.getcwd(), [0, 1, 2], launched_at)
        except (OSError, RuntimeError) as exc:
            print(f"=== warm start unavailable ({exc}): starting cold", file=sys.stderr, flush=True)
        else:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
                signal.signal(signum, lambda received, frame: proc.send_signal(received))
            code = proc.wait()
            if code < 0:  # ended by a signal: end by the same one, as torch elastic expects of a rank
                if -code not in (signal.SIGKILL, signal.SIGSTOP):  # (those two have no handler to reset)
                    signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            return code
    os.environ[STARTED_AT_ENV] = repr(time.time())
    os.environ[START_KIND_ENV] = "cold"
    os.execv(sys.executable, [sys.executable, "-m", entry, *argv])
    return 1  # not reached


def main(argv: list[str]) -> int:
    if argv[:1] == ["--rank"]:
        return rank(argv[1:])
    path = argv[0]
    base_env = dict(os.environ)
    t0 = time.time()
    gc.disable()  # objects imported now live as long as the process: no point scanning them, nor copying on scan
    try:
        loaded = preload()
    except Exception as exc:  # noqa: BLE001 - any import failure means: no warm starts here
        print(f"error: cannot preload the training stack: {type(exc).__name__}: {exc}", flush=True)
        Path(path + ".failed").write_text(str(exc))
        return 1
    gc.collect()
    gc.freeze()
    print(f"warm: preloaded {len(loaded)} modules in {time.time() - t0:.1f} s; serving {path}", flush=True)
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    request = Server(path, base_env).serve()
    if request is None:
        return 0
    return run_request(request)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
