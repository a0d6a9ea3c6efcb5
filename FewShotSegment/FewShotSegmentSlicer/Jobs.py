"""What one worker job is: its labels, its state and progress, and what it added to the scene."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import slicer


class FewShotJobError(RuntimeError):
    """The worker failed (bad input, missing weights, crash). The message is meant for the user."""


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
    """What a finished job added to or updated in the scene (nodes are None when not produced)."""
    segmentationNode: object = None
    landmarksNode: object = None
    uncertaintyNode: object = None  # preview only: 0..255 per voxel, where the method hesitates
    modelPath: str = ""
    templateHash: str = ""          # fingerprint of the painting the model was trained on
    summary: dict = field(default_factory=dict)
    # slices the library suggests to check or paint next: [{"slice": int, "axis": str, "score": float}]
    suggestedSlices: list = field(default_factory=list)


class FewShotJob:
    """One worker process: its state, progress and, once done, its result."""

    def __init__(self, task, tempDir, inputVolume, labels, outputName, keepModelAs, callback,
                 templateHash="", previewNode=None, previewLandmarksNode=None):
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
        self.templateHash = templateHash
        # when set, the results replace the content of these nodes instead of going to new nodes
        self.previewNode = previewNode
        self.previewLandmarksNode = previewLandmarksNode
        self.process = None           # a WorkerProcess (see Interfaces.py)
        self.state = "starting"       # running | done | failed | cancelled
        self.progress = 0.0
        self.stage = ""
        self.message = ""
        self.events = []
        self.outputs = {}
        self.error = ""
        self.result: Optional[FewShotResult] = None
        self.startTime = time.time()

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def waitStopped(self, timeout: float = None) -> bool:
        """After cancel(): wait until the process has ended and its folder is removed."""
        return self.process.waitStopped(timeout) if self.process is not None else True

    def __repr__(self):
        return f"<FewShotJob {self.task} {self.state} {self.progress:.0%} {self.message!r}>"
