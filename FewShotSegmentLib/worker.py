"""Background worker: ``python -m FewShotSegmentLib.worker JOB.json``.

Runs one job (see job.py for the file format), prints one JSON object per line on stdout and
stops cleanly on SIGTERM: the running step notices the cancel flag at the next slice, nothing is
written under a final output name, and the exit status is 143. The Slicer module and the CLI both
run jobs through ``execute``. The persistent worker (``python -m FewShotSegmentLib.server``, see
server.py) runs many jobs in one process through ``execute`` with a session.Session, so a second job
on the same volume reuses the loaded models and the encoded features.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from . import io, pipeline
from .config import PipelineConfig
from .errors import Cancelled, FewShotError, InputError
from .job import OUTPUT_NAMES, read_job

EXIT_OK, EXIT_ERROR, EXIT_BAD_JOB, EXIT_CANCELLED = 0, 1, 2, 143


def execute(job: dict, progress: pipeline.Progress = pipeline._noop,
            cancel: Callable[[], bool] | None = None, session=None) -> dict:
    """Run a validated job; return {output key: path}. Outputs appear only when all succeeded.
    ``session`` (session.Session): backbones and encoded volumes kept between jobs; the summary
    then says what was reused."""
    cancel = cancel or (lambda: False)
    hits = dict(session.hits) if session is not None else None
    config = PipelineConfig.from_dict(job.get("config"))
    out_dir = Path(job["output_dir"])
    task = job["task"]
    wanted = ["labels", "segmentation", "summary", "uncertainty", "suggestions"] + \
        (["landmarks"] if config.landmarks else [])
    if task in ("run", "train"):
        wanted.append("model")
    if task == "train":
        wanted = ["model", "summary"]
    targets = {key: out_dir / OUTPUT_NAMES[key] for key in wanted}
    if not job.get("overwrite"):
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise InputError(f"outputs exist already (set overwrite to replace them): {existing}")

    progress(0.0, "read", "reading inputs")
    image = io.read_image(job["image"])
    _check(cancel, "reading the image")
    labels = {int(k): v for k, v in (job.get("labels") or {}).items()} or None
    if task in ("run", "train"):
        template, labels = _read_template(job["template"], image, labels)
        _check(cancel, "reading the template")
        more = []
        for entry in job.get("more_templates") or []:
            other = io.read_image(entry["image"])
            other_labels = {int(k): v for k, v in (entry.get("labels") or {}).items()} or labels
            other_template, other_labels = _read_template(entry["template"], other, other_labels)
            more.append((other, other_template, other_labels))
            _check(cancel, "reading the templates")
        if task == "train":
            model, _ = pipeline.fit(image, template, config, labels, progress, cancel, session, more,
                                    for_other_volumes=True)
            prediction = None
        else:
            model, prediction = pipeline.run(image, template, config, labels, progress, cancel, session=session,
                                             more=more)
    else:
        model = pipeline.TrainedModel.load(job["model"])
        _check(cancel, "reading the adapter")
        # the painting the adapter was trained on, when it is reused on the painted volume
        template = io.read_labelmap(job["template"], reference=image) if job.get("template") else None
        prediction = pipeline.predict(model, image, progress, cancel, overrides=job.get("config"), session=session,
                                      template=template)

    _check(cancel, "writing outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        staged = {key: staging / path.name for key, path in targets.items()}
        summary = {"task": task, "labels": {str(v): s for v, s in model.labels.items()},
                   "config": model.config.to_dict()}
        if "model" in staged:
            model.save(staged["model"])
        if prediction is not None:
            io.write_image(prediction.labels, staged["labels"])
            io.write_seg_nrrd(prediction.labels, staged["segmentation"], model.labels)
            if "landmarks" in staged:
                io.write_markups_json([{"label": p["label"], "position": p["position"],
                                        "description": f"label value {p['label_value']}"}
                                       for p in prediction.landmarks], staged["landmarks"])
            io.write_image(prediction.uncertainty, staged["uncertainty"])
            staged["suggestions"].write_text(json.dumps(
                {"axis": prediction.summary["axis"], "slices": prediction.suggestions}, indent=2))
            summary.update(prediction.summary)
        if session is not None:
            summary["reused"] = reused_since(hits, session)
        staged["summary"].write_text(json.dumps(summary, indent=2))
        for key, path in staged.items():
            path.replace(targets[key])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: str(path) for key, path in targets.items()}


def _check(cancel, stage: str) -> None:
    if cancel():
        raise Cancelled(f"cancelled before {stage}")


def reused_since(hits: dict, session) -> dict:
    """Whether the backbone and the encoded volume of the job that started at ``hits`` (a copy of
    session.hits) came from the session's memory."""
    return {"backbone": session.hits["backbone"] > hits["backbone"],
            "features": session.hits["volume"] > hits["volume"]}


def _read_template(path, image, labels):
    """Template label map on the image grid; a .seg.nrrd brings its segment names and colours."""
    if str(path).lower().endswith(".seg.nrrd"):
        template_img, seg_labels = io.read_seg_nrrd(path)
        template = io.read_labelmap(path, reference=image)
        if not labels:
            labels = {v: {key: s[key] for key in ("name", "color", "terminology") if s.get(key)}
                      for v, s in seg_labels.items()}
        return template, labels
    return io.read_labelmap(path, reference=image), labels


class _JsonLines:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.last = 0.0

    def emit(self, **event):
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()

    def progress(self, fraction, stage, message):
        now = time.monotonic()
        if now - self.last >= 0.2 or fraction >= 1.0 or stage != getattr(self, "stage", None):
            self.last, self.stage = now, stage
            self.emit(event="progress", progress=round(float(fraction), 4), stage=stage, message=message)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = _JsonLines()
    if len(argv) != 1:
        out.emit(event="error", message="usage: python -m FewShotSegmentLib.worker JOB.json")
        return EXIT_BAD_JOB
    cancelled = {"flag": False}

    def on_sigterm(signum, frame):
        cancelled["flag"] = True

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        job = read_job(argv[0])
    except FewShotError as exc:
        out.emit(event="error", message=str(exc))
        return EXIT_BAD_JOB
    out.emit(event="started", task=job["task"], pid=__import__("os").getpid())
    try:
        outputs = execute(job, out.progress, lambda: cancelled["flag"])
    except Cancelled:
        out.emit(event="cancelled")
        return EXIT_CANCELLED
    except (FewShotError, FileExistsError) as exc:
        out.emit(event="error", message=str(exc))
        return EXIT_ERROR
    except Exception as exc:  # a bug: report it with its traceback rather than dying silently
        out.emit(event="error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return EXIT_ERROR
    out.emit(event="done", outputs=outputs)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
