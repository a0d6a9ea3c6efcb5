"""Reading and writing volumes, label maps, Slicer segmentations (.seg.nrrd, through slicerio, the
format library maintained by Slicer's developers) and Slicer markups (.mrk.json: plain JSON; slicerio
1.4 converts only .fcsv), with the checks that turn a bad file into a clear InputError instead of a
wrong result.

Everything stays in SimpleITK's LPS physical space; arrays are (z, y, x) as GetArrayFromImage gives.
"""
from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .postprocess import values_present

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
# .mhd keeps its voxels in a separate file that the header names, so it can't be written under a
# temporary name and renamed; the single-file formats can.
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
# What Slicer assigns to a new segment when nobody picked a terminology: generic "Tissue".
DEFAULT_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                       "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list"
                       "~^^~^^")
# Slicer stores a control point's orientation in the file's coordinate system: identity in RAS is
# this matrix in LPS.
LPS_IDENTITY_ORIENTATION = [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------------------------
# reading

def read_image(path) -> sitk.Image:
    """Read a 3D scalar volume (file or DICOM series folder) as float32.

    Raises InputError for a missing path, an unreadable file, a 2D, 4D or multi-component image,
    or NaN/inf voxels. A 3D image with a single slice is accepted.
    """
    path = Path(path)
    if path.is_dir():
        image = _read_dicom_series(path)
    elif path.is_file():
        image = _read_file(path)
    else:
        raise InputError(f"image path does not exist: {path}")
    _check_3d_scalar(image, path)
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them first")
    return image


def read_labelmap(path, reference: sitk.Image | None = None, resample: bool = False) -> sitk.Image:
    """Read an integer label map (any image file, or a Slicer .seg.nrrd) as UInt16.

    With a reference whose geometry differs: a label map on the same voxel grid stored another way
    (axes permuted or flipped, e.g. LAS vs LPS, or a crop of the grid) is moved onto the reference
    by physical position, and it is checked that no labelled voxel was lost. Any other geometry is
    an InputError ("geometry mismatch") unless resample=True, which resamples it (nearest
    neighbour) onto the reference and accepts what that loses.
    """
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        labels, _ = read_seg_nrrd(path)
    else:
        if not path.exists():
            raise InputError(f"label map path does not exist: {path}")
        labels = _read_dicom_series(path) if path.is_dir() else _read_file(path)
        _check_3d_scalar(labels, path)
        labels = _as_label_image(labels, path)
    if reference is None or same_geometry(labels, reference):
        return labels
    if _is_grid_aligned(labels, reference):
        moved = resample_like(labels, reference, nearest=True)
        before = _label_counts(labels)
        after = _label_counts(moved)
        if before == after:
            return moved
        if not resample:
            lost = {v: before[v] - after.get(v, 0) for v in before if before[v] != after.get(v, 0)}
            raise InputError(
                f"geometry mismatch: {path} lies on the reference voxel grid but labelled voxels "
                f"fall outside the reference (voxels lost per label: {lost});\n"
                f"  label map: {describe_geometry(labels)}\n  reference: {describe_geometry(reference)}")
        return moved
    if resample:
        return resample_like(labels, reference, nearest=True)
    raise InputError(
        f"geometry mismatch: {path} does not match the reference image "
        f"(pass resample=True to resample it, nearest neighbour);\n"
        f"  label map: {describe_geometry(labels)}\n  reference: {describe_geometry(reference)}")


def describe_geometry(image: sitk.Image) -> str:
    return (f"size {image.GetSize()}, spacing {_rounded(image.GetSpacing())}, "
            f"origin {_rounded(image.GetOrigin())}, direction {_rounded(image.GetDirection())}")


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True if a and b have the same voxel grid. tol is relative: a fraction of the spacing for
    spacing and origin, an absolute difference for the direction cosines."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    spacing_a, spacing_b = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if np.any(np.abs(spacing_a - spacing_b) > tol * spacing_a):
        return False
    if np.any(np.abs(np.array(a.GetDirection()) - np.array(b.GetDirection())) > tol):
        return False
    origin_gap = np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin()))
    return bool(np.all(origin_gap <= tol * spacing_a.min()))


