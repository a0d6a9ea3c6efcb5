"""Simulated painting for demos, tests and benchmarks: copy a reference segmentation onto a few
slices, as a user would paint them in the Segment Editor."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

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


def make_template_file(reference_path, image_path, values, axis_name, count, out, overwrite=False,
                       protocol=False):
    """``protocol``: the standard few-shot support slices of every label (protocol_slices), each
    painted with every label of ``values`` on it; else ``count`` slices spread over the first label."""
    image = io.read_image(image_path)
    reference_img = io.read_labelmap(reference_path, reference=image)
    reference = sitk.GetArrayFromImage(reference_img)
    axis = canonical_axis(image, axis_name)
    if protocol:
        slices = sorted({s for v in values for s in protocol_slices(reference, v, axis)})
    else:
        slices = template_slices(reference, values[0], axis, count)
    template = sitk.GetImageFromArray(make_template(reference, values, axis, slices))
    template.CopyInformation(reference_img)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return io.write_image(template, out, overwrite)


def under_paint(template: np.ndarray, axis: int, slices: list[int], keep: float = 0.8) -> np.ndarray:
    """A hurried painting: on each painted slice, only the ``keep`` fraction of each label's
    cross-section that lies deepest inside it (a distance-transform threshold, i.e. the reference
    eroded until that fraction is left)."""
    out = template.copy()
    for index in slices:
        plane = np.take(out, index, axis=axis)            # a copy; written back below
        for value in np.unique(plane[plane > 0]):
            mask = plane == value
            depth = ndimage.distance_transform_edt(mask)
            plane[mask & (depth <= np.quantile(depth[mask], 1.0 - keep))] = 0
        _put(out, axis, index, plane)
    return out


def split_rim(reference: np.ndarray, value: int, rim_value: int, axis: int, width_px: float = 4.0) -> np.ndarray:
    """A nested pair of labels made from one organ: its pixels within ``width_px`` of its border on
    each slice along ``axis`` become ``rim_value`` (a ring, like a wall around a lumen or a
    myocardium around a blood pool), the rest keeps ``value`` (the core)."""
    out = reference.copy()
    organ = reference == value
    for index in np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != axis))):
        mask = np.take(organ, index, axis=axis)
        plane = np.take(out, index, axis=axis)
        plane[mask & (ndimage.distance_transform_edt(mask) <= width_px)] = rim_value
        _put(out, axis, index, plane)
    return out


def oblique_copy(image: sitk.Image, degrees: float = 60.0) -> sitk.Image:
    """The same voxels with direction cosines rotated about the left-right axis: an oblique stack
    (as cardiac short-axis, knee or shoulder MRI are acquired)."""
    angle = np.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    out = sitk.Image(image)
    out.SetDirection(tuple((rotation @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return out


def _put(volume: np.ndarray, axis: int, index: int, plane: np.ndarray) -> None:
    where = [slice(None)] * 3
    where[axis] = index
    volume[tuple(where)] = plane


def protocol_slices(reference: np.ndarray, value: int, axis: int) -> list[int]:
    """The standard CHAOS few-shot support slices of one organ (SSL-ALPNet, Ouyang et al. 2020):
    of the slices containing it, those at 1/6, 1/2 and 5/6 of the list (the centre of each third)."""
    present = np.nonzero((reference == value).any(axis=tuple(a for a in range(3) if a != axis)))[0]
    if len(present) == 0:
        raise InputError(f"label {value} is not in the reference")
    return sorted({int(present[min(len(present) - 1, int(len(present) * f))]) for f in (1 / 6, 1 / 2, 5 / 6)})


def disc_template(reference: np.ndarray, values: list[int], axis: int, radius_px: float = 5.0) -> tuple[np.ndarray, dict]:
    """A small disc of each label at its reference point: the centroid of the label on its middle
    slice (moved to the nearest label pixel when the centroid falls outside it), as a user marks a
    landmark with a few strokes. Returns the template and {value: (z, y, x) disc centre}."""
    template = np.zeros_like(reference)
    centres = {}
    for value in values:
        mask = reference == value
        index = template_slices(reference, value, axis, 1)[0]
        plane = np.take(mask, index, axis=axis)
        rows, cols = np.nonzero(plane)
        r, c = rows.mean(), cols.mean()
        nearest = int(np.argmin((rows - r) ** 2 + (cols - c) ** 2))
        r, c = rows[nearest], cols[nearest]
        yy, xx = np.ogrid[:plane.shape[0], :plane.shape[1]]
        disc = (yy - r) ** 2 + (xx - c) ** 2 <= radius_px ** 2
        target = np.take(template, index, axis=axis)
        target[disc] = value
        _put(template, axis, index, target)
        centre = [float(r), float(c)]
        centre.insert(axis, float(index))
        centres[value] = tuple(centre)
    return template, centres
