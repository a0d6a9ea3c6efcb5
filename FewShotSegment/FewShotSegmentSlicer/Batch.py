"""Applying a saved adapter to several volumes, one worker after the other (part of the Logic)."""
from __future__ import annotations

from .Jobs import FewShotJobError


class BatchMixin:
    """predictBatch() and its queue; mixed into FewShotSegmentLogic, whose start(), wait(), poll()
    and busy it uses."""

    def __init__(self):
        self.batchQueue = []          # pending (inputVolume, modelPath, config, callback)
        self.batchResults = []        # results of the current batch, in order
        self.batchErrors = []         # (volume name, message)
        self._batchTotal = 0

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