def resample_like(image: sitk.Image, reference: sitk.Image, nearest: bool) -> sitk.Image:
    """Resample image onto reference's grid by physical position (0 outside the image)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def _read_file(path: Path) -> sitk.Image:
    name = path.name.lower()
    if not name.endswith(IMAGE_SUFFIXES):
        raise InputError(f"{path}: unsupported file type; use one of {', '.join(IMAGE_SUFFIXES)} "
                         f"or a DICOM series folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {path}: {_first_line(error)}") from None


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    # GDCM sorts the files of a series by image position along the slice normal.
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series in {folder}: {_first_line(error)}") from None


def _check_3d_scalar(image: sitk.Image, path) -> None:
    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() != 3 or components != 1:
        raise InputError(f"{path}: need a 3D single-component volume, found {image.GetDimension()}D "
                         f"size {image.GetSize()} with {components} component(s) per voxel")


def _as_label_image(image: sitk.Image, path) -> sitk.Image:
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError(f"{path}: a label map needs whole-number labels, found fractional or "
                             f"NaN values")
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max):
        raise InputError(f"{path}: labels must be in 0..65535, found {values.min()}..{values.max()}")
    labels = sitk.Cast(image, sitk.sitkUInt16)
    labels.CopyInformation(image)
    return labels


def _label_counts(image: sitk.Image) -> dict[int, int]:
    counts = np.bincount(sitk.GetArrayViewFromImage(image).ravel())
    return {int(v): int(n) for v, n in enumerate(counts) if v and n}


def _is_grid_aligned(image: sitk.Image, reference: sitk.Image, tol: float = 1e-3) -> bool:
    """True if every voxel centre of image is a voxel centre of reference's (infinite) grid:
    the index-to-index map is an axis permutation with flips plus a whole-voxel shift."""
    def index_to_physical(img):
        d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
        return d, np.array(img.GetOrigin())
    linear_i, origin_i = index_to_physical(image)
    linear_r, origin_r = index_to_physical(reference)
    to_reference = np.linalg.solve(linear_r, linear_i)
    shift = np.linalg.solve(linear_r, origin_i - origin_r)
    signed_permutation = np.round(to_reference)
    return bool(np.all(np.abs(to_reference - signed_permutation) < tol)
                and np.all(np.abs(signed_permutation).sum(axis=0) == 1)
                and np.all(np.abs(signed_permutation).sum(axis=1) == 1)
                and np.all(np.abs(shift - np.round(shift)) < tol))


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK puts the useful sentence after the "Exception thrown in ..." location lines
    useful = [line.removeprefix("sitk::ERROR:").strip() for line in lines
              if not line.startswith(("Exception thrown", "/"))]
    return (useful or ["unknown error"])[-1]


def _rounded(values) -> tuple:
    return tuple(round(float(v), 4) for v in values)


# ----------------------------------------------------------------------------------------------
# writing

def write_image(image: sitk.Image, path, overwrite: bool = False) -> Path:
    """Write image (compressed) under a temporary name in the same folder, then rename it, so a
    crash never leaves half a file under the final name. Refuses to replace an existing file
    unless overwrite=True."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(WRITABLE_SUFFIXES):
        raise InputError(f"{path}: can only write {', '.join(WRITABLE_SUFFIXES)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    suffix = next(s for s in (".seg.nrrd",) + WRITABLE_SUFFIXES if name.endswith(s))
    temporary = path.parent / f".{path.name[:-len(suffix)]}.{uuid.uuid4().hex[:8]}.partial{suffix}"
    try:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(temporary))
        writer.UseCompressionOn()
        writer.Execute(image)
        _publish(temporary, path, overwrite)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file its final name in one step."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        # link() fails if the name appeared meanwhile, where replace() would clobber it
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it") from None
    except OSError:
        # file systems without hard links: a plain rename after the existence check
        if path.exists():
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it") from None
        os.replace(temporary, path)


