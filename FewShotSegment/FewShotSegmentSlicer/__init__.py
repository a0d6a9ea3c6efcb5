"""The Slicer side of FewShotSegment (the pure library is FewShotSegmentLib, run in a worker process):

- Parameters: the parameter node;       - Dependencies: what is missing, installing it in the background;
- WorkerProcess: the worker subprocess; - Jobs: one job's state and result;
- MrmlConversion: MRML <-> job files;   - Preview: the preview/accept loop, suggested slices;
- AdapterFiles: trained adapters on disk;
- Logic (+ Batch): FewShotSegmentLogic; - Widget: the panel; - Interfaces: protocols between them;
- SelfTest, SampleDataRegistration: Slicer's self-test and Sample Data registration.
"""
from .Dependencies import DEPENDENCIES, DependencyError, DependencyInstaller, installDependencies, missingDependencies
from .Jobs import FewShotJob, FewShotJobError, FewShotResult, LabelInfo
from .Logic import EXIT_CANCELLED, WORKER_MODULE, FewShotSegmentLogic, defaultEventHook
from .Parameters import (ADAPTERS, AXES, BACKBONES, CONFIG_PARAMETERS, DEVICES, MODALITIES, REFINEMENTS,
                         FewShotSegmentParameterNode, pathString)
from .WorkerProcess import libraryParentDir, workerPythonExecutable
