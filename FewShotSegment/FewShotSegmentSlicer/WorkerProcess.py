"""The worker process (``python -m FewShotSegmentLib.worker JOB.json``) as a subprocess: a reader
thread collects its stdout lines, and stop() returns at once while a thread terminates it, kills it
after a grace period and cleans up. No Qt, so it works in the application, in batch and in tests."""
from __future__ import annotations

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
        creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        with open(stderrPath, "w") as stderr:
            self.process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=stderr,
                                            stdin=subprocess.DEVNULL, cwd=cwd, env=env, text=True,
                                            encoding="utf-8", errors="replace", bufsize=1,
                                            creationflags=creationflags)
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
