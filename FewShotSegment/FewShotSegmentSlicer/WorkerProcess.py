"""The worker as a subprocess, two ways:

- SubprocessWorker: one ``python -m FewShotSegmentLib.worker JOB.json`` per job;
- PersistentWorker: one long-lived ``python -m FewShotSegmentLib.server`` that keeps the models and
  the last volume's features between jobs; each job is a ServerJob handle.

Both implement the WorkerProcess protocol (Interfaces.py): reader threads collect the stdout lines,
and stop() returns at once while a thread stops the job, kills the process after a grace period and
cleans up. No Qt, so it works in the application, in batch and in tests."""
from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import slicer


def libraryParentDir() -> Path:
    """Folder that holds FewShotSegmentLib: the module's folder (installed extension) or the one above
    it (source checkout, "Additional module paths" pointing at FewShotSegment/)."""
    moduleDir = Path(__file__).resolve().parents[1]
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / "FewShotSegmentLib" / "__init__.py").is_file():
            return candidate
    from .Jobs import FewShotJobError

    raise FewShotJobError(f"FewShotSegmentLib not found in {moduleDir} or {moduleDir.parent}; "
                          "the extension is incompletely installed")


def workerPythonExecutable() -> str:
    """Slicer's Python (PythonSlicer) inside the application, else this interpreter."""
    app = getattr(slicer, "app", None)
    if app is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = Path(app.slicerHome) / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def workerEnvironment(libraryDir: str) -> dict:
    """This process's environment, with the library that ships with the module first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([libraryDir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def logTail(path, lines: int = 15) -> str:
    """The last lines of a worker's stderr log ('' when there is none)."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


_CREATION_FLAGS = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0


def _readLines(stream, lines: "queue.Queue"):
    """Reader thread: every stdout line of the process, then None at end of file."""
    try:
        for line in iter(stream.readline, ""):
            lines.put(line)
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


class SubprocessWorker:
    """A WorkerProcess (see Interfaces.py) backed by subprocess.Popen."""

    def __init__(self, command: Sequence[str], cwd: str, env: dict, stderrPath: str):
        with open(stderrPath, "w") as stderr:
            self.process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=stderr,
                                            stdin=subprocess.DEVNULL, cwd=cwd, env=env, text=True,
                                            encoding="utf-8", errors="replace", bufsize=1,
                                            creationflags=_CREATION_FLAGS)
        self.pid = self.process.pid
        self._lines = queue.Queue()
        self._eof = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._reader = threading.Thread(target=_readLines, args=(self.process.stdout, self._lines),
                                        name=f"FewShotSegment-worker-{self.pid}", daemon=True)
        self._reader.start()

    def poll(self) -> Optional[int]:
        return self.process.poll()

    @property
    def returncode(self) -> Optional[int]:
        return self.process.returncode

    def readLines(self) -> list:
        lines = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if line is None:
                self._eof.set()
            else:
                lines.append(line)

    def finishReading(self, timeout: float) -> None:
        self._reader.join(timeout=timeout)

    def close(self) -> None:
        try:
            self.process.stdout.close()
        except (OSError, ValueError):
            pass
        if not self._stopping:
            self._stopped.set()

    def stop(self, graceSeconds: float, then: Callable[[], None] = None) -> None:
        if self._stopping:
            return
        self._stopping = True

        def stopInBackground():
            try:
                if self.process.poll() is None:
                    self.process.terminate()  # the worker stops at the next slice (exit 143)
                    try:
                        self.process.wait(timeout=graceSeconds)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                        self.process.wait()
                self._reader.join(timeout=5)
                self.close()
                if then is not None:
                    then()
            finally:
                self._stopped.set()

        threading.Thread(target=stopInBackground, name=f"FewShotSegment-stop-{self.pid}", daemon=True).start()

    def waitStopped(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)


# final event of a job on the server -> the exit status a one-shot worker would have had
FINAL_EVENTS = {"done": 0, "error": 1, "cancelled": 143}


class ServerJob:
    """One job of a PersistentWorker, as a WorkerProcess: poll() is None while the job runs, then 0,
    1 or 143 once its done, error or cancelled event arrived, or the server's exit status when the
    server ended first (killed, crashed). Its log file gets the server's stderr while it runs."""

    def __init__(self, server: "_Server", jobId: str, stderrPath: str):
        self.server, self.jobId, self.pid = server, jobId, server.pid
        self._lines = queue.Queue()
        self._code = None
        self._ended = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._logLock = threading.Lock()
        self._log = open(stderrPath, "w", encoding="utf-8", errors="replace")

    def _receive(self, line: str, event: Optional[dict]):
        self._lines.put(line)  # before the status, so that every line is there once poll() says so
        code = FINAL_EVENTS.get(event.get("event")) if event else None
        if code is not None:
            self._end(code)

    def _end(self, code: int):
        if not self._ended.is_set():
            self._code = code
            self._ended.set()

    def _writeLog(self, text: str):
        with self._logLock:
            if self._log is not None:
                self._log.write(text)
                self._log.flush()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping and not self._ended.is_set()

    def poll(self) -> Optional[int]:
        return self._code if self._ended.is_set() else None

    @property
    def returncode(self) -> Optional[int]:
        return self.poll()

    def readLines(self) -> list:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def finishReading(self, timeout: float) -> None:
        self._ended.wait(timeout)

    def close(self) -> None:
        with self._logLock:
            if self._log is not None:
                self._log.close()
                self._log = None
        if not self._stopping:
            self._stopped.set()

    def stop(self, graceSeconds: float, then: Callable[[], None] = None) -> None:
        """Send the cancel command; if the job has not ended within graceSeconds, kill the server
        (the PersistentWorker starts a new one for the next job)."""
        if self._stopping:
            return
        self._stopping = True

        def stopInBackground():
            try:
                if not self._ended.is_set():
                    self.server.send({"command": "cancel", "id": self.jobId})
                    if not self._ended.wait(graceSeconds):
                        self.server.kill()
                        self._ended.wait(15)  # the reader sees the end of stdout and ends the job
                self.close()
                if then is not None:
                    then()
            finally:
                self._stopped.set()

        threading.Thread(target=stopInBackground, name=f"FewShotSegment-stop-{self.pid}-{self.jobId}",
                         daemon=True).start()

    def waitStopped(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)


