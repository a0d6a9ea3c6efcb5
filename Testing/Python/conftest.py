"""pytest fixtures of the FewShotSegment MRML tests (see fewshot_mrml.py for the stand-ins)."""
from __future__ import annotations

import os
import types

import pytest

import fewshot_mrml  # installs the stand-ins for qt, ctk, ScriptedLoadableModule, ... (import first)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fss():
    """The module file FewShotSegment/FewShotSegment.py, imported unchanged."""
    import FewShotSegment

    return FewShotSegment


@pytest.fixture
def mrml():
    """A fresh scene as slicer.mrmlScene, and slicer.modules.<name>.logic() for the module logics."""
    import slicer

    scene, appLogic, logics = fewshot_mrml.buildScene()
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=(lambda l=l: l))
                                              for name, l in logics.items()})
    yield types.SimpleNamespace(scene=scene, appLogic=appLogic, logics=logics)
    scene.Clear(1)
    del slicer.mrmlScene
    del slicer.modules


@pytest.fixture
def ctScene(mrml):
    """The CT, its reference labels and the template painted on one axial slice (real MRML nodes)."""
    volume, template, reference = fewshot_mrml.paintCtScene(mrml.scene, mrml.logics)
    return types.SimpleNamespace(volume=volume, template=template, reference=reference, **vars(mrml))


@pytest.fixture
def logic(fss, mrml, tmp_path):
    """The module's Logic, with its job folders under tmp_path (so leftovers are visible)."""
    logic = fss.FewShotSegmentLogic()
    logic.temporaryRoot = tmp_path / "jobs"
    yield logic
    logic.shutdownWorker()  # cancels a running job and ends the persistent worker process
