"""Trained adapters on disk: the .pt file the worker writes plus a ``.labels.json`` side file with
the segment names, colours and terminology, so an adapter applied to another patient gives segments
named like the painted ones."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import slicer

from .Jobs import LabelInfo

# Settings that change what an adapter learns: a trained adapter is reused only when these and the
# painting are unchanged. (Refinement, landmarks, device and the like apply at prediction time.)
TRAINING_SETTINGS = ("backbone", "checkpoint", "adapter", "axis", "epochs", "modality", "ct_window")


def userCacheDir() -> Path:
    """Per-user cache of FewShotSegment (features, trained adapters)."""
    app = getattr(slicer, "app", None)
    if app is not None and getattr(app, "cachePath", ""):
        return Path(app.cachePath) / "FewShotSegment"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "FewShotSegment"


def defaultAdapterPath(volumeNode=None) -> str:
    stem = "adapter"
    if volumeNode is not None and volumeNode.GetName():
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeNode.GetName())
    return str(userCacheDir() / "adapters" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.pt")


def trainingFingerprint(templateHash: str, config: dict, task: str) -> str:
    """The painting's fingerprint combined with the settings that shape training and the task that
    trained it: a "train" adapter is made for other patients (it sees body position) and a "run"
    adapter for the painted volume, so one never stands in for the other."""
    import hashlib

    settings = json.dumps({"task": task, **{name: str(config.get(name, "")) for name in TRAINING_SETTINGS}},
                          sort_keys=True)
    return hashlib.sha256((templateHash + settings).encode()).hexdigest()


def adapterLabelsPath(modelPath) -> Path:
    return Path(str(modelPath) + ".labels.json")


def saveAdapter(sourcePath, targetPath, labels=None) -> str:
    """Copy a trained adapter (and its labels side file, or write one from labels)."""
    sourcePath, targetPath = Path(sourcePath), Path(targetPath)
    targetPath.parent.mkdir(parents=True, exist_ok=True)
    same = sourcePath.resolve() == targetPath.resolve()
    if not same:
        shutil.copyfile(sourcePath, targetPath)
    if labels:
        adapterLabelsPath(targetPath).write_text(
            json.dumps({str(label.value): label.toJson() for label in labels}, indent=2))
    elif adapterLabelsPath(sourcePath).is_file() and not same:
        shutil.copyfile(adapterLabelsPath(sourcePath), adapterLabelsPath(targetPath))
    return str(targetPath)


def readAdapterLabels(modelPath) -> list:
    path = adapterLabelsPath(modelPath)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [LabelInfo.fromJson(value, info) for value, info in sorted(data.items(), key=lambda kv: int(kv[0]))]
    except (ValueError, TypeError, AttributeError):
        logging.warning(f"FewShotSegment: ignoring unreadable {path}")
        return []
