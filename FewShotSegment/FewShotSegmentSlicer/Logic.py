"""FewShotSegmentLogic: the scene, the worker process and the import of its results. No Qt, so it
runs in the Python console, in ``Slicer --no-main-window --python-script`` batch jobs and in CI
against real MRML (slicer-core).

1. start() writes the input volume and the painted template (a label map on the volume's geometry)
   into a temporary folder with a job file (FewShotSegmentLib/job.py) and hands it to the worker:
   by default the persistent one (WorkerProcess.PersistentWorker, models and the last volume's
   features kept between jobs), else one process per job;
2. poll() (a QTimer in the panel, the loop of wait()) reads its JSON progress lines and, once it has
   exited, imports the results into NEW nodes (or into the preview, see propagate()) and removes the
   temporary folder. Nothing is added to the scene unless the job finished.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import AdapterFiles, MrmlConversion, Preview
from .Batch import BatchMixin
from .Jobs import FewShotJob, FewShotJobError, FewShotResult
from .Parameters import CONFIG_PARAMETERS, FewShotSegmentParameterNode, pathString, validateSettings
from .WorkerProcess import (PersistentWorker, SubprocessWorker, libraryParentDir, logTail, workerEnvironment,
                            workerPythonExecutable)

WORKER_MODULE = "FewShotSegmentLib.worker"
SERVER_MODULE = "FewShotSegmentLib.server"
EXIT_CANCELLED = 143


def defaultEventHook() -> Optional[Callable[[], None]]:
    """Inside the Slicer application: process Qt events while waiting, so the GUI stays alive.
    Without an application (slicer-core, plain Python) there is nothing to process."""
    app = getattr(slicer, "app", None)
    return getattr(app, "processEvents", None) if app is not None else None


class FewShotSegmentLogic(BatchMixin, ScriptedLoadableModuleLogic):
    """Typical console use::

        import FewShotSegment
        logic = FewShotSegment.FewShotSegmentLogic()
        result = logic.run(volumeNode, templateSegmentationNode, config={"refine": "box"})
        result.segmentationNode, result.landmarksNode
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.job: Optional[FewShotJob] = None
        BatchMixin.__init__(self)
        self.pythonExecutable = None  # None: workerPythonExecutable()
        self.workerModule = WORKER_MODULE
        self.serverModule = SERVER_MODULE
        # True: jobs go to one long-lived worker process (self.worker); False: one process per job
        self.persistentWorker = True
        self.worker = PersistentWorker()
        self.cancelGraceSeconds = 5.0
        self.temporaryRoot = None     # None: Slicer's temporary folder or the system one
        self.processFactory = SubprocessWorker  # (command, cwd, env, stderrPath) -> WorkerProcess
        self.eventHook = defaultEventHook()     # called between polls by wait()
        self.waitInterval = 0.05
        self._polling = False

    def getParameterNode(self):
        return FewShotSegmentParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ settings

    def defaultFeatureCacheDir(self) -> str:
        return str(AdapterFiles.userCacheDir() / "features")

    defaultAdapterPath = staticmethod(AdapterFiles.defaultAdapterPath)
    adapterLabelsPath = staticmethod(AdapterFiles.adapterLabelsPath)
    saveAdapter = staticmethod(AdapterFiles.saveAdapter)
    readAdapterLabels = staticmethod(AdapterFiles.readAdapterLabels)

    def configFromParameterNode(self, parameterNode) -> dict:
        """PipelineConfig values from the parameter node (same field names)."""
        config = {}
        for name in CONFIG_PARAMETERS:
            value = getattr(parameterNode, name)
            config[name] = pathString(value) if name in ("checkpoint", "sam_checkpoint") else value
        config["cache_dir"] = self.defaultFeatureCacheDir() if parameterNode.cacheFeatures else ""
        return config

    @staticmethod
    def selectedSegmentIds(parameterNode) -> Optional[list]:
        ids = [s for s in (parameterNode.selectedSegmentIds or "").split(",") if s]
        return ids or None

    def _temporaryRoot(self) -> str:
        if self.temporaryRoot:
            return str(self.temporaryRoot)
        app = getattr(slicer, "app", None)
        if app is not None and getattr(app, "temporaryPath", ""):
            return app.temporaryPath
        return tempfile.gettempdir()

    # ------------------------------------------------------------------ MRML <-> files

    templateSegmentIds = staticmethod(MrmlConversion.segmentIdsOf)
    writeVolume = staticmethod(MrmlConversion.writeVolume)
    importLabelmapAsSegmentation = staticmethod(MrmlConversion.importLabelmapAsSegmentation)
    importLandmarks = staticmethod(MrmlConversion.importLandmarks)

    @staticmethod
    def writeTemplateLabelmap(segmentationNode, referenceVolume, path, segmentIds=None) -> list:
        """Export the chosen template segments as one label map file; returns their LabelInfo."""
        return MrmlConversion.exportTemplate(segmentationNode, referenceVolume, segmentIds, path)[0]

    @staticmethod
    def templateFingerprint(segmentationNode, referenceVolume, segmentIds=None) -> str:
        """A hash of the painted template voxels (and segment IDs, geometry)."""
        return MrmlConversion.exportTemplate(segmentationNode, referenceVolume, segmentIds)[1]

    # ------------------------------------------------------------------ jobs

    def start(self, task, inputVolume, templateSegmentation=None, segmentIds=None, modelPath=None,
              config=None, outputName=None, keepModelAs=None, callback: Callable = None,
              preview=False, parameterNode=None, moreTemplates=None) -> FewShotJob:
        """Write the job and start the worker in the background; returns at once. Drive it with
        poll() (or wait()), stop it with cancel(). task: "run", "train" or "predict" (a templateSegmentation
        given to "predict" is the painting the adapter was trained on: it anchors the result). With preview=True
        the result replaces the content of parameterNode's preview nodes (created when missing).
        moreTemplates: [(volume node, segmentation node)] of other patients whose painted slices
        train the same adapter ("run", "train"); their segments are matched by name."""
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
        validateSettings(config)
        if task == "train":
            config.setdefault("landmarks", False)
        Path(self._temporaryRoot()).mkdir(parents=True, exist_ok=True)
        tempDir = tempfile.mkdtemp(prefix="FewShotSegment-", dir=self._temporaryRoot())
        try:
            job = {"task": task, "output_dir": str(Path(tempDir) / "output"), "config": config}
            job["image"] = str(self.writeVolume(inputVolume, Path(tempDir) / "image.nrrd"))
            templateHash = ""
            if templateSegmentation is not None:   # trains a run/train; anchors a reused adapter's predict
                templatePath = Path(tempDir) / "template.nrrd"
                labels, paintingHash = MrmlConversion.exportTemplate(templateSegmentation, inputVolume,
                                                                     segmentIds, templatePath)
                job["template"] = str(templatePath)
            if task == "predict":
                job["model"] = str(Path(modelPath).resolve())
                labels = self.readAdapterLabels(modelPath)     # the adapter's names, not the painting's
            else:
                for number, (volume, segmentation) in enumerate(moreTemplates or [], start=1):
                    otherTemplate = Path(tempDir) / f"template_{number}.nrrd"
                    otherLabels, otherHash = MrmlConversion.exportTemplate(segmentation, volume, None, otherTemplate)
                    job.setdefault("more_templates", []).append({
                        "image": str(self.writeVolume(volume, Path(tempDir) / f"image_{number}.nrrd")),
                        "template": str(otherTemplate),
                        "labels": {str(label.value): {"name": label.name} for label in otherLabels}})
                    paintingHash += otherHash
                templateHash = AdapterFiles.trainingFingerprint(paintingHash, config, task)
            if labels:
                job["labels"] = {str(label.value): {"name": label.name, "color": [float(c) for c in label.color]}
                                 for label in labels}
            if outputName is None:
                outputName = f"{inputVolume.GetName()} few-shot"
            fewShotJob = FewShotJob(task, tempDir, inputVolume, labels, outputName, keepModelAs, callback,
                                    templateHash=templateHash)
            fewShotJob.preview = preview
            fewShotJob.parameterNode = parameterNode
            fewShotJob.jobFile.write_text(json.dumps(job, indent=2))
            self._launch(fewShotJob)
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        self.job = fewShotJob
        return fewShotJob

    @property
    def usesPersistentWorker(self) -> bool:
        # a replaced processFactory (the tests' stand-in workers) means one process per job
        return self.persistentWorker and self.processFactory is SubprocessWorker

    def _launch(self, job: FewShotJob):
        libraryDir = str(libraryParentDir())
        env = workerEnvironment(libraryDir)  # the library that ships with this module comes first
        python = self.pythonExecutable or workerPythonExecutable()
        if self.usesPersistentWorker:
            job.process = self.worker.submit([python, "-m", self.serverModule], libraryDir, env,
                                             json.loads(job.jobFile.read_text()), str(job.stderrPath))
        else:
            job.process = self.processFactory([python, "-m", self.workerModule, str(job.jobFile)], libraryDir,
                                              env, str(job.stderrPath))
        job.state = "running"
        logging.info(f"FewShotSegment: started {job.task} job (pid {job.process.pid}) in {job.tempDir}")

    def _drain(self, job: FewShotJob):
        for line in job.process.readLines():
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
        if job is None or self._polling:  # re-entered from processEvents() inside wait()
            return job
        self._polling = True
        try:
            if job.running:
                self._drain(job)
                if job.process.poll() is not None:
                    job.process.finishReading(timeout=5)
                    self._drain(job)
                    self._finish(job)
            if not job.running and self.batchQueue:
                self._startNextInBatch()
        finally:
            self._polling = False
        return self.job

    @property
    def busy(self) -> bool:
        return (self.job is not None and self.job.running) or bool(self.batchQueue)

    def _finish(self, job: FewShotJob):
        returncode = job.process.poll()
        try:
            if returncode == 0 and any(e.get("event") == "done" for e in job.events):
                try:
                    job.result = self._importResults(job)
                    job.state = "done"
                    job.progress = 1.0
                    self._recordInParameterNode(job)
                except Exception as exc:
                    logging.exception("FewShotSegment: importing the results failed")
                    job.state = "failed"
                    job.error = f"could not load the results of the worker: {exc}"
            elif returncode in (EXIT_CANCELLED, -15) or any(e.get("event") == "cancelled" for e in job.events):
                job.state = "cancelled"
            else:
                job.state = "failed"
                detail = job.error or logTail(job.stderrPath) or "no message"
                if returncode == 0:
                    reason = "the worker exited without reporting a result"
                elif returncode is not None and returncode < 0:
                    reason = f"the worker was killed by signal {-returncode}"
                else:
                    reason = f"the worker failed (exit status {returncode})"
                job.error = f"{reason}: {detail}"
                logging.error(f"FewShotSegment: {job.error}\n{logTail(job.stderrPath, 40)}")
        finally:
            job.process.close()
            shutil.rmtree(job.tempDir, ignore_errors=True)

    def _importResults(self, job: FewShotJob) -> FewShotResult:
        def outputPath(key, default=None):
            value = job.outputs.get(key) or default
            if not value:
                return None
            path = Path(value)
            return path if path.is_absolute() else job.outputDir / path

        result = FewShotResult(templateHash=job.templateHash)
        summaryPath = outputPath("summary")
        if summaryPath is not None and summaryPath.is_file():
            try:
                result.summary = json.loads(summaryPath.read_text())
            except ValueError:
                result.summary = {}
        result.suggestedSlices = Preview.readSuggestedSlices(outputPath("suggestions", "suggested_slices.json"))
        labels = list(job.labels or [])
        if not labels and outputPath("segmentation") is not None:
            labels = MrmlConversion.labelsFromSegFile(outputPath("segmentation"))
        with MrmlConversion.SceneGuard(slicer.mrmlScene) as guard:  # all or nothing
            if job.task in ("run", "predict"):
                labelmapPath = outputPath("labels")
                if labelmapPath is None or not labelmapPath.is_file():
                    raise FewShotJobError("the worker reported no label map")
                segmentation = self.importLabelmapAsSegmentation(labelmapPath, job.inputVolume, labels,
                                                                 job.outputName)
                landmarksPath = outputPath("landmarks")
                landmarks = None
                if landmarksPath is not None and landmarksPath.is_file():
                    landmarks = self.importLandmarks(landmarksPath, job.inputVolume, f"{job.outputName} landmarks")
                if job.preview:
                    segmentation, landmarks = self._updatePreview(job, segmentation, landmarks)
                    result.uncertaintyNode = guard.keep(self._updateUncertainty(job, outputPath("uncertainty")))
                result.segmentationNode = guard.keep(segmentation)
                result.landmarksNode = guard.keep(landmarks)
            modelPath = outputPath("model")
            if modelPath is not None and modelPath.is_file():
                target = job.keepModelAs or (self.defaultAdapterPath(job.inputVolume) if job.task == "train" else None)
                if target:
                    result.modelPath = self.saveAdapter(modelPath, target, labels)
        return result

    def _updatePreview(self, job, segmentation, landmarks):
        """Move the new result into the existing preview nodes (same nodes, new content), or make
        the new nodes the preview. The nodes not kept are removed by the caller's SceneGuard."""
        pn = job.parameterNode
        scene = slicer.mrmlScene
        name = f"{job.inputVolume.GetName()} few-shot preview"
        previewNode = pn.previewSegmentation if pn is not None else None
        if previewNode is not None and scene.GetNodeByID(previewNode.GetID()) is not None:
            Preview.saveUndoState(scene)
            MrmlConversion.replaceSegments(previewNode, segmentation)
            segmentation = previewNode
        else:
            Preview.markAsPreview(segmentation, name)
        previewLandmarks = pn.previewLandmarks if pn is not None else None
        if landmarks is not None:
            if previewLandmarks is not None and scene.GetNodeByID(previewLandmarks.GetID()) is not None:
                MrmlConversion.replaceControlPoints(previewLandmarks, landmarks)
                landmarks = previewLandmarks
            else:
                landmarks.SetName(scene.GenerateUniqueName(f"{name} landmarks"))
                Preview.enableUndo(landmarks)
        return segmentation, landmarks

    def _updateUncertainty(self, job, path):
        """The worker's uncertainty map into the preview's uncertainty volume (updated in place)."""
        if path is None or not path.is_file():
            return None
        loaded = MrmlConversion.importVolume(path, job.inputVolume, f"{job.inputVolume.GetName()} few-shot uncertainty")
        existing = job.parameterNode.previewUncertainty if job.parameterNode is not None else None
        if existing is None or slicer.mrmlScene.GetNodeByID(existing.GetID()) is None:
            return loaded
        MrmlConversion.replaceVolumeContent(existing, loaded)
        return existing  # `loaded` is not kept: the SceneGuard removes it

    def _recordInParameterNode(self, job: FewShotJob):
        pn, result = getattr(job, "parameterNode", None), job.result
        if pn is None:
            return
        if result.modelPath and job.task in ("run", "train"):
            pn.adapterFile = Path(result.modelPath)
            pn.adapterTemplateHash = job.templateHash
        if job.preview:
            pn.previewSegmentation = result.segmentationNode
            if result.landmarksNode is not None:
                pn.previewLandmarks = result.landmarksNode
            if result.uncertaintyNode is not None:
                pn.previewUncertainty = result.uncertaintyNode

    def cancel(self, job: FewShotJob = None) -> bool:
        """Stop the running job and drop pending batch volumes. Returns at once: the process is
        terminated (killed after cancelGraceSeconds) and its folder removed in the background; see
        job.waitStopped(). The scene is not changed. Returns True when a job was running."""
        self.batchQueue = []
        job = job or self.job
        if job is None or not job.running:
            return False
        self._drain(job)
        job.state = "cancelled"
        job.message = "cancelled"
        tempDir = job.tempDir
        job.process.stop(self.cancelGraceSeconds, then=lambda: shutil.rmtree(tempDir, ignore_errors=True))
        logging.info("FewShotSegment: job cancelled")
        return True

    def shutdownWorker(self, timeout: float = 5.0) -> None:
        """Cancel the running job and end the persistent worker process (killed after timeout s);
        the module's cleanup and Slicer's aboutToQuit call this. The next job starts a new one."""
        if self.busy:
            self.cancel()
        self.worker.shutdown(timeout)

    def wait(self, job: FewShotJob = None, timeout: float = None) -> FewShotJob:
        """Block until the job (and any pending batch) ends, calling eventHook between polls (Qt events
        inside the application, so Slicer stays responsive). Ctrl-C cancels it."""
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
                if self.eventHook is not None:
                    self.eventHook()
                time.sleep(self.waitInterval)
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
            outputName=None, keepModelAs=None, callback=None, moreTemplates=None):
        """Train on the painted template slices and label the whole volume into NEW nodes. With
        wait=True returns a FewShotResult (raises FewShotJobError on failure); else the running job."""
        job = self.start("run", inputVolume, templateSegmentation, segmentIds=segmentIds, config=config,
                         outputName=outputName, keepModelAs=keepModelAs, callback=callback,
                         moreTemplates=moreTemplates)
        return self._resultOrRaise(self.wait(job)) if wait else job

    def train(self, inputVolume, templateSegmentation, modelPath=None, segmentIds=None, config=None,
              wait=True, callback=None, parameterNode=None, moreTemplates=None):
        """Train an adapter only; it is saved to modelPath (default: the per-user adapter folder)
        with a .labels.json side file holding the segment names, colours and terminology."""
        job = self.start("train", inputVolume, templateSegmentation, segmentIds=segmentIds, config=config,
                         keepModelAs=modelPath or self.defaultAdapterPath(inputVolume), callback=callback,
                         parameterNode=parameterNode, moreTemplates=moreTemplates)
        return self._resultOrRaise(self.wait(job)) if wait else job

    def predict(self, inputVolume, modelPath, config=None, wait=True, outputName=None, callback=None):
        """Apply a saved adapter to a volume (no template needed)."""
        job = self.start("predict", inputVolume, modelPath=modelPath, config=config, outputName=outputName,
                         callback=callback)
        return self._resultOrRaise(self.wait(job)) if wait else job

    # ------------------------------------------------------------------ preview / accept

    def propagate(self, parameterNode, segmentIds=None, wait=False, callback=None):
        """The panel's Propagate: label the input volume into the preview segmentation (updated in
        place). Uses the CURRENT painting: the adapter of the last Propagate is reused only while the
        painting and the training settings are unchanged (and then with the painting, which anchors
        the result as in a run; Train's adapter, made for other patients, is never reused here), or
        when the user chose to apply a saved adapter (useAdapterFile). Returns the job (or its result
        with wait=True)."""
        pn = parameterNode
        config = self.configFromParameterNode(pn)
        adapter = pathString(pn.adapterFile)
        common = dict(config=config, callback=callback, preview=True, parameterNode=pn)
        if pn.useAdapterFile:
            job = self.start("predict", pn.inputVolume, modelPath=adapter, **common)
        else:
            fingerprint = AdapterFiles.trainingFingerprint(
                self.templateFingerprint(pn.templateSegmentation, pn.inputVolume, segmentIds), config, "run")
            if adapter and Path(adapter).is_file() and pn.adapterTemplateHash == fingerprint:
                job = self.start("predict", pn.inputVolume, pn.templateSegmentation, segmentIds=segmentIds,
                                 modelPath=adapter, **common)
                job.templateHash = fingerprint
            else:
                job = self.start("run", pn.inputVolume, pn.templateSegmentation, segmentIds=segmentIds,
                                 keepModelAs=self.defaultAdapterPath(pn.inputVolume), **common)
        return self._resultOrRaise(self.wait(job)) if wait else job

    def acceptPreview(self, parameterNode, targetNode=None):
        """Copy the preview's segments into targetNode (default: parameterNode.outputSegmentation, or
        a new segmentation), then remove the preview. Segments marked finished in the target and the
        template are never changed. Returns (target, copied IDs, skipped IDs)."""
        pn = parameterNode
        volume = pn.inputVolume
        target, landmarks, copied, skipped = Preview.accept(
            pn.previewSegmentation, targetNode or pn.outputSegmentation, pn.templateSegmentation, volume,
            name=f"{volume.GetName() if volume else 'FewShot'} few-shot",
            previewLandmarks=pn.previewLandmarks, targetLandmarks=pn.outputLandmarks)
        pn.outputSegmentation = target
        if landmarks is not None:
            pn.outputLandmarks = landmarks
        self._removePreview(pn, undoStep=False)
        return target, copied, skipped

    def discardPreview(self, parameterNode) -> bool:
        """Remove the preview segmentation and its landmarks. False when there was none."""
        return self._removePreview(parameterNode, undoStep=True)

    def _removePreview(self, pn, undoStep) -> bool:
        removed = Preview.discard(pn.previewSegmentation, pn.previewLandmarks, pn.previewUncertainty,
                                  undoStep=undoStep)
        pn.previewSegmentation = pn.previewLandmarks = pn.previewUncertainty = None
        return removed

    setSegmentFinished = staticmethod(Preview.setFinished)
    isSegmentFinished = staticmethod(Preview.isFinished)
    jumpToSuggestedSlice = staticmethod(Preview.jumpToSuggestedSlice)
