"""The background worker as the Slicer module runs it: a real subprocess, JSON lines, cancel."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from FewShotSegmentLib.job import write_job

REPO = Path(__file__).resolve().parents[1]


def start_worker(job_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "FewShotSegmentLib.worker", str(job_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def events(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_bad_job_file_exits_2_with_a_message(tmp_path):
    job = tmp_path / "job.json"
    job.write_text('{"task": "explode"}')
    proc = start_worker(job)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert events(out)[-1]["event"] == "error" and "task" in events(out)[-1]["message"]


def test_empty_template_is_an_error_and_writes_nothing(tmp_path, shared_data):
    image = shared_data / "chaos_mri" / "image_3.nii.gz"
    reference = sitk.ReadImage(str(shared_data / "chaos_mri" / "label_3.nii.gz"))
    empty = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(reference)
    sitk.WriteImage(empty, str(tmp_path / "empty.nrrd"))
    job = write_job(tmp_path / "job.json", {"task": "run", "image": str(image), "template": str(tmp_path / "empty.nrrd"),
                                            "output_dir": str(tmp_path / "out")})
    proc = start_worker(job)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "no labelled voxels" in events(out)[-1]["message"]
    assert not (tmp_path / "out").exists()


def test_sigterm_cancels_during_encoding_and_leaves_no_output(tmp_path, shared_data):
    image = sitk.ReadImage(str(shared_data / "chaos_mri" / "image_5.nii.gz"))
    labels = sitk.ReadImage(str(shared_data / "chaos_mri" / "label_5.nii.gz"))
    template = sitk.GetArrayFromImage(labels)
    keep = template.shape[0] // 2
    template[np.arange(template.shape[0]) != keep] = 0
    template_img = sitk.GetImageFromArray(template)
    template_img.CopyInformation(labels)
    sitk.WriteImage(template_img, str(tmp_path / "template.nrrd"))
    out_dir = tmp_path / "out"
    job = write_job(tmp_path / "job.json", {"task": "run", "image": str(shared_data / "chaos_mri" / "image_5.nii.gz"),
                                            "template": str(tmp_path / "template.nrrd"),
                                            "output_dir": str(out_dir), "config": {"cache_dir": ""}})
    proc = start_worker(job)
    seen = []
    for line in proc.stdout:                       # wait until it is really encoding
        seen.append(json.loads(line))
        if seen[-1].get("stage") == "encode":
            break
    assert seen[0]["event"] == "started"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert events(rest)[-1]["event"] == "cancelled"
    assert time.monotonic() - started < 30        # stops at the next slice, not after the job
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert image.GetSize()[2] > 1  # the job was a real multi-slice volume
