"""The panel (FewShotSegmentSlicer/Widget.py) clicked through on real MRML: stand-in widgets built
from the real .ui file where Qt is absent, the real Logic, and the stand-in worker of fake_worker.py."""
from __future__ import annotations

import time

import pytest
import slicer

import fake_worker
import qt_standins
from fewshot_mrml import REPO


class Messages:
    """UserMessages that record what the user would see."""

    def __init__(self, confirmAnswer=True):
        self.errors, self.infos, self.statuses, self.confirms = [], [], [], []
        self.confirmAnswer = confirmAnswer

    def error(self, text):
        self.errors.append(text)

    def info(self, text):
        self.infos.append(text)

    def confirm(self, text):
        self.confirms.append(text)
        return self.confirmAnswer

    def status(self, text):
        self.statuses.append(text)


class FakeInstaller:
    """DependencyInstaller stand-in: runs until the test sets its outcome."""

    def __init__(self):
        self.state, self.progressText, self.error, self.started, self.cancelled = "idle", "", "", False, False

    def installTorch(self):
        pass

    def start(self):
        self.started, self.state, self.progressText = True, "running", "Collecting timm==1.0.31"

    def poll(self):
        return self.state

    def cancel(self):
        self.cancelled = True


@pytest.fixture
def runs():
    return []


@pytest.fixture
def panel(fss, mrml, logic, runs):
    from FewShotSegmentSlicer.SelfTest import makeSyntheticScene
    from FewShotSegmentSlicer.Widget import FewShotSegmentPanel

    import qt

    if not getattr(qt, "isStandIn", False):
        pytest.skip("real Qt present: the panel is exercised by the module in Slicer")
    volume, template, _ = makeSyntheticScene()
    logic.processFactory = fake_worker.factory(runs, suggest=[{"slice": 7, "axis": "axial", "score": 0.9},
                                                              {"slice": 20, "axis": "axial", "score": 0.5}])
    logic.eventHook = None
    pn = logic.getParameterNode()
    pn.inputVolume, pn.templateSegmentation, pn.cacheFeatures = volume, template, False
    ui = qt_standins.uiFromFile(REPO / "FewShotSegment" / "Resources" / "UI" / "FewShotSegment.ui")
    widget = FewShotSegmentPanel(ui, logic, Messages(), installerFactory=FakeInstaller)
    widget.setup()
    widget.setParameterNode(pn)
    red = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    widget.redSlice = red
    widget.pn, widget.volume, widget.template, widget.scene = pn, volume, template, mrml.scene
    return widget


def tickUntilIdle(widget, limit=20):
    for _ in range(limit):
        if not widget.timer.active:
            return
        widget.timer.tick()
    raise AssertionError("the job did not finish")


