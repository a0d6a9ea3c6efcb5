"""io: volumes, label maps, Slicer .seg.nrrd and .mrk.json, checked against real data and against
3D Slicer's own storage code (slicer-core)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import io
from FewShotSegmentLib.errors import InputError

CHAOS_NAMES = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
CHAOS_COLORS = {1: (0.866667, 0.509804, 0.396078), 2: (0.72, 0.2, 0.13), 3: (0.5, 0.25, 1.0),
                4: (0.615686, 0.423529, 0.635294)}


# ---------------------------------------------------------------------------------------------
# a real Slicer scene (slicer-core), set up in the order that registers the segmentation converters

@pytest.fixture(scope="module")
def slicer_scene():
    import slicer
    import vtk
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    logics = {}
    for name, logic_class in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                              ("Volumes", slicer.vtkSlicerVolumesLogic),
                              ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                              ("Markups", slicer.vtkSlicerMarkupsLogic)):
        logic = logic_class()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    # the logics hold only weak references to the application logic: keep it alive with them
    logics["Application"] = app
    return slicer, scene, logics


def _ijk_to_ras(image):
    """vtkMatrix4x4 IJK->RAS of a SimpleITK (LPS) image: flip the first two rows."""
    import vtk
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix = vtk.vtkMatrix4x4()
    flip = np.array([-1.0, -1.0, 1.0])
    for row in range(3):
        for col in range(3):
            matrix.SetElement(row, col, flip[row] * direction[row, col])
        matrix.SetElement(row, 3, flip[row] * image.GetOrigin()[row])
    return matrix


def _slicer_segment_masks(slicer, scene, logics, segmentation_node, reference_volume):
    """{segment id: (name, color, label value, boolean (z,y,x) mask on reference_volume's grid)}
    using Slicer's own export of each segment."""
    import vtk
    segmentation = segmentation_node.GetSegmentation()
    result = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert logics["Segmentations"].ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, reference_volume)
        mask = slicer.util.arrayFromVolume(labelmap_node) > 0
        result[segment_id] = (segment.GetName(), tuple(segment.GetColor()), segment.GetLabelValue(),
                              mask.copy())
        scene.RemoveNode(labelmap_node)
    return result


def _chaos(shared_data, n=1):
    image = io.read_image(shared_data / "chaos_mri" / f"image_{n}.nii.gz")
    labels = io.read_labelmap(shared_data / "chaos_mri" / f"label_{n}.nii.gz", image)
    return image, labels


# ---------------------------------------------------------------------------------------------
# read_image

def test_read_image_nifti_ct_is_float32_with_geometry(shared_data):
    path = shared_data / "totalseg_ct" / "example_ct.nii.gz"
    image = io.read_image(path)
    raw = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == (122, 101, 112)
    assert io.same_geometry(image, raw, tol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(raw))


def test_read_image_dicom_series_sorted_by_position(shared_data):
    folder = shared_data / "totalseg_ct" / "example_ct_dicom"
    image = io.read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == pytest.approx((0.9765625, 0.9765625, 2.0))
    # each slice must be the file whose ImagePositionPatient is that slice's position
    files = sorted(folder.iterdir())
    positions = {}
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        z = float(reader.GetMetaData("0020|0032").split("\\")[2])
        positions[z] = f
    values = sitk.GetArrayViewFromImage(image)
    for k in (0, 7, 19):
        z = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        single = sitk.GetArrayFromImage(sitk.ReadImage(str(positions[z])))[0]
        np.testing.assert_array_equal(values[k], single)
    assert values.min() >= -1100 and values.max() > 1000  # rescaled to Hounsfield units


def test_read_image_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        io.read_image(tmp_path / "nothing.nii.gz")

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a nifti file" * 10)
    with pytest.raises(InputError, match="cannot read"):
        io.read_image(corrupt)

    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image([8, 9], sitk.sitkInt16), str(flat))
    with pytest.raises(InputError, match=r"2D size \(8, 9\)"):
        io.read_image(flat)

    volume = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    four_d = tmp_path / "series.nrrd"
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(four_d))
    with pytest.raises(InputError, match=r"4D size \(4, 5, 6, 2\)"):
        io.read_image(four_d)

    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(rgb))
    with pytest.raises(InputError, match="3 component"):
        io.read_image(rgb)

    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        io.read_image(empty_folder)


