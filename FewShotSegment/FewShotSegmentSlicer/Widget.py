"""The panel's behaviour: buttons, the labels list, progress, the preview/accept loop. GUI code only;
all work goes through the Logic (FewShotLogicProtocol), and dialogs/status bar through UserMessages, so
tests drive it with stand-ins (Testing/Python/test_widget.py)."""
from __future__ import annotations

import time
from pathlib import Path

import qt

import slicer

from .Dependencies import DependencyError, DependencyInstaller, missingDependencies
from .Interfaces import FewShotLogicProtocol, UserMessages
from .Parameters import pathString


class SlicerMessages:
    """UserMessages of the Slicer application."""

    def error(self, text):
        slicer.util.errorDisplay(text)

    def info(self, text):
        slicer.util.infoDisplay(text)

    def confirm(self, text):
        return slicer.util.confirmOkCancelDisplay(text)

    def status(self, text):
        slicer.util.showStatusMessage(text, 5000)


class FewShotSegmentPanel:
    """Connects the widgets of Resources/UI/FewShotSegment.ui (``ui``: their variables) to the Logic."""

    def __init__(self, ui, logic: FewShotLogicProtocol, messages: UserMessages, timer=None,
                 installerFactory=DependencyInstaller):
        self.ui = ui
        self.logic = logic
        self.messages = messages
        self.timer = timer if timer is not None else qt.QTimer()
        self.installerFactory = installerFactory
        self.installer = None
        self.parameterNode = None
        self.suggestions = []
        self.suggestionIndex = -1
        self._updatingLabels = False
        self._shownOutputId = None
        self._pendingAction = None  # what to start once dependencies are installed

    def setup(self):
        ui = self.ui
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)
        for button, slot in ((ui.trainButton, self.onTrain), (ui.propagateButton, self.onPropagate),
                             (ui.cancelButton, self.onCancel), (ui.acceptButton, self.onAccept),
                             (ui.discardButton, self.onDiscard), (ui.nextSliceButton, self.onNextSlice),
                             (ui.applyBatchButton, self.onApplyBatch), (ui.saveAdapterButton, self.onSaveAdapter),
                             (ui.dependenciesButton, self.onDependencies),
                             (ui.editTemplateButton, self.onEditTemplate)):
            button.connect("clicked(bool)", slot)
        ui.labelsListWidget.connect("itemChanged(QListWidgetItem*)", self.onLabelItemChanged)
        ui.finishedListWidget.connect("itemChanged(QListWidgetItem*)", self.onFinishedItemChanged)
        ui.progressBar.setValue(0)
        ui.statusLabel.text = ""
        self._setBusy(False)

    def cleanup(self):
        if self.logic.busy:
            self.logic.cancel()
        if self.installer is not None:
            self.installer.cancel()
        self.timer.stop()

    def setParameterNode(self, parameterNode):
        self.parameterNode = parameterNode
        self.refreshLabels()
        self.refreshFinished()

    def onParameterNodeModified(self):
        output = self.parameterNode.outputSegmentation if self.parameterNode else None
        if (output.GetID() if output is not None else None) != self._shownOutputId:
            self.refreshFinished()
        self.updateButtons()

    # ---- labels list (checkable template segments)

    def refreshLabels(self, *args):
        listWidget = self.ui.labelsListWidget
        self._updatingLabels = True
        try:
            listWidget.clear()
            node = self.parameterNode.templateSegmentation if self.parameterNode else None
            if node is not None:
                selected = set(self.logic.selectedSegmentIds(self.parameterNode) or [])
                segmentation = node.GetSegmentation()
                for segmentId in self.logic.templateSegmentIds(node):
                    segment = segmentation.GetSegment(segmentId)
                    item = qt.QListWidgetItem(segment.GetName())
                    item.setData(qt.Qt.UserRole, segmentId)
                    pixmap = qt.QPixmap(12, 12)
                    pixmap.fill(qt.QColor.fromRgbF(*segment.GetColor()))
                    item.setIcon(qt.QIcon(pixmap))
                    item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                    item.setCheckState(qt.Qt.Checked if (not selected or segmentId in selected) else qt.Qt.Unchecked)
                    listWidget.addItem(item)
        finally:
            self._updatingLabels = False
        self.updateButtons()

    def onLabelItemChanged(self, item):
        if self._updatingLabels or not self.parameterNode:
            return
        ids = self.checkedSegmentIds()
        # all checked is stored as "" so that newly painted segments are included by default
        self.parameterNode.selectedSegmentIds = "" if ids is None else ",".join(ids)
        self.updateButtons()

    def checkedSegmentIds(self):
        """Checked template segments; None when all are checked (= every segment)."""
        listWidget = self.ui.labelsListWidget
        items = [listWidget.item(row) for row in range(listWidget.count)]
        ids = [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]
        return None if len(ids) == len(items) else ids

    # ---- finished segments of the output (Accept leaves them alone)

    def refreshFinished(self, *args):
        listWidget = self.ui.finishedListWidget
        output = self.parameterNode.outputSegmentation if self.parameterNode else None
        self._shownOutputId = output.GetID() if output is not None else None
        self._updatingLabels = True
        try:
            listWidget.clear()
            if output is not None:
                segmentation = output.GetSegmentation()
                for segmentId in self.logic.templateSegmentIds(output):
                    item = qt.QListWidgetItem(segmentation.GetSegment(segmentId).GetName())
                    item.setData(qt.Qt.UserRole, segmentId)
                    item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                    finished = self.logic.isSegmentFinished(output, segmentId)
                    item.setCheckState(qt.Qt.Checked if finished else qt.Qt.Unchecked)
                    listWidget.addItem(item)
        finally:
            self._updatingLabels = False

    def onFinishedItemChanged(self, item):
        output = self.parameterNode.outputSegmentation if self.parameterNode else None
        if self._updatingLabels or output is None:
            return
        self.logic.setSegmentFinished(output, item.data(qt.Qt.UserRole), item.checkState() == qt.Qt.Checked)

    # ---- state of the buttons

    def updateButtons(self, *args):
        pn = self.parameterNode
        if not pn:
            return
        ui = self.ui
        busy = self.logic.busy or (self.installer is not None and self.installer.state == "running")
        hasInput = pn.inputVolume is not None
        listWidget = ui.labelsListWidget
        hasTemplate = pn.templateSegmentation is not None and any(
            listWidget.item(row).checkState() == qt.Qt.Checked for row in range(listWidget.count))
        adapter = pathString(pn.adapterFile)
        adapterReady = bool(adapter) and Path(adapter).is_file()
        hasPreview = pn.previewSegmentation is not None
        ui.trainButton.enabled = not busy and hasInput and hasTemplate
        ui.propagateButton.enabled = not busy and hasInput and (adapterReady if pn.useAdapterFile else hasTemplate)
        ui.cancelButton.enabled = busy
        ui.acceptButton.enabled = not busy and hasPreview
        ui.discardButton.enabled = not busy and hasPreview
        ui.nextSliceButton.enabled = hasInput and bool(self.suggestions)
        ui.applyBatchButton.enabled = not busy and adapterReady
        ui.saveAdapterButton.enabled = not busy and adapterReady
        ui.dependenciesButton.enabled = not busy

    def _setBusy(self, busy):
        self.ui.inputsCollapsibleButton.enabled = not busy
        self.ui.settingsCollapsibleButton.enabled = not busy
        self.ui.progressBar.visible = busy
        self.updateButtons()

    def _showStatus(self, text):
        self.ui.statusLabel.text = text
        self.messages.status(text)

    # ---- actions

    def _startJob(self, starter):
        """Run starter() once dependencies are present (installing them first, in the background)."""
        if missingDependencies():
            self._pendingAction = starter
            self.onDependencies()
            return
        try:
            starter()
        except Exception as exc:
            self.messages.error(f"Could not start FewShotSegment: {exc}")
            return
        self.ui.progressBar.setValue(0)
        self._showStatus("Starting...")
        self._setBusy(True)
        self.timer.start()

    def onTrain(self):
        pn = self.parameterNode
        self._startJob(lambda: self.logic.train(
            pn.inputVolume, pn.templateSegmentation, modelPath=self.logic.defaultAdapterPath(pn.inputVolume),
            segmentIds=self.checkedSegmentIds(), config=self.logic.configFromParameterNode(pn), wait=False,
            parameterNode=pn))

    def onPropagate(self):
        self._startJob(lambda: self.logic.propagate(self.parameterNode, segmentIds=self.checkedSegmentIds()))

    def onApplyBatch(self):
        pn = self.parameterNode
        volumes = list(self.ui.batchVolumesSelector.checkedNodes())
        if not volumes:
            self.messages.error("Check the volumes to label in the list first.")
            return
        self._startJob(lambda: self.logic.predictBatch(volumes, pathString(pn.adapterFile),
                                                       config=self.logic.configFromParameterNode(pn), wait=False))

    def onCancel(self):
        """Returns at once: the Logic ends the worker in the background."""
        if self.installer is not None and self.installer.state == "running":
            self.installer.cancel()
            self._pendingAction = None
        self.logic.cancel()
        self.timer.stop()
        self._showStatus("Cancelled; the scene was not changed.")
        self._setBusy(False)

    def onAccept(self):
        try:
            target, copied, skipped = self.logic.acceptPreview(self.parameterNode)
        except ValueError as exc:
            self.messages.error(str(exc))
            return
        text = f"Accepted {len(copied)} segment(s) into '{target.GetName()}'."
        if skipped:
            text += f" Kept finished: {', '.join(skipped)}."
        self.suggestions, self.suggestionIndex = [], -1
        self._showStatus(text)
        self.refreshFinished()
        self.updateButtons()

    def onDiscard(self):
        if self.logic.discardPreview(self.parameterNode):
            self._showStatus("Preview discarded.")
        self.suggestions, self.suggestionIndex = [], -1
        self.updateButtons()

    def onNextSlice(self):
        """Move the slice view to the next slice the library suggests checking or painting."""
        if not self.suggestions or self.parameterNode.inputVolume is None:
            return
        self.suggestionIndex = (self.suggestionIndex + 1) % len(self.suggestions)
        suggestion = self.suggestions[self.suggestionIndex]
        self.logic.jumpToSuggestedSlice(self.parameterNode.inputVolume, suggestion)
        labels = f" for {', '.join(suggestion['labels'])}" if suggestion.get("labels") else ""
        self._showStatus(f"Suggested slice {suggestion['slice']} ({suggestion['axis']}{labels}, score "
                         f"{suggestion['score']:.2f}), {self.suggestionIndex + 1} of {len(self.suggestions)}")

    def onSaveAdapter(self):
        source = pathString(self.parameterNode.adapterFile)
        target = qt.QFileDialog.getSaveFileName(None, "Save trained adapter", Path(source).name, "Adapter (*.pt)")
        if target:
            try:
                self.parameterNode.adapterFile = Path(self.logic.saveAdapter(source, target))
            except OSError as exc:
                self.messages.error(f"Could not save the adapter: {exc}")

    def onEditTemplate(self):
        """Open the Segment Editor on the template (created when there is none) and the input volume."""
        pn = self.parameterNode
        if pn.templateSegmentation is None:
            template = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FewShot template")
            template.CreateDefaultDisplayNodes()
            pn.templateSegmentation = template
        if pn.inputVolume is not None:
            pn.templateSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(pn.inputVolume)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(pn.templateSegmentation)
        if pn.inputVolume is not None:
            setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
            setSource(pn.inputVolume)

    def onDependencies(self):
        """Install what is missing: torch through PyTorchUtils, the rest with pip in the background."""
        missing = missingDependencies()
        if not missing:
            self.messages.info("All dependencies are installed.")
            return
        if not self.messages.confirm("FewShotSegment needs these Python packages:\n\n" + "\n".join(missing)
                                     + "\n\nInstall them now? PyTorch is several GB."):
            self._pendingAction = None
            return
        self.installer = self.installerFactory()
        try:
            self._showStatus("Installing PyTorch through the PyTorch extension...")
            self.installer.installTorch()
            self.installer.start()
        except (DependencyError, OSError) as exc:
            self._pendingAction = None
            self.messages.error(f"Installing dependencies failed: {exc}")
            self.installer = None
            return
        self._setBusy(True)
        self.timer.start()

    # ---- progress

    def onTimer(self):
        if self.installer is not None and self._followInstaller():
            return
        job = self.logic.poll()
        if job is None:
            self.timer.stop()
            self._setBusy(False)
            return
        prefix = ""
        if getattr(self.logic, "_batchTotal", 0) and hasattr(job, "batchIndex"):
            prefix = f"[{job.batchIndex}/{self.logic._batchTotal}] "
        if job.running:
            self.ui.progressBar.setValue(int(round(100 * job.progress)))
            self._showStatus(prefix + (f"{job.stage}: {job.message}" if job.stage else job.message))
            return
        if self.logic.busy:  # the next batch volume started
            return
        self.timer.stop()
        self.logic.finishBatch()
        self._setBusy(False)
        if job.state == "done":
            self._showResult(job)
        elif job.state == "failed":
            self._showStatus("Failed.")
            self.messages.error(f"FewShotSegment failed:\n\n{job.error}")
        else:
            self._showStatus("Cancelled; the scene was not changed.")
        if self.logic.batchErrors:
            self.messages.error("\n".join(f"{name}: {error}" for name, error in self.logic.batchErrors))

    def _followInstaller(self) -> bool:
        """Progress of a dependency installation; True while it is running."""
        installer = self.installer
        state = installer.poll()
        self._showStatus(f"Installing dependencies: {installer.progressText}")
        if state == "running":
            return True
        self.installer = None
        self.timer.stop()
        self._setBusy(False)
        if state == "failed":
            self._pendingAction = None
            self.messages.error(f"Installing dependencies failed: {installer.error}")
            return True
        self._showStatus("Dependencies installed.")
        action, self._pendingAction = self._pendingAction, None
        if action is not None:
            self._startJob(action)
        return True

    def _showResult(self, job):
        result = job.result
        self.ui.progressBar.setValue(100)
        elapsed = time.time() - job.startTime
        if job.task == "train":
            self._showStatus(f"Adapter trained in {elapsed:.0f} s; Propagate reuses it while the painting "
                             "is unchanged.")
            return
        self.suggestions, self.suggestionIndex = list(result.suggestedSlices or []), -1
        if getattr(slicer, "app", None) is not None:  # the uncertainty map, when there is one, on top
            slicer.util.setSliceViewerLayers(background=job.inputVolume, foreground=result.uncertaintyNode,
                                             foregroundOpacity=0.4 if result.uncertaintyNode else 0.0)
        how = "reused the trained adapter" if job.task == "predict" else "trained on the current painting"
        name = result.segmentationNode.GetName() if result.segmentationNode is not None else ""
        missing = (result.summary or {}).get("not_found") or []
        # a label the evidence did not support is reported, not drawn as a false positive
        notFound = f" Not found: {', '.join(missing)}." if missing else ""
        self._showStatus(f"Done in {elapsed:.0f} s ({how}): '{name}'.{notFound} Accept or Discard the preview.")
        self.updateButtons()