def segmentations(scene):
    return [n.GetName() for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode", scene)]


def test_propagate_next_slice_accept_propagate_discard(panel, runs):
    ui, pn = panel.ui, panel.pn
    assert [item.text for item in ui.labelsListWidget.items] == ["blob", "ball"]
    assert ui.propagateButton.enabled and not ui.cancelButton.enabled
    assert not ui.acceptButton.enabled and not ui.discardButton.enabled and not ui.nextSliceButton.enabled

    ui.propagateButton.click()
    assert panel.timer.active and ui.cancelButton.enabled and not ui.propagateButton.enabled
    assert ui.progressBar.visible and not ui.inputsCollapsibleButton.enabled
    panel.timer.tick()
    assert ui.progressBar.value == 50 and "adapter: training" in ui.statusLabel.text
    tickUntilIdle(panel)
    assert runs[-1].task == "run" and "trained on the current painting" in ui.statusLabel.text
    assert panel.messages.statuses[-1] == ui.statusLabel.text  # the status bar says the same
    preview = pn.previewSegmentation
    assert preview is not None and ui.acceptButton.enabled and ui.discardButton.enabled
    assert not ui.progressBar.visible and ui.propagateButton.enabled

    # Next slice: the view goes to the suggested slices in turn
    assert ui.nextSliceButton.enabled
    ui.nextSliceButton.click()
    assert panel.redSlice.GetSliceToRAS().GetElement(2, 3) == pytest.approx(7 * panel.volume.GetSpacing()[2])
    assert "Suggested slice 7" in ui.statusLabel.text
    ui.nextSliceButton.click()
    assert panel.redSlice.GetSliceToRAS().GetElement(2, 3) == pytest.approx(20 * panel.volume.GetSpacing()[2])

    ui.acceptButton.click()
    assert pn.previewSegmentation is None and panel.scene.GetNodeByID(preview.GetID()) is None
    output = pn.outputSegmentation
    assert output is not None and output.GetSegmentation().GetNumberOfSegments() == 2
    assert "Accepted 2 segment(s)" in ui.statusLabel.text
    assert not ui.acceptButton.enabled and not ui.nextSliceButton.enabled

    # the output's segments can be marked finished: the next Accept keeps them
    assert [item.text for item in ui.finishedListWidget.items] == ["blob", "ball"]
    ui.finishedListWidget.item(1).setCheckState(qt_standins.Qt.Checked)
    assert panel.logic.isSegmentFinished(output, "ball")
    ui.propagateButton.click()
    tickUntilIdle(panel)
    ui.acceptButton.click()
    assert "Accepted 1 segment(s)" in ui.statusLabel.text and "Kept finished: ball" in ui.statusLabel.text

    # painting unchanged: the next Propagate reuses the adapter; Discard removes that preview
    ui.propagateButton.click()
    tickUntilIdle(panel)
    assert runs[-1].task == "predict" and "reused the trained adapter" in ui.statusLabel.text
    ui.discardButton.click()
    assert pn.previewSegmentation is None
    assert sorted(segmentations(panel.scene)) == sorted([panel.template.GetName(), output.GetName()])
    assert panel.messages.errors == []


def test_unchecked_label_is_left_out(panel, runs):
    ui, pn = panel.ui, panel.pn
    ui.labelsListWidget.item(1).setCheckState(qt_standins.Qt.Unchecked)  # "ball"
    assert pn.selectedSegmentIds == "blob"
    ui.propagateButton.click()
    tickUntilIdle(panel)
    assert list(runs[-1].job["labels"].values())[0]["name"] == "blob" and len(runs[-1].job["labels"]) == 1
    segmentation = pn.previewSegmentation.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["blob"]
    ui.labelsListWidget.item(0).setCheckState(qt_standins.Qt.Unchecked)  # nothing left to propagate
    assert not ui.propagateButton.enabled and not ui.trainButton.enabled


def test_cancel_returns_at_once_and_leaves_the_scene_as_it_was(panel, runs, logic):
    ui = panel.ui
    logic.processFactory = fake_worker.factory(runs, hang=True)
    before = segmentations(panel.scene)
    ui.propagateButton.click()
    panel.timer.tick()
    started = time.time()
    ui.cancelButton.click()
    assert time.time() - started < 0.5
    assert runs[-1].stopped and not panel.timer.active
    assert ui.propagateButton.enabled and not ui.cancelButton.enabled and not ui.progressBar.visible
    assert "Cancelled" in ui.statusLabel.text and panel.pn.previewSegmentation is None
    assert segmentations(panel.scene) == before


def test_missing_dependencies_install_in_the_background_then_the_job_starts(panel, runs, monkeypatch):
    from FewShotSegmentSlicer import Widget

    missing = ["timm==1.0.31"]
    monkeypatch.setattr(Widget, "missingDependencies", lambda: list(missing))
    ui = panel.ui
    ui.propagateButton.click()
    assert "timm==1.0.31" in panel.messages.confirms[-1]
    installer = panel.installer
    assert installer.started and runs == [] and panel.timer.active
    panel.timer.tick()
    assert "Collecting timm" in ui.statusLabel.text and ui.cancelButton.enabled and not ui.propagateButton.enabled
    installer.state = "done"
    missing.clear()
    panel.timer.tick()  # installation finished: the Propagate the user asked for starts now
    assert runs and runs[-1].task == "run"
    tickUntilIdle(panel)
    assert panel.pn.previewSegmentation is not None


def test_failed_installation_is_reported_and_starts_nothing(panel, runs, monkeypatch):
    from FewShotSegmentSlicer import Widget

    monkeypatch.setattr(Widget, "missingDependencies", lambda: ["timm==1.0.31"])
    ui = panel.ui
    ui.propagateButton.click()
    panel.installer.state = "failed"
    panel.installer.error = "could not install timm==1.0.31: cannot download them (offline?); nothing was installed"
    panel.timer.tick()
    assert panel.messages.errors and "offline" in panel.messages.errors[-1]
    assert runs == [] and not panel.timer.active and ui.propagateButton.enabled

    panel.messages.confirmAnswer = False  # the user declines: nothing happens
    ui.propagateButton.click()
    assert panel.installer is None and runs == []


def test_the_real_classes_and_the_stand_ins_provide_the_interfaces(fss):
    """Every method of the protocols exists, with the protocol's parameter names, on the real Logic and
    worker process and on the stand-in worker the tests use (so the stand-in cannot drift)."""
    import inspect

    from FewShotSegmentSlicer.Interfaces import FewShotLogicProtocol, WorkerProcess
    from FewShotSegmentSlicer.WorkerProcess import ServerJob, SubprocessWorker

    for protocol, implementations in ((FewShotLogicProtocol, [fss.FewShotSegmentLogic]),
                                      (WorkerProcess, [SubprocessWorker, ServerJob, fake_worker.FakeWorker])):
        methods = {name: member for name, member in vars(protocol).items()
                   if callable(member) and not name.startswith("_")}
        assert methods, protocol
        for implementation in implementations:
            for name, member in methods.items():
                assert hasattr(implementation, name), f"{implementation.__name__} lacks {name}"
                wanted = [p for p in inspect.signature(member).parameters if p != "self"]
                offered = list(inspect.signature(getattr(implementation, name)).parameters)
                assert set(wanted) <= set(offered), (implementation.__name__, name, wanted, offered)