class _Server:
    """One server process: routes its stdout events to the jobs by "id", copies its stderr into the
    running job's log, and ends the jobs still open (with its exit status) when it exits."""

    def __init__(self, command: Sequence[str], cwd: str, env: dict):
        self.command = list(command)
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=cwd, env=env, text=True, encoding="utf-8",
                                        errors="replace", bufsize=1, creationflags=_CREATION_FLAGS)
        self.pid = self.process.pid
        self.jobs = {}                  # id -> ServerJob, until it ends
        self.lock = threading.Lock()
        self.writeLock = threading.Lock()
        self.exited = False
        self.retired = False
        self.ready = threading.Event()  # the server has imported torch and the library
        self.stderrTail = collections.deque(maxlen=200)
        self._stderrReader = threading.Thread(target=self._readStderr, name=f"FewShotSegment-server-err-{self.pid}",
                                              daemon=True)
        self._stderrReader.start()
        threading.Thread(target=self._readStdout, name=f"FewShotSegment-server-{self.pid}", daemon=True).start()

    def alive(self) -> bool:
        return not self.retired and not self.exited and self.process.poll() is None

    def stopping(self) -> bool:
        with self.lock:
            return any(job.stopping for job in self.jobs.values())

    def send(self, message: dict) -> bool:
        with self.writeLock:
            try:
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()
                return True
            except (OSError, ValueError):  # it has exited; its reader ends the open jobs
                return False

    def submit(self, jobId: str, job: dict, stderrPath: str) -> ServerJob:
        handle = ServerJob(self, jobId, stderrPath)
        with self.lock:
            if self.exited:
                handle._end(1 if self.process.returncode is None else self.process.returncode)
                return handle
            self.jobs[jobId] = handle
        self.send({"command": "run", "id": jobId, "job": job})
        return handle

    def _readStdout(self):
        try:
            for line in iter(self.process.stdout.readline, ""):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                event = event if isinstance(event, dict) else None
                if event is not None and event.get("event") == "ready":
                    self.ready.set()
                    continue
                with self.lock:
                    if event is not None and event.get("id") is not None:
                        job = self.jobs.get(str(event["id"]))
                    else:  # a stray line: to the oldest open job, whose Logic logs it
                        job = next(iter(self.jobs.values()), None)
                if job is None:
                    self.stderrTail.append(line)
                    continue
                job._receive(line, event)
                if job.ended:
                    with self.lock:
                        self.jobs.pop(job.jobId, None)
        except (OSError, ValueError):
            pass
        finally:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._stderrReader.join(timeout=5)  # the job's log holds the server's last words
            with self.lock:
                self.exited = True
                pending, self.jobs = list(self.jobs.values()), {}
            code = self.process.returncode
            for job in pending:
                job._end(1 if code is None else code)

    def _readStderr(self):
        try:
            for line in iter(self.process.stderr.readline, ""):
                self.stderrTail.append(line)
                with self.lock:
                    jobs = list(self.jobs.values())
                for job in jobs:
                    job._writeLog(line)
        except (OSError, ValueError):
            pass

    def retire(self):
        """Ask it to exit (after cancelling what runs); no new jobs go to it."""
        self.retired = True
        self.send({"command": "shutdown"})
        with self.writeLock:
            try:
                self.process.stdin.close()
            except (OSError, ValueError):
                pass

    def kill(self):
        try:
            self.process.kill()
        except OSError:
            pass

    def shutdown(self, timeout: float):
        self.retire()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait(timeout=10)


class PersistentWorker:
    """Keeps one server process (``python -m FewShotSegmentLib.server``) between jobs: started for
    the first job, started again when it has died (or was killed by a stop that timed out), ended by
    shutdown() (the module's cleanup, Slicer's aboutToQuit, and atexit as a fallback). Closing its
    stdin also ends it, so it does not outlive Slicer even when Slicer is killed."""

    def __init__(self):
        self._server: Optional[_Server] = None
        self._ids = itertools.count(1)
        self.starts = 0
        self._atexit = False

    @property
    def pid(self) -> Optional[int]:
        return self._server.pid if self._server is not None and self._server.alive() else None

    def submit(self, command: Sequence[str], cwd: str, env: dict, job: dict, stderrPath: str) -> ServerJob:
        server = self._server
        # a new process when there is none alive, another Python or library was asked for, or a
        # cancelled job is still winding down there (it may yet be killed, taking this job with it)
        if server is None or not server.alive() or server.command != list(command) or server.stopping():
            if server is not None:
                server.retire()
            server = self._server = _Server(command, cwd, env)
            self.starts += 1
            if not self._atexit:
                atexit.register(self.shutdown)
                self._atexit = True
        return server.submit(str(next(self._ids)), job, stderrPath)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel what runs, end the process (killed after timeout seconds). The next job starts a
        new one."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown(timeout)
        if self._atexit:
            atexit.unregister(self.shutdown)
            self._atexit = False
