"""A stand-in for the worker process (the WorkerProcess interface of FewShotSegmentSlicer), for fast
tests of the Logic and the panel on real MRML: it reads the real job file and writes real outputs.

"run"/"train": the painted label of each template voxel is copied onto every slice along k (a crude
but checkable propagation) and saved as labels.nrrd; adapter.pt holds that label map so "predict"
returns the same. Landmarks: one point per label at its first voxel. Optionally suggested_slices.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


class FakeWorker:
    def __init__(self, command, cwd, env, stderrPath, runs, pollsBeforeExit=2, suggest=None, hang=False,
                 uncertainty=None):
        self.command, self.cwd, self.env = list(command), cwd, env
        self.pid = -1
        self.job = json.loads(Path(command[-1]).read_text())
        self.polls, self.pollsBeforeExit, self.hang = 0, pollsBeforeExit, hang
        self.returncode = None
        self.stopped = False
        self._lines = [json.dumps({"event": "started", "task": self.job["task"]}),
                       json.dumps({"event": "progress", "progress": 0.5, "stage": "adapter", "message": "training"})]
        self.suggest = suggest
        self.uncertainty = uncertainty  # a value: uncertainty.nrrd holds it on every labelled voxel
        Path(stderrPath).write_text("")
        runs.append(self)

    @property
    def task(self):
        return self.job["task"]

    def _work(self):
        out = Path(self.job["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        outputs = {}
        if self.job.get("template"):  # kept: the job folder is gone when a test looks
            self.painting = sitk.GetArrayFromImage(sitk.ReadImage(self.job["template"]))
        if self.task in ("run", "train"):
            template = sitk.ReadImage(self.job["template"])
            painted = sitk.GetArrayFromImage(template)
            labels = np.zeros_like(painted)
            for k in np.unique(np.nonzero(painted)[0]):  # every painted slice, copied along k
                labels[:] = np.where(painted[k] > 0, painted[k], labels)
            np.save(out / "adapter.npy", labels)
            (out / "adapter.pt").write_bytes((out / "adapter.npy").read_bytes())
            outputs["model"] = str(out / "adapter.pt")
        else:
            labels = np.load(self.job["model"], allow_pickle=False)
        if self.task in ("run", "predict"):
            image = sitk.ReadImage(self.job["image"])
            result = sitk.GetImageFromArray(labels.astype(np.uint8))
            result.CopyInformation(image)
            sitk.WriteImage(result, str(out / "labels.nrrd"))
            outputs["labels"] = str(out / "labels.nrrd")
            points = []
            for value in sorted(set(np.unique(labels)) - {0}):
                k, j, i = [int(v) for v in np.argwhere(labels == value)[0]]
                lps = image.TransformIndexToPhysicalPoint((i, j, k))
                name = self.job.get("labels", {}).get(str(int(value)), {}).get("name", f"Label_{value}")
                points.append({"label": name, "position": [-lps[0], -lps[1], lps[2]]})
            markups = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                                  "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                       "markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                                    "controlPoints": points}]}
            (out / "landmarks.mrk.json").write_text(json.dumps(markups))
            outputs["landmarks"] = str(out / "landmarks.mrk.json")
            if self.uncertainty is not None:
                doubt = sitk.GetImageFromArray(np.where(labels > 0, self.uncertainty, 0).astype(np.uint8))
                doubt.CopyInformation(image)
                sitk.WriteImage(doubt, str(out / "uncertainty.nrrd"))
                outputs["uncertainty"] = str(out / "uncertainty.nrrd")
            if self.suggest is not None:  # as the real worker: output key "suggestions"
                (out / "suggested_slices.json").write_text(json.dumps(self.suggest))
                outputs["suggestions"] = str(out / "suggested_slices.json")
        return outputs

    def poll(self):
        if self.returncode is None and not self.hang:
            self.polls += 1
            if self.polls > self.pollsBeforeExit:
                self._lines.append(json.dumps({"event": "done", "outputs": self._work()}))
                self.returncode = 0
        return self.returncode

    def readLines(self):
        lines, self._lines = self._lines, []
        return [line + "\n" for line in lines]

    def finishReading(self, timeout):
        pass

    def close(self):
        pass

    def stop(self, graceSeconds, then=None):
        self.stopped = True
        self.returncode = 143
        if then is not None:
            then()

    def waitStopped(self, timeout=None):
        return True


def factory(runs, **options):
    """A processFactory for the Logic that records every FakeWorker in runs."""
    return lambda command, cwd, env, stderrPath: FakeWorker(command, cwd, env, stderrPath, runs, **options)
