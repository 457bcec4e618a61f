"""One writer per run folder: a lock that names its holder, taken before anything is written, renewed while held.

The lock is `.tunefleet.lock` in the run's folder: a file created exclusively (O_EXCL, which NFS honours) or, in an
object store, an object written with a conditional put (`If-None-Match: *`). It names its holder (host, the pids of
the process that took it and of the training it launched, start time, the sweep) and a lease that a thread renews.
A lock is stale when its holder is gone: on the holder's own host when none of its pids lives, elsewhere when its
lease has run out. A stale lock is taken over, with a note; a live one is refused, naming the holder.

    lock = RunLock(Store("runs/dpo_s1"), sweep="demo")
    lock.acquire()          # raises Held("... is being trained by host-a, pid 4242 (sweep demo) since ...")
    ...
    lock.release()
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunefleet.common.errors import TunefleetError
from tunefleet.common.jsonfile import utc_now
from tunefleet.common.processes import process_lives
from tunefleet.common.storage import Store

LOCK_NAME = ".tunefleet.lock"  # in a run's folder
EVAL_LOCK_NAME = ".tunefleet-eval.lock"  # in a runs folder: one evaluator writes its results at a time
LEASE_S = 120.0  # a holder on another host is gone once its lease runs out: renewed every quarter of it while held
LOCK_IO_S = 15.0  # how long one read or write of a lock in an object store may take


@dataclass
class Holder:
    host: str
    pids: list[int]
    started_at: str
    lease_until: float
    token: str
    sweep: str | None = None
    purpose: str = "training"

    def describe(self) -> str:
        pids = ", ".join(str(p) for p in self.pids)
        sweep = f", sweep {self.sweep}" if self.sweep else ""
        return f"{self.host}, pid {pids}{sweep}, since {self.started_at}"

    def alive(self) -> bool:
        if self.host == socket.gethostname():
            return any(process_lives(pid) for pid in self.pids)
        return time.time() < self.lease_until


class Held(TunefleetError):
    """The folder's lock is held by a live holder."""

    def __init__(self, folder: str, holder: Holder):
        self.holder = holder
        super().__init__(f"{folder} is being written by {holder.describe()}: wait for it, or stop that process")


@dataclass
class RunLock:
    store: Store
    sweep: str | None = None
    purpose: str = "training"
    name: str = LOCK_NAME
    lease_s: float = LEASE_S
    notes: list[str] = field(default_factory=list)
    holder: Holder | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    created_folder: bool = False  # the lock made the run's folder: it goes again with the lock if nothing else came

    def __post_init__(self) -> None:
        # The lock's reads and writes give up after a while: a store that stops answering must not hold a run's end
        # (an unreleased lock is stale once its holder is gone).
        self.io = Store(self.store.root, timeout_s=LOCK_IO_S) if self.store.remote else self.store

    def read(self) -> Holder | None:
        data = self.io.read_bytes(self.name)
        if data is None:
            return None
        try:
            return Holder(**json.loads(data))
        except (ValueError, TypeError):
            return None  # a lock cut short by a crash while it was written: nobody holds it

    def acquire(self) -> RunLock:
        """Take the lock (taking over a stale one, with a note); Held when a live holder has it."""
        me = Holder(socket.gethostname(), [os.getpid()], utc_now(), time.time() + self.lease_s, uuid.uuid4().hex)
        me.sweep, me.purpose = self.sweep, self.purpose
        for _ in range(3):  # a race with another taker: read again and decide again
            found = self.read()
            if found is not None and found.alive():
                raise Held(self.store.url(), found)
            if found is not None or self.io.exists(self.name):
                what = found.describe() if found else "an unreadable holder"
                self.notes.append(f"took over the stale lock of {what}")
                self.io.remove(self.name)
            folder = None if self.store.remote else Path(self.store.root)
            self.created_folder = folder is not None and not folder.exists()
            if self.io.create_exclusive(self.name, json.dumps(asdict(me)).encode()):
                self.holder = me
                threading.Thread(target=self.renew, daemon=True, name="tunefleet-lock").start()
                return self
        found = self.read()
        raise Held(self.store.url(), found or me)

    def write(self, current: Holder | None = None) -> None:
        """Write this holder (keeping the pids its training added to the file itself: `register_pid`)."""
        assert self.holder is not None
        if current is not None and current.token == self.holder.token:
            self.holder.pids += [pid for pid in current.pids if pid not in self.holder.pids]
        self.holder.lease_until = time.time() + self.lease_s
        self.io.write_bytes(self.name, json.dumps(asdict(self.holder)).encode())

    def add_pid(self, pid: int) -> None:
        """The training process this holder launched: the lock stays live while it does (a killed driver's orphan)."""
        if self.holder is not None:
            self.holder.pids.append(pid)
            self.write(self.read())

    def renew(self) -> None:
        while not self.stop.wait(self.lease_s / 4):
            try:
                current = self.read()
                if current is None or self.holder is None or current.token != self.holder.token:
                    return  # taken over (this holder was judged gone): never write over the new holder
                self.write(current)
            except Exception:
                pass  # a store that does not answer now: the next renewal tries again, within the lease

    def release(self) -> None:
        self.stop.set()
        try:
            current = self.read()
            if self.holder is not None and current is not None and current.token == self.holder.token:
                self.io.remove(self.name)
                if self.created_folder:  # a run refused before it wrote anything leaves no folder behind
                    Path(self.store.root).rmdir()
        except Exception:
            pass  # a store that does not answer, a folder that holds files now: the lock goes stale with its holder
        finally:
            self.holder = None

    def register_pid(self, token: str, pid: int) -> bool:
        """A process started under the holder whose token is `token` (a training rank its launcher cannot see: forked
        by a warm process): the lock stays live while it does, even once its launcher is gone. False when the lock
        is no longer that holder's."""
        current = self.read()
        if current is None or current.token != token:
            return False
        if pid not in current.pids:
            current.pids.append(pid)
            self.io.write_bytes(self.name, json.dumps(asdict(current)).encode())
        return True

    def acquire_waiting(self, poll_s: float = 2.0) -> RunLock:
        """Take the lock, waiting while a live holder has it (said once)."""
        said = False
        while True:
            try:
                return self.acquire()
            except Held as held:
                if not said:
                    print(f"waiting for the {held.holder.purpose} by {held.holder.describe()} in {self.store.url()}")
                    said = True
                time.sleep(poll_s)

    def __enter__(self) -> RunLock:
        return self if self.holder is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