def test_read_image_counts_nan_and_inf(tmp_path):
    values = np.zeros((3, 4, 5), np.float32)
    values[0, 0, 0] = np.nan
    values[1, 2, 3] = np.inf
    values[2, 3, 4] = -np.inf
    # .nrrd: ITK's NIfTI reader itself replaces non-finite voxels by 0, so NIfTI can't show this
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(InputError, match="3 voxels are NaN or infinite"):
        io.read_image(path)


def test_read_image_accepts_single_slice_volume(tmp_path):
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(1, 4, 5)), str(path))
    image = io.read_image(path)
    assert image.GetSize() == (5, 4, 1) and image.GetDimension() == 3


# ---------------------------------------------------------------------------------------------
# read_labelmap

def test_read_labelmap_float_labels_become_uint16(shared_data):
    image, labels = _chaos(shared_data, 1)
    assert labels.GetPixelID() == sitk.sitkUInt16
    assert io.same_geometry(labels, image)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1, 2, 3, 4}


def test_read_labelmap_rejects_fractional_labels(tmp_path):
    path = tmp_path / "soft.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 3, 4), 0.5, np.float32)), str(path))
    with pytest.raises(InputError, match="whole-number"):
        io.read_labelmap(path)


def test_las_label_map_is_moved_onto_lps_dicom_by_physical_position(shared_data):
    ct = io.read_image(shared_data / "totalseg_ct" / "example_ct_dicom")
    path = shared_data / "totalseg_ct" / "example_seg_dicom.nii.gz"
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    labels = io.read_labelmap(path, ct)
    assert io.same_geometry(labels, ct)
    moved = sitk.GetArrayFromImage(labels)
    # stored LAS vs LPS: the y axis is flipped, and nothing was lost
    np.testing.assert_array_equal(moved, raw[:, ::-1, :])
    hu = sitk.GetArrayViewFromImage(ct)
    liver = 5
    # contrast-enhanced liver parenchyma is ~60-150 HU; a copy by array index lands elsewhere
    assert 60 < hu[moved == liver].mean() < 150
    assert hu[raw == liver].mean() < 0


def test_geometry_mismatch_names_both_geometries(shared_data):
    other_ct = io.read_image(shared_data / "totalseg_ct" / "example_ct.nii.gz")
    path = shared_data / "totalseg_ct" / "example_seg_dicom.nii.gz"
    with pytest.raises(InputError) as error:
        io.read_labelmap(path, other_ct)
    message = str(error.value)
    assert message.startswith("geometry mismatch")
    assert "size (512, 512, 20)" in message and "size (122, 101, 112)" in message
    assert "spacing" in message and "origin" in message and "direction" in message
    resampled = io.read_labelmap(path, other_ct, resample=True)
    assert io.same_geometry(resampled, other_ct)
    assert resampled.GetPixelID() == sitk.sitkUInt16


def test_cropped_label_map_on_the_same_grid_is_placed_losslessly(shared_data, tmp_path):
    ct = io.read_image(shared_data / "totalseg_ct" / "example_ct.nii.gz")
    full = io.read_labelmap(shared_data / "totalseg_ct" / "example_seg_fast_force_split.nii.gz", ct)
    crop = sitk.RegionOfInterest(full, (60, 50, 40), (30, 20, 25))
    crop_path = tmp_path / "crop.nii.gz"
    sitk.WriteImage(crop, str(crop_path))

    placed = sitk.GetArrayFromImage(io.read_labelmap(crop_path, ct))
    expected = np.zeros_like(placed)
    expected[25:65, 20:70, 30:90] = sitk.GetArrayViewFromImage(full)[25:65, 20:70, 30:90]
    assert expected.any()
    np.testing.assert_array_equal(placed, expected)

    # the other way round, labelled voxels would fall outside the (cropped) reference
    crop_ct = sitk.RegionOfInterest(ct, (60, 50, 40), (30, 20, 25))
    full_path = tmp_path / "full.nii.gz"
    sitk.WriteImage(full, str(full_path))
    with pytest.raises(InputError, match="fall outside the reference"):
        io.read_labelmap(full_path, crop_ct)
    cut = io.read_labelmap(full_path, crop_ct, resample=True)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(cut), sitk.GetArrayViewFromImage(full)[25:65, 20:70, 30:90])


