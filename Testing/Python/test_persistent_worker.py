"""The Logic with its persistent worker (python -m FewShotSegmentLib.server, real process, real MRML):
two propagations run in the same process and the second reuses the features; a killed server is
restarted for the next job, and the job it was running fails with a clear error; a cancel stops the
job but keeps the process; shutdownWorker() (also called by the module's cleanup) ends it.

A small synthetic volume (8 slices) keeps this quick; its features go to <repo>/.cache like the other
tests', so only the first run on a machine encodes."""
from __future__ import annotations

import os
import signal
import time
import types

import numpy as np
import pytest
import slicer
import vtk

from fewshot_mrml import FEATURE_CACHE, REPO, nodeIds

QUICK = {"steps": 100, "refine": "none", "device": "cpu", "cache_dir": str(FEATURE_CACHE)}


def smallScene():
    """8 CT-like slices of 48 x 48: a bright ellipsoid and a darker ball, painted on slice 4."""
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:8, :48, :48]
    masks = {"blob": ((k - 4) / 5.0) ** 2 + ((j - 22) / 11.0) ** 2 + ((i - 16) / 9.0) ** 2 <= 1,
             "ball": ((k - 4) / 4.0) ** 2 + ((j - 24) / 7.0) ** 2 + ((i - 35) / 7.0) ** 2 <= 1}
    body = ((j - 24) / 22.0) ** 2 + ((i - 24) / 23.0) ** 2 <= 1
    image = np.where(body, 0.0, -1000.0) + rng.normal(0, 10, body.shape)
    for mask, value in ((masks["blob"], 120), (masks["ball"], 60)):
        image[mask] = value + rng.normal(0, 10, int(mask.sum()))
    ijkToRAS = vtk.vtkMatrix4x4()
    for axis, spacing in enumerate((1.5, 1.5, 2.5)):
        ijkToRAS.SetElement(axis, axis, spacing)
    volume = slicer.util.addVolumeFromArray(image.astype(np.int16), ijkToRAS=ijkToRAS, name="small")
    template = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "small template")
    template.CreateDefaultDisplayNodes()
    template.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, color in (("blob", (0.9, 0.4, 0.3)), ("ball", (0.3, 0.5, 0.9))):
        segmentId = template.GetSegmentation().AddEmptySegment(name, name, color)
        painted = np.zeros(body.shape, np.uint8)
        painted[4] = masks[name][4]
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted, template, segmentId, volume)
    return volume, template


@pytest.fixture
def small(fss, mrml, logic, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(REPO / ".cache"))  # adapters and the panel's feature cache
    volume, template = smallScene()
    logic.eventHook = None
    assert logic.usesPersistentWorker  # the default
    return types.SimpleNamespace(volume=volume, template=template, scene=mrml.scene)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def waitForStage(logic, job, stage, timeout=300):
    deadline = time.time() + timeout
    while not any(e.get("stage") == stage for e in job.events):
        logic.poll()
        assert job.running, f"job ended before stage {stage}: {job.state} {job.error}"
        assert time.time() < deadline, f"no {stage} progress within {timeout} s"
        time.sleep(0.02)


def test_two_propagations_share_one_worker_and_the_second_reuses_the_features(small, logic):
    pn = logic.getParameterNode()
    pn.inputVolume, pn.templateSegmentation = small.volume, small.template
    pn.adapter, pn.epochs, pn.refine, pn.device = "classification", 20, "none", "cpu"
    seconds = []
    for _ in range(2):
        started = time.time()
        result = logic.propagate(pn, wait=True)
        seconds.append(time.time() - started)
        if not seconds[1:]:
            first, pid = result, logic.job.pid
    print(f"propagations: {seconds[0]:.1f} s (starts the worker), {seconds[1]:.1f} s (warm)", first.summary["timings"])

    assert logic.job.task == "predict"  # same painting: the adapter just trained is applied
    assert logic.job.pid == pid == logic.worker.pid and logic.worker.starts == 1 and alive(pid)
    assert first.summary["reused"] == {"backbone": False, "features": False}
    assert result.summary["reused"] == {"backbone": True, "features": True}
    assert pn.previewSegmentation is result.segmentationNode
    blob = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, "blob", small.volume)
    assert blob[[1, 7]].any()  # propagated beyond the painted slice 4
    assert not any(logic.temporaryRoot.iterdir())
    assert seconds[1] < seconds[0]

    started = time.time()
    logic.shutdownWorker()
    assert not alive(pid) and logic.worker.pid is None
    assert time.time() - started < 5


def test_a_killed_worker_is_restarted_and_the_job_it_ran_fails_clearly(small, logic):
    before = nodeIds(small.scene)
    logic.run(small.volume, small.template, config=QUICK)
    first = logic.job.pid
    os.kill(first, signal.SIGKILL)  # between jobs
    deadline = time.time() + 10
    while logic.worker.pid is not None:
        assert time.time() < deadline
        time.sleep(0.05)

    result = logic.run(small.volume, small.template, config=QUICK)
    second = logic.job.pid
    assert second != first and logic.worker.starts == 2 and result.segmentationNode is not None

    job = logic.run(small.volume, small.template, config={**QUICK, "steps": 20000}, wait=False)
    waitForStage(logic, job, "train")
    assert job.pid == second
    nodesBefore = nodeIds(small.scene)
    os.kill(second, signal.SIGKILL)  # during a job
    logic.wait(job, timeout=30)
    print(job.error)
    assert job.state == "failed" and "killed by signal 9" in job.error
    assert nodeIds(small.scene) == nodesBefore and len(nodesBefore) > len(before)
    assert not any(logic.temporaryRoot.iterdir())


def test_cancel_keeps_the_worker_for_the_next_job_and_the_module_cleanup_ends_it(fss, small, logic, monkeypatch):
    before = nodeIds(small.scene)
    job = logic.run(small.volume, small.template, config={**QUICK, "steps": 20000}, wait=False)
    waitForStage(logic, job, "train")
    pid = job.pid
    started = time.time()
    assert logic.cancel()
    assert time.time() - started < 0.5  # returns at once
    assert job.state == "cancelled" and not logic.busy and nodeIds(small.scene) == before
    assert job.waitStopped(timeout=logic.cancelGraceSeconds + 10)
    print(f"cancel during training: stopped after {time.time() - started:.2f} s")
    assert job.process.poll() == 143  # the server cancelled it: nothing was killed
    assert time.time() - started < 2.0
    assert not job.tempDir.exists() and alive(pid) and logic.worker.pid == pid

    result = logic.run(small.volume, small.template, config=QUICK)
    assert logic.job.pid == pid and result.summary["reused"] == {"backbone": True, "features": True}

    # the module widget's cleanup (module reload, Slicer closing) ends the worker
    calls = []
    app = types.SimpleNamespace(connect=lambda *a: calls.append(("connect",) + a),
                                disconnect=lambda *a: calls.append(("disconnect",) + a))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    widget = fss.FewShotSegmentWidget()
    widget.logic, widget._quitHandler = logic, logic.shutdownWorker
    widget.cleanup()
    assert not alive(pid) and logic.worker.pid is None
    assert calls == [("disconnect", "aboutToQuit()", logic.shutdownWorker)]
