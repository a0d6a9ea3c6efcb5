"""The small interfaces between the panel, the Logic and the worker process, so that each can be
tested with a stand-in for the other (see Testing/Python/test_widget.py)."""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence


class WorkerProcess(Protocol):
    """A running worker: JSON lines on its stdout, an exit status, and a stop that never blocks."""

    pid: int

    def poll(self) -> Optional[int]:
        """The exit status, or None while it runs."""

    def readLines(self) -> list:
        """stdout lines received since the last call (never blocks)."""

    def finishReading(self, timeout: float) -> None:
        """After exit: wait (at most timeout) until every stdout line has been received."""

    def stop(self, graceSeconds: float, then: Callable[[], None] = None) -> None:
        """Return at once; in the background ask the process to stop, kill it after graceSeconds,
        then call `then` (e.g. remove its temporary folder)."""

    def close(self) -> None:
        """Release the pipes of a process that has ended."""

    def waitStopped(self, timeout: Optional[float] = None) -> bool:
        """Block until the process has ended and `then` has run; False on timeout."""


# (command, working directory, environment, stderr file) -> WorkerProcess
ProcessFactory = Callable[[Sequence[str], str, dict, str], WorkerProcess]


class FewShotLogicProtocol(Protocol):
    """What the panel needs from FewShotSegmentLogic."""

    busy: bool

    def getParameterNode(self): ...

    def configFromParameterNode(self, parameterNode) -> dict: ...

    def templateSegmentIds(self, segmentationNode) -> list: ...

    def selectedSegmentIds(self, parameterNode) -> Optional[list]: ...

    def propagate(self, parameterNode, segmentIds=None): ...

    def train(self, inputVolume, templateSegmentation, modelPath=None, segmentIds=None, config=None,
              wait=True, callback=None, parameterNode=None): ...

    def defaultAdapterPath(self, volumeNode=None) -> str: ...

    def finishBatch(self) -> None: ...

    def predictBatch(self, inputVolumes, modelPath, config=None, wait=True, callback=None): ...

    def poll(self): ...

    def cancel(self, job=None) -> bool: ...

    def acceptPreview(self, parameterNode, targetNode=None): ...

    def discardPreview(self, parameterNode) -> bool: ...

    def setSegmentFinished(self, segmentationNode, segmentId, finished=True): ...

    def isSegmentFinished(self, segmentationNode, segmentId) -> bool: ...

    def jumpToSuggestedSlice(self, volumeNode, suggestion: dict, sliceNodes=None): ...

    def saveAdapter(self, sourcePath, targetPath, labels=None) -> str: ...


class UserMessages(Protocol):
    """Dialogs and the status bar (slicer.util in the application, recorders in tests)."""

    def error(self, text: str) -> None: ...

    def info(self, text: str) -> None: ...

    def confirm(self, text: str) -> bool: ...

    def status(self, text: str) -> None: ...
