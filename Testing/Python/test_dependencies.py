"""Dependency checks and installation: real pip in a background process, against a local wheel
(success) and an unreachable index (offline: clear message, nothing installed); torch only through
PyTorchUtils, with the minimum version."""
from __future__ import annotations

import os
import sys
import types
import zipfile

import pytest


def makeWheel(folder, name="fewshot_probe", version="1.0"):
    """A minimal pure-Python wheel (no build tools, no network)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
        wheel.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in files) + f"{info}/RECORD,,\n")
    return path


def isolatedEnv():
    return dict(os.environ, PIP_CONFIG_FILE=os.devnull)  # ignore the machine's indexes and wheel folders


def test_missing_dependencies_checks_minimum_versions(fss):
    from FewShotSegmentSlicer.Dependencies import missingDependencies

    assert missingDependencies((("torch", "torch>=2.0"),)) == []
    assert missingDependencies((("torch", "torch>=99.0"),)) == ["torch>=99.0"]
    assert missingDependencies((("fewshot_absent_probe", "fewshot-absent-probe==1.0"),)) == ["fewshot-absent-probe==1.0"]
    assert missingDependencies() == []  # this test environment has everything


def test_pip_installs_in_the_background_with_progress(fss, tmp_path, monkeypatch):
    from FewShotSegmentSlicer.Dependencies import DependencyInstaller

    wheels, target = tmp_path / "wheels", tmp_path / "site"
    makeWheel(wheels)
    monkeypatch.syspath_prepend(str(target))
    installer = DependencyInstaller(dependencies=[("fewshot_probe", "fewshot_probe==1.0")], torchDependencies=(),
                                    pythonExecutable=sys.executable, env=isolatedEnv(),
                                    pipArguments=["--no-index", "--find-links", str(wheels), "--target", str(target)])
    assert installer.missingPip() == ["fewshot_probe==1.0"]
    installer.start()
    assert installer.state == "running"  # start() returned while pip runs
    ticks = []
    assert installer.wait(eventHook=lambda: ticks.append(installer.progressText)) == "done", installer.error
    assert ticks, "the event hook was not called while pip ran"
    assert any("fewshot_probe" in line for line in installer.log)
    assert (target / "fewshot_probe" / "__init__.py").is_file() and installer.missingPip() == []


def test_offline_failure_is_clear_and_installs_nothing(fss, tmp_path):
    from FewShotSegmentSlicer.Dependencies import DependencyInstaller

    wheels, target = tmp_path / "wheels", tmp_path / "site"
    makeWheel(wheels)  # one of the two packages is available locally, the other needs the network
    installer = DependencyInstaller(
        dependencies=[("fewshot_probe", "fewshot_probe==1.0"), ("fewshot_absent_probe", "fewshot-absent-probe==1.0")],
        torchDependencies=(), pythonExecutable=sys.executable, env=isolatedEnv(),
        pipArguments=["--index-url", "http://127.0.0.1:9/simple", "--find-links", str(wheels), "--retries", "0",
                      "--timeout", "2", "--no-cache-dir", "--target", str(target)])
    installer.start()
    assert installer.wait() == "failed"
    assert "fewshot-absent-probe==1.0" in installer.error and "offline" in installer.error
    assert "nothing was installed" in installer.error and "\n" not in installer.error
    assert not target.exists() or not any(target.iterdir()), "a package was half installed"


def test_torch_comes_only_from_pytorchutils_with_the_minimum_version(fss, monkeypatch):
    from FewShotSegmentSlicer.Dependencies import DependencyError, DependencyInstaller

    installer = DependencyInstaller(torchDependencies=(("fewshot_absent_torch", "torch>=2.14.1"),))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(DependencyError, match="install the PyTorch extension.*nothing was installed"):
        installer.installTorch()

    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append(torchVersionRequirement)
            return None  # e.g. the download failed

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    with pytest.raises(DependencyError, match="PyTorch could not be installed"):
        installer.installTorch()
    assert calls == [">=2.14.1"]