def write_seg_nrrd(label_image: sitk.Image, path, labels: dict[int, dict], overwrite: bool = False) -> Path:
    """Write a 3D Slicer segmentation (.seg.nrrd) with slicerio: one segment per entry of labels
    ({value: {"name": str, "color": (r, g, b) in 0..1, optional "terminology": str}}), all in one
    labelmap layer whose voxel values are the label values. Segments with no voxels are kept.
    Written under a temporary name and renamed, like write_image."""
    import slicerio.segmentation

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"{path}: a Slicer segmentation file name must end with .seg.nrrd")
    _check_3d_scalar(label_image, "label image")
    values = sitk.GetArrayFromImage(label_image)
    if values.dtype.kind not in "iu":
        raise InputError(f"label image must have an integer pixel type, got {values.dtype}")
    described = {int(v): spec for v, spec in labels.items()}
    undescribed = sorted(set(values_present(values).tolist()) - set(described) - {0})
    if undescribed:
        raise InputError(f"label values {undescribed} are in the image but not in labels; "
                         f"give each a name and colour")
    if any(v <= 0 for v in described):
        raise InputError(f"label values must be positive, got {sorted(described)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    stored_type = np.uint8 if max(described, default=0) <= 255 else np.uint16
    size_x, size_y, size_z = label_image.GetSize()
    segments = []
    for value in sorted(described):
        name, color = _segment_name_and_color(value, described[value])
        terminology = described[value].get("terminology") or DEFAULT_TERMINOLOGY
        try:
            terminology_entry = slicerio.segmentation.terminology_entry_from_string(terminology)
        except (IndexError, ValueError):
            raise InputError(f"label {value}: terminology {terminology!r} is not a Slicer terminology entry") from None
        # Slicer reads every segment of a layer into ONE shared labelmap whose extent is taken from
        # the first segment listed in that layer, so all segments get the whole extent (as Slicer
        # itself writes); a tight or empty extent on the first segment would crop the others away.
        segments.append({"id": f"Segment_{value}", "name": name, "color": list(color), "labelValue": value,
                         "layer": 0, "extent": [0, size_x - 1, 0, size_y - 1, 0, size_z - 1],
                         "nameAutoGenerated": False, "colorAutoGenerated": False,
                         "terminology": terminology_entry})
    segmentation = {
        # (x, y, z) as a view: pynrrd writes it in Fortran order, which is the (z, y, x) array's own
        # memory, so no transposed copy is made (that copy was a third of the writing time)
        "voxels": values.astype(stored_type, copy=False).T,
        "ijkToLPS": _ijk_to_lps(label_image).tolist(),
        "encoding": "gzip",
        "masterRepresentation": "Binary labelmap",
        "containedRepresentationNames": ["Binary labelmap"],
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    temporary = path.parent / f".{path.name[:-len('.seg.nrrd')]}.{uuid.uuid4().hex[:8]}.partial.seg.nrrd"
    try:
        # zlib's default level: 2.5x faster than slicerio's 9 on a 512x512x300 label map, 1.3x larger
        slicerio.write_segmentation(str(temporary), segmentation, compression_level=6)
        _publish(temporary, path, overwrite)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _ijk_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _segment_name_and_color(value: int, spec: dict) -> tuple[str, tuple[float, float, float]]:
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"label {value}: needs a non-empty 'name'")
    if "|" in name or "\n" in name:
        raise InputError(f"label {value}: name {name!r} may not contain '|' or a line break")
    color = tuple(float(c) for c in spec.get("color", ()))
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise InputError(f"label {value}: 'color' must be 3 floats in 0..1, got {spec.get('color')!r}")
    return name, color


def read_seg_nrrd(path) -> tuple[sitk.Image, dict[int, dict]]:
    """Read a 3D Slicer .seg.nrrd (with slicerio) into (UInt16 label map, {value: {"name", "color",
    "id", "terminology"?}}).

    Single-layer files keep Slicer's label values. Multi-layer files (Slicer's 4D form, used when
    segments overlap) are merged into one map: label values are kept when they are unique across
    layers, else segments are renumbered 1..N in file order; where segments overlap, the later one
    wins and a warning says how many voxels that affected.
    """
    import slicerio.segmentation

    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation file does not exist: {path}")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # pynrrd and slicerio raise several types for a bad file
        raise InputError(f"cannot read {path}: {_first_line(error)}") from None
    if not segmentation.get("segments"):
        raise InputError(f"{path} has no Segment0_ID field: not a Slicer segmentation file")
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    if voxels.ndim != 4:
        raise InputError(f"{path}: expected a 3D segmentation, found {voxels.ndim - 1}D")
    layers = voxels.transpose(0, 3, 2, 1)  # (layer, z, y, x)
    n_layers = layers.shape[0]
    offset = [int(v) for v in segmentation.get("referenceImageExtentOffset", [0, 0, 0])]

    found = []
    for index, segment in enumerate(segmentation["segments"]):
        # Slicer's defaults when a field is missing: layer = segment index, label value 1
        layer = int(segment.get("layer", index))
        if not 0 <= layer < n_layers:
            raise InputError(f"{path}: segment {index} is in layer {layer} but the file has {n_layers}")
        label_value = int(segment.get("labelValue", 1))
        mask = layers[layer] == label_value
        if segment.get("extent"):
            mask &= _extent_mask(mask.shape, [int(v) for v in segment["extent"]], offset)
        info = {"name": segment.get("name", segment.get("id", f"Segment_{index}")),
                "color": tuple(float(c) for c in segment.get("color", (0.0, 0.0, 0.0))),
                "id": segment.get("id", f"Segment_{index}")}
        if segment.get("terminology"):
            info["terminology"] = slicerio.segmentation.terminology_entry_to_string(segment["terminology"])
        found.append((label_value, mask, info))

    label_values = [value for value, _, _ in found]
    if n_layers == 1 or len(set(label_values)) == len(label_values):
        new_values = label_values
    else:
        new_values = list(range(1, len(found) + 1))
    merged = np.zeros(layers.shape[1:], np.uint16)
    overlap = 0
    labels = {}
    for new_value, (_, mask, info) in zip(new_values, found):
        overlap += int(np.count_nonzero(mask & (merged != 0)))
        merged[mask] = new_value
        labels[new_value] = info
    if overlap:
        warnings.warn(f"{path}: overlapping segments; {overlap} voxels kept only the later segment",
                      stacklevel=2)
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    result = sitk.GetImageFromArray(merged)
    result.SetOrigin(tuple(ijk_to_lps[:3, 3]))
    result.SetSpacing(tuple(spacing))
    result.SetDirection(tuple((ijk_to_lps[:3, :3] / spacing).ravel()))
    return result, labels


def _extent_mask(shape_zyx, extent, offset) -> np.ndarray:
    """Voxels inside a Slicer segment extent (x0 x1 y0 y1 z0 z1 in reference-image indices)."""
    inside = np.zeros(shape_zyx, bool)
    x0, x1, y0, y1, z0, z1 = (e - offset[i // 2] for i, e in enumerate(extent))
    if x0 <= x1 and y0 <= y1 and z0 <= z1:
        inside[max(z0, 0):z1 + 1, max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return inside


# ----------------------------------------------------------------------------------------------
# markups

def write_markups_json(points, path, name: str = "FewShotLandmarks", overwrite: bool = False) -> Path:
    """Write points ([{"label": str, "position": LPS mm (3 floats), "description"?: str}]) as a
    Slicer fiducial markups file (.mrk.json, LPS coordinates), atomically like write_image."""
    path = Path(path)
    if not path.name.lower().endswith(".json"):
        raise InputError(f"{path}: a Slicer markups file name should end with .mrk.json")
    control_points = []
    for number, point in enumerate(points, start=1):
        label = point.get("label")
        position = [float(v) for v in point.get("position", ())]
        if not isinstance(label, str) or len(position) != 3 or not all(map(math.isfinite, position)):
            raise InputError(f"point {number}: needs a 'label' string and 3 finite 'position' values, "
                             f"got {point!r}")
        control_points.append({
            "id": str(number), "label": label, "description": str(point.get("description", "")),
            "associatedNodeID": "", "position": position,
            "orientation": LPS_IDENTITY_ORIENTATION, "selected": True, "locked": False,
            "visibility": True, "positionStatus": "defined"})
    document = {"@schema": MARKUPS_SCHEMA, "markups": [{
        "type": "Fiducial", "name": name, "coordinateSystem": "LPS", "coordinateUnits": "mm",
        "locked": False, "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(control_points), "controlPoints": control_points,
        "measurements": []}]}
    return _write_text_atomically(json.dumps(document, indent=4), path, overwrite)


def read_markups_json(path) -> list[dict]:
    """Read the control points of a Slicer markups file as [{"label", "position" (LPS mm),
    "description"}]; RAS files are converted to LPS."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"markups file does not exist: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        markups = document["markups"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} is not a Slicer markups JSON file: {error}") from None
    points = []
    for markup in markups:
        ras = markup.get("coordinateSystem", "LPS") == "RAS"
        for point in markup.get("controlPoints", []):
            if point.get("positionStatus", "defined") != "defined" or "position" not in point:
                continue
            x, y, z = (float(v) for v in point["position"])
            points.append({"label": point.get("label", ""),
                           "position": (-x, -y, z) if ras else (x, y, z),
                           "description": point.get("description", "")})
    return points


def _write_text_atomically(text: str, path: Path, overwrite: bool) -> Path:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        temporary.write_text(text, encoding="utf-8")
        _publish(temporary, path, overwrite)
    finally:
        temporary.unlink(missing_ok=True)
    return path