def test_same_geometry_tolerance_and_resample_like(shared_data):
    image, _ = _chaos(shared_data, 2)
    shifted = sitk.Image(image)
    assert io.same_geometry(image, shifted)
    shifted.SetOrigin(tuple(o + 1e-6 for o in image.GetOrigin()))
    assert io.same_geometry(image, shifted)
    shifted.SetOrigin(tuple(o + s / 2 for o, s in zip(image.GetOrigin(), image.GetSpacing())))
    assert not io.same_geometry(image, shifted)
    assert not io.same_geometry(image, sitk.RegionOfInterest(image, (10, 10, 10)))

    # identical grid: resampling changes nothing; half a voxel off with linear: neighbours' mean
    np.testing.assert_allclose(sitk.GetArrayFromImage(io.resample_like(image, image, nearest=False)),
                               sitk.GetArrayViewFromImage(image), atol=1e-9)
    half_x = sitk.Image(image)
    half_x.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((0.5, 0, 0)))
    linear = sitk.GetArrayFromImage(io.resample_like(image, half_x, nearest=False))
    values = sitk.GetArrayViewFromImage(image)
    np.testing.assert_allclose(linear[:, :, :-1], (values[:, :, :-1] + values[:, :, 1:]) / 2, rtol=1e-5, atol=1e-3)
    nearest = sitk.GetArrayFromImage(io.resample_like(image, half_x, nearest=True))
    assert set(np.unique(nearest)) <= set(np.unique(values))


# ---------------------------------------------------------------------------------------------
# write_image

def test_write_image_round_trip_refuses_overwrite_and_compresses(shared_data, tmp_path):
    image, labels = _chaos(shared_data, 3)
    path = tmp_path / "labels.nrrd"
    io.write_image(labels, path)
    back = sitk.ReadImage(str(path))
    assert io.same_geometry(back, labels, tol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))
    assert b"encoding: gzip" in path.read_bytes()[:1000]
    assert path.stat().st_size < sitk.GetArrayViewFromImage(labels).nbytes / 10

    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.write_image(image, path)
    assert path.read_bytes() == before
    io.write_image(image, path, overwrite=True)
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkFloat32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nrrd"]


def test_failed_write_leaves_existing_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.nii.gz"
    io.write_image(sitk.Image([3, 3, 3], sitk.sitkUInt8), path)
    before = path.read_bytes()
    unwritable = sitk.Image([3, 3, 3], sitk.sitkLabelUInt8)  # no file format stores this type
    with pytest.raises(RuntimeError):
        io.write_image(unwritable, path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]


