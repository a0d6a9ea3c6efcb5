"""What a long-lived process keeps between jobs: built backbones (models loaded, and compiled
where that applies) and the most recently encoded volumes, so a second propagation on the same
volume pays neither model loading nor encoding nor feature-cache reading.

The CLI runs one job and needs none of this; the persistent worker (server.py) keeps one Session.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import SimpleITK as sitk

from . import pipeline
from .backbones import Backbone
from .config import PipelineConfig

# Settings that decide which backbone a config builds (everything else is free to change).
BACKBONE_FIELDS = ("backbone", "backbone_name", "checkpoint", "feature_layer", "device", "precision", "compile")
# Settings that decide how a volume is normalized and sliced before encoding.
VOLUME_FIELDS = ("axis", "modality", "ct_window", "encode_step")


def image_fingerprint(image: sitk.Image) -> str:
    """A hash of an image's voxels and geometry: the same scan read twice gives the same key."""
    digest = hashlib.sha1()
    for part in (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                 image.GetPixelIDTypeAsString()):
        digest.update(repr(part).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


class Session:
    def __init__(self, max_volumes: int = 1):
        self.max_volumes = max_volumes
        self._backbones: dict[tuple, Backbone] = {}
        self._volumes: OrderedDict[tuple, pipeline.PreparedVolume] = OrderedDict()
        self.hits = {"backbone": 0, "volume": 0}
        self._last_model = (None, None, None, None)   # (prepared volume, settings, painting, model)

    def backbone(self, config: PipelineConfig) -> Backbone:
        settings = config.to_dict()
        key = tuple(settings.get(name) for name in BACKBONE_FIELDS)
        if key in self._backbones:
            self.hits["backbone"] += 1
        else:
            self._backbones[key] = pipeline.build_backbone_for(config)
        return self._backbones[key]

    def prepare(self, image: sitk.Image, config: PipelineConfig, backbone: Backbone, progress=pipeline._noop,
                cancel=None, on_demand: bool = False) -> pipeline.PreparedVolume:
        settings = config.to_dict()
        key = (image_fingerprint(image), backbone.id, getattr(backbone, "cache_tag", "")) + \
            tuple(settings.get(name) for name in VOLUME_FIELDS)
        if key in self._volumes:
            self.hits["volume"] += 1
            self._volumes.move_to_end(key)
            progress(0.55, "encode", "features of this volume from memory")
            prepared = self._volumes[key]
            prepared.seconds = 0.0      # this job spent nothing preparing it: its encode_s is its own
            return prepared
        prepared = pipeline.prepare_volume(image, config, backbone, progress, cancel, on_demand=on_demand)
        self._volumes[key] = prepared
        while len(self._volumes) > self.max_volumes:
            self._volumes.popitem(last=False)
        return prepared

    @staticmethod
    def _training_key(config: PipelineConfig) -> tuple:
        # everything that shapes the adapter except the painting itself
        settings = {k: v for k, v in config.to_dict().items() if k not in pipeline.RUNTIME_FIELDS}
        return tuple(sorted((k, repr(v)) for k, v in settings.items()))

    @staticmethod
    def painting_key(template: sitk.Image) -> str:
        """What identifies a painting (computed once per job: it hashes the whole template)."""
        return image_fingerprint(template)

    def previous_model(self, prepared, config: PipelineConfig, painting: str):
        """The model trained last on this prepared volume with the same settings from another
        painting (``painting_key``), or None: the warm start of a re-propagation after the user
        painted or corrected a slice. The same painting again trains from scratch, so the same
        input gives the same result."""
        volume, key, last_painting, model = self._last_model
        if volume is not prepared or key != self._training_key(config) or last_painting == painting:
            return None
        return model

    def remember_model(self, prepared, model, painting: str) -> None:
        self._last_model = (prepared, self._training_key(model.config), painting, model)

    def clear(self) -> None:
        self._last_model = (None,) * 4
        self._volumes.clear()
