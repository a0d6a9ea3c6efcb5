"""Simulated painting for demos, tests and benchmarks: copy a reference segmentation onto a few
slices, as a user would paint them in the Segment Editor."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import io
from .errors import InputError


def template_slices(reference: np.ndarray, value: int, axis: int, count: int = 1) -> list[int]:
    """``count`` slice indices spread evenly inside the extent of label ``value`` (the middle one
    for count=1), skipping the outermost 10 % where an organ is only a sliver."""
    present = np.nonzero((reference == value).any(axis=tuple(a for a in range(3) if a != axis)))[0]
    if len(present) == 0:
        raise InputError(f"label {value} is not in the reference")
    lo, hi = present[0], present[-1]
    margin = (hi - lo) * 0.1
    picks = np.linspace(lo + margin, hi - margin, count + 2)[1:-1] if count > 1 else [(lo + hi) / 2]
    return sorted({int(round(p)) for p in picks})


def make_template(reference: np.ndarray, values: list[int], axis: int, slices: list[int]) -> np.ndarray:
    template = np.zeros_like(reference)
    for index in slices:
        plane = [slice(None)] * 3
        plane[axis] = index
        source = reference[tuple(plane)]
        target = template[tuple(plane)]
        for value in values:
            target[source == value] = value
    return template


def canonical_axis(image: sitk.Image, axis_name: str) -> int:
    """Array axis (z, y, x order) of ``image`` that is the named anatomical axis, from its direction
    ("stack": the image's own slice axis, array axis 0)."""
    if axis_name == "stack":
        return 0
    direction = np.array(image.GetDirection()).reshape(3, 3)   # columns: index axes i, j, k in LPS
    world = {"axial": 2, "coronal": 1, "sagittal": 0}[axis_name]
    index_axis = int(np.argmax(np.abs(direction[world, :])))   # which of i, j, k runs along it
    return 2 - index_axis


def make_template_file(reference_path, image_path, values, axis_name, count, out, overwrite=False):
    image = io.read_image(image_path)
    reference_img = io.read_labelmap(reference_path, reference=image)
    reference = sitk.GetArrayFromImage(reference_img)
    axis = canonical_axis(image, axis_name)
    slices = template_slices(reference, values[0], axis, count)
    template = sitk.GetImageFromArray(make_template(reference, values, axis, slices))
    template.CopyInformation(reference_img)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return io.write_image(template, out, overwrite)
