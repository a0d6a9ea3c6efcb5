"""The job file contract between a client (the Slicer module's Logic, the CLI) and the worker.

A job is one JSON file. The worker (``python -m FewShotSegmentLib.worker JOB.json``) reads it,
runs it, writes its outputs into ``output_dir`` and prints one JSON object per line on stdout
(the persistent worker, ``python -m FewShotSegmentLib.server``, takes the same job as a dict in a
"run" command and adds the job's "id" to each of these events; see server.py):

    {"event": "progress", "progress": 0.42, "stage": "encode", "message": "slice 47/112"}
    {"event": "done", "outputs": {"labels": ".../labels.nrrd", ...}}
    {"event": "error", "message": "template has no labelled voxels"}
    {"event": "cancelled"}

Exit status: 0 done, 1 error (bad input or crash), 2 bad job file, 143 cancelled (SIGTERM).
Outputs are written to temporary names and renamed at the end, so a cancelled or failed job never
leaves a half-written result under a final name.

Job keys:
    task:        "run" (train on the template then predict the same image), "train", "predict"
    image:       path of the volume (.nrrd, .nii.gz, .mha, or a DICOM folder)      [run, train, predict]
    template:    path of a label map with the same geometry as image; non-zero voxels on one or a
                 few slices are the painted templates, each value one label           [run, train]
                 [predict: optional, the painting of image the adapter was trained on: it anchors
                 the clean-up as in run (a re-propagation reusing the run's adapter)]
    labels:      optional {"<value>": {"name": str, "color": [r, g, b] in 0..1}}
    more_templates: optional [{"image": path, "template": path, "labels": {...}}]: painted slices
                 of other volumes that train the same adapter; labels are matched by segment name
                 (every template must paint the same names), each volume weighs the same [run, train]
    model:       path of a saved adapter (.pt) to apply                                [predict]
    output_dir:  folder for the outputs; created if missing
    config:      PipelineConfig fields (see FewShotSegmentLib.config), all optional

Outputs (keys of "outputs", each a path inside output_dir, present when produced):
    labels:        label map (.nrrd), geometry of image, values as in the template
    segmentation:  .seg.nrrd, one segment per label with its name and colour
    landmarks:     Slicer markups .mrk.json, one control point per found label
    model:         the trained adapter (.pt)                                     [run, train]
    summary:       summary.json: per-label voxel counts, landmark positions (and "method": "region",
                   or "matched" for a label painted as a landmark, on another volume), timings, refinement
                   decisions, labels not found, suggested slices
    uncertainty:   uncertainty.nrrd, 0..255 per voxel on the image grid (0 on painted slices)
    suggestions:   suggested_slices.json: {"axis", "slices": [{"index", "position_lps", "score",
                   "labels"}]}, the slices worth painting next, best first
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

TASKS = ("run", "train", "predict")

OUTPUT_NAMES = {
    "labels": "labels.nrrd",
    "segmentation": "segmentation.seg.nrrd",
    "landmarks": "landmarks.mrk.json",
    "model": "adapter.pt",
    "summary": "summary.json",
    "uncertainty": "uncertainty.nrrd",
    "suggestions": "suggested_slices.json",
}


def read_job(path) -> dict:
    """Read and validate a job file; raise InputError with a clear message when it is not usable."""
    path = Path(path)
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"job file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"job file {path} is not readable JSON: {exc}") from None
    return validate_job(job, f"job file {path}")


def validate_job(job, source: str = "job") -> dict:
    """Check a job dict (from a file, or a server's "run" command); returns it unchanged."""
    if not isinstance(job, dict):
        raise InputError(f"{source} must hold a JSON object")
    task = job.get("task")
    if task not in TASKS:
        raise InputError(f"job 'task' must be one of {TASKS}, got {task!r}")
    required = {"run": ("image", "template"), "train": ("image", "template"), "predict": ("image", "model")}[task]
    for key in required + ("output_dir",):
        if not job.get(key):
            raise InputError(f"job for task {task!r} needs {key!r}")
    more = job.get("more_templates") or []
    if not isinstance(more, list) or not all(isinstance(e, dict) and e.get("image") and e.get("template")
                                             for e in more):
        raise InputError("job 'more_templates' must be a list of {\"image\": path, \"template\": path}")
    if more and task == "predict":
        raise InputError("job 'more_templates' belongs to a run or train job, not predict")
    if not isinstance(job.get("config", {}), dict):
        raise InputError("job 'config' must be an object")
    return job


def write_job(path, job: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(job, indent=2))
    return path
