"""Persistent worker: ``python -m FewShotSegmentLib.server``, many jobs in one process.

The process imports torch and the library once and keeps a session.Session (loaded backbones and
the last encoded volume), so a second job on the same volume pays neither the import nor model
loading nor encoding. Commands are JSON lines on stdin:

    {"command": "run", "id": "7", "job": {...the job dict of job.py...}}
    {"command": "cancel", "id": "7"}
    {"command": "shutdown"}

Events are JSON lines on stdout: {"event": "ready", "pid": ...} once, after the imports; then for
each job the worker's events ("started", "progress", "done", "error", "cancelled", see job.py)
with the job's "id" added. "done" also carries "reused": {"backbone": bool, "features": bool} and
"seconds". Jobs run one at a time, in the order received; a cancel reaches the running job at its
next check (a slice, an encoder batch, 20 training steps) or drops a queued one. A job that fails,
even with a bug, reports "error" and the server goes on serving.

Shutdown, end of stdin (the client closed the pipe or died) and SIGTERM cancel the running job and
drop the queued ones (each reports "cancelled"), then the process exits: 0, or 143 after SIGTERM. If
the running job does not stop within EXIT_GRACE_S the process exits anyway.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
import traceback

from . import __version__
from .errors import Cancelled, FewShotError
from .job import validate_job
from .session import Session
from .worker import EXIT_CANCELLED, EXIT_OK, _JsonLines, execute, reused_since

EXIT_GRACE_S = 10.0


class _Events(_JsonLines):
    """Thread-safe JSON lines (the job runs on the main thread, commands are read on another)."""

    def __init__(self, stream, lock=None, job_id=None):
        super().__init__(stream)
        self.lock = lock or threading.Lock()
        self.job_id = job_id

    def for_job(self, job_id) -> "_Events":
        return _Events(self.stream, self.lock, job_id)   # own progress throttle per job

    def emit(self, **event):
        if self.job_id is not None:
            event["id"] = self.job_id
        with self.lock:
            try:
                super().emit(**event)
            except (OSError, ValueError):   # the client is gone; the end of stdin stops us
                pass


class _State:
    """What the command reader shares with the main thread."""

    def __init__(self):
        self.jobs = queue.Queue()
        self.lock = threading.Lock()
        self.running_id = None
        self.running_flag = threading.Event()
        self.dropped = set()               # ids cancelled before they started
        self.stopping = threading.Event()
        self.sigterm = False

    def cancel(self, job_id) -> None:
        with self.lock:
            if job_id == self.running_id:
                self.running_flag.set()
            else:
                self.dropped.add(job_id)

    def begin(self, job_id) -> threading.Event:
        with self.lock:
            self.running_id, self.running_flag = job_id, threading.Event()
            if job_id in self.dropped or self.stopping.is_set():
                self.running_flag.set()
            return self.running_flag

    def end(self) -> None:
        with self.lock:
            self.dropped.discard(self.running_id)
            self.running_id = None

    def stop(self) -> None:
        """Shutdown, end of stdin or SIGTERM: only sets flags (it may run in a signal handler)."""
        self.stopping.set()
        self.running_flag.set()


def _exit_if_stuck(state: _State):
    state.stopping.wait()
    time.sleep(EXIT_GRACE_S)
    os._exit(EXIT_CANCELLED)   # a step that ignored the cancel flag: do not outlive the client


def _stdin_lines():
    """Lines of stdin read with os.read: a thread blocked here holds no lock of sys.stdin, so the
    interpreter can exit while it waits."""
    pending = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            if pending.strip():
                yield pending.decode("utf-8", "replace")
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")


def _read_commands(state: _State, out: _Events) -> None:
    try:
        for line in _stdin_lines():
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                out.emit(event="error", message=f"not a JSON command object: {line[:200]!r}")
                continue
            command, job_id = message.get("command"), message.get("id")
            if command == "shutdown":
                break
            if command == "run" and job_id is not None:
                state.jobs.put((str(job_id), message.get("job")))
            elif command == "cancel" and job_id is not None:
                state.cancel(str(job_id))
            else:
                out.for_job(None if job_id is None else str(job_id)).emit(
                    event="error", message=f"unknown command {command!r} or no 'id' (run, cancel, shutdown)")
    finally:
        state.stop()
        state.jobs.put(None)   # wake the main thread


def serve_one(job_id: str, job, session: Session, state: _State, out: _Events) -> None:
    """Run one job on this (the main) thread and report its events; never raises."""
    events = out.for_job(job_id)
    flag = state.begin(job_id)
    try:
        if flag.is_set():
            events.emit(event="cancelled")
            return
        try:
            job = validate_job(job, f"job {job_id}")
        except FewShotError as exc:
            events.emit(event="error", message=str(exc))
            return
        events.emit(event="started", task=job["task"], pid=os.getpid())
        hits, start = dict(session.hits), time.perf_counter()
        try:
            outputs = execute(job, events.progress, flag.is_set, session=session)
        except Cancelled:
            events.emit(event="cancelled")
        except (FewShotError, FileExistsError) as exc:
            events.emit(event="error", message=str(exc))
        except Exception as exc:  # a bug: report it with its traceback and keep serving
            events.emit(event="error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        else:
            events.emit(event="done", outputs=outputs, reused=reused_since(hits, session),
                        seconds=round(time.perf_counter() - start, 3))
    finally:
        state.end()


def _protocol_stream():
    """The real stdout for the events; fd 1 and sys.stdout then go to stderr, so a stray print of
    any library (Python or C) cannot break the protocol."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def main(argv=None) -> int:
    out = _Events(_protocol_stream())
    state = _State()

    def on_sigterm(signum, frame):
        state.sigterm = True
        state.stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C in a terminal is the client's to handle
    threading.Thread(target=_exit_if_stuck, args=(state,), name="watchdog", daemon=True).start()
    session = Session()
    out.emit(event="ready", pid=os.getpid(), version=__version__)
    threading.Thread(target=_read_commands, args=(state, out), name="commands", daemon=True).start()
    while not state.stopping.is_set():
        try:
            item = state.jobs.get(timeout=0.2)   # a timeout, so a SIGTERM while idle is noticed
        except queue.Empty:
            continue
        if item is not None:
            serve_one(*item, session, state, out)
    while True:   # jobs still queued when asked to stop: each is told it was cancelled
        try:
            item = state.jobs.get_nowait()
        except queue.Empty:
            break
        if item is not None:
            out.for_job(item[0]).emit(event="cancelled")
    return EXIT_CANCELLED if state.sigterm else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