def test_killed_writer_never_leaves_a_half_file_under_the_final_name(tmp_path):
    """Kill a real writer process in the middle of writing: the final name must not exist."""
    final = tmp_path / "big.nii.gz"
    script = textwrap.dedent(f"""
        import numpy as np, SimpleITK as sitk
        from FewShotSegmentLib import io
        noise = np.random.default_rng(0).random((160, 256, 256), dtype=np.float32)  # compresses slowly
        io.write_image(sitk.GetImageFromArray(noise), {str(final)!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".partial.nii.gz") for p in tmp_path.iterdir()):
            assert process.poll() is None, "writer finished or failed before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not final.exists()
    assert any(p.name.endswith(".partial.nii.gz") for p in tmp_path.iterdir())


def test_write_image_rejects_mhd_and_missing_folder(tmp_path):
    image = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    with pytest.raises(InputError, match="can only write"):
        io.write_image(image, tmp_path / "x.mhd")
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        io.write_image(image, tmp_path / "missing" / "x.nii.gz")


# ---------------------------------------------------------------------------------------------
# .seg.nrrd

def _chaos_segment_spec():
    labels = {v: {"name": CHAOS_NAMES[v], "color": CHAOS_COLORS[v]} for v in CHAOS_NAMES}
    labels[9] = {"name": "gallbladder (not painted)", "color": (0.0, 0.6, 0.2)}
    return labels


def test_seg_nrrd_written_here_loads_in_slicer(shared_data, tmp_path, slicer_scene):
    slicer, scene, logics = slicer_scene
    image, labels = _chaos(shared_data, 1)
    path = io.write_seg_nrrd(labels, tmp_path / "chaos1.seg.nrrd", _chaos_segment_spec())
    header = path.read_bytes()[:4000].decode("latin-1")
    for field in ("Segmentation_MasterRepresentation:=Binary labelmap",
                  "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
                  "Segmentation_ReferenceImageExtentOffset:=0 0 0",
                  "Segment4_LabelValue:=9", "Segment4_Tags:=TerminologyEntry:"):
        assert field in header

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=_ijk_to_ras(image))
    segments = _slicer_segment_masks(slicer, scene, logics, node, volume)

    values = sitk.GetArrayViewFromImage(labels)
    assert len(segments) == 5
    for value, spec in _chaos_segment_spec().items():
        name, color, label_value, mask = segments[f"Segment_{value}"]
        assert name == spec["name"]
        assert color == pytest.approx(spec["color"], abs=1e-6)
        assert label_value == value
        assert mask.sum() == (values == value).sum()
        np.testing.assert_array_equal(mask, values == value)  # same voxels, same places
    assert segments["Segment_9"][3].sum() == 0  # the empty segment is kept


def test_seg_nrrd_written_by_slicer_reads_back_here(shared_data, tmp_path, slicer_scene):
    import vtk
    slicer, scene, logics = slicer_scene
    image, labels = _chaos(shared_data, 5)
    values = sitk.GetArrayFromImage(labels)
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=_ijk_to_ras(image))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = node.GetSegmentation()
    for value, name in CHAOS_NAMES.items():
        segmentation.AddEmptySegment(f"organ{value}", name, CHAOS_COLORS[value])
        labelmap_node = logics["Volumes"].CreateAndAddLabelVolume(volume, "tmp")
        slicer.util.updateVolumeFromArray(labelmap_node, (values == value).astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(f"organ{value}")
        assert logics["Segmentations"].ImportLabelmapToSegmentationNode(labelmap_node, node, ids)
        scene.RemoveNode(labelmap_node)
    path = tmp_path / "from_slicer.seg.nrrd"
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1

    _, info = io.read_seg_nrrd(path)
    # read_labelmap of a .seg.nrrd goes through read_seg_nrrd and lands on the image grid
    merged_values = sitk.GetArrayFromImage(io.read_labelmap(path, image))
    assert {v: i["name"] for v, i in info.items()} == {
        segmentation.GetSegment(f"organ{v}").GetLabelValue(): n for v, n in CHAOS_NAMES.items()}
    for value, name in CHAOS_NAMES.items():
        stored_value = next(v for v, i in info.items() if i["name"] == name)
        assert info[stored_value]["id"] == f"organ{value}"
        assert info[stored_value]["color"] == pytest.approx(CHAOS_COLORS[value], abs=1e-5)
        np.testing.assert_array_equal(merged_values == stored_value, values == value)


def test_overlapping_slicer_segments_in_layers_are_merged(shared_data, tmp_path, slicer_scene):
    import vtk
    slicer, scene, logics = slicer_scene
    image, labels = _chaos(shared_data, 8)
    liver = sitk.GetArrayFromImage(labels) == 1
    margin = np.zeros_like(liver)  # a "liver margin" overlapping the liver's right half
    margin[:, :, : liver.shape[2] // 2] = liver[:, :, : liver.shape[2] // 2]
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=_ijk_to_ras(image))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segment_id, mask, color in (("liver", liver, (1, 0, 0)), ("margin", margin, (0, 0, 1))):
        node.GetSegmentation().AddEmptySegment(segment_id, segment_id, color)
        labelmap_node = logics["Volumes"].CreateAndAddLabelVolume(volume, "tmp")
        slicer.util.updateVolumeFromArray(labelmap_node, mask.astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert logics["Segmentations"].ImportLabelmapToSegmentationNode(labelmap_node, node, ids)
        scene.RemoveNode(labelmap_node)
    path = tmp_path / "layers.seg.nrrd"
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    assert b"dimension: 4" in path.read_bytes()[:300]  # Slicer really used its multi-layer form

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged, info = io.read_seg_nrrd(path)
    assert any(f"{int(margin.sum())} voxels" in str(w.message) for w in caught)
    values = sitk.GetArrayViewFromImage(merged)
    by_name = {i["name"]: v for v, i in info.items()}
    assert sorted(by_name) == ["liver", "margin"] and len(set(by_name.values())) == 2
    np.testing.assert_array_equal(values == by_name["margin"], margin)
    np.testing.assert_array_equal(values == by_name["liver"], liver & ~margin)


def test_write_seg_nrrd_refuses_undescribed_labels_and_bad_colours(shared_data, tmp_path):
    _, labels = _chaos(shared_data, 1)
    with pytest.raises(InputError, match=r"\[3, 4\] are in the image but not in labels"):
        io.write_seg_nrrd(labels, tmp_path / "a.seg.nrrd", {1: {"name": "liver", "color": (1, 0, 0)},
                                                             2: {"name": "kidney", "color": (0, 1, 0)}})
    spec = _chaos_segment_spec()
    spec[2] = {"name": "right kidney", "color": (0, 255, 0)}
    with pytest.raises(InputError, match="0..1"):
        io.write_seg_nrrd(labels, tmp_path / "b.seg.nrrd", spec)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# .mrk.json

POINTS = [{"label": "liver", "position": (-95.5, 12.25, -130.0), "description": "region point"},
          {"label": "spleen", "position": (88.0, 40.5, -110.75)}]


def test_markups_written_here_load_in_slicer_as_ras(tmp_path, slicer_scene):
    slicer, scene, logics = slicer_scene
    path = io.write_markups_json(POINTS, tmp_path / "landmarks.mrk.json")
    document = json.loads(path.read_text())
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    assert document["markups"][0]["coordinateSystem"] == "LPS"

    node_id = logics["Markups"].LoadMarkups(str(path), "FewShotLandmarks")
    node = scene.GetNodeByID(node_id)
    assert node is not None and node.IsA("vtkMRMLMarkupsFiducialNode")
    assert node.GetNumberOfControlPoints() == 2
    for i, point in enumerate(POINTS):
        assert node.GetNthControlPointLabel(i) == point["label"]
        assert node.GetNthControlPointDescription(i) == point.get("description", "")
        x, y, z = point["position"]
        # Slicer keeps RAS internally: L and P change sign, S does not
        assert node.GetNthControlPointPosition(i) == pytest.approx((-x, -y, z))

    with pytest.raises(FileExistsError):
        io.write_markups_json(POINTS, path)
    assert io.read_markups_json(path) == [
        {"label": p["label"], "position": pytest.approx(p["position"]), "description": p.get("description", "")}
        for p in POINTS]


def test_markups_written_by_slicer_read_back_in_lps(tmp_path, slicer_scene):
    import vtk
    slicer, scene, logics = slicer_scene
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "fromSlicer")
    node.AddControlPoint(vtk.vtkVector3d(10.0, -20.0, 30.0), "a")
    node.AddControlPoint(vtk.vtkVector3d(-1.5, 2.5, -3.5), "b")
    storage = node.CreateDefaultStorageNode()
    path = tmp_path / "slicer.mrk.json"
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    points = io.read_markups_json(path)
    assert [p["label"] for p in points] == ["a", "b"]
    assert points[0]["position"] == pytest.approx((-10.0, 20.0, 30.0))
    assert points[1]["position"] == pytest.approx((1.5, -2.5, -3.5))


def test_markups_reject_bad_points(tmp_path):
    with pytest.raises(InputError, match="point 1"):
        io.write_markups_json([{"label": "x", "position": (1.0, float("nan"), 2.0)}], tmp_path / "p.mrk.json")
    (tmp_path / "junk.mrk.json").write_text("{not json")
    with pytest.raises(InputError, match="not a Slicer markups JSON"):
        io.read_markups_json(tmp_path / "junk.mrk.json")
