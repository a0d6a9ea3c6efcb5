"""landmarks: representative points on shapes where the answer is known, LPS positions of real
organs, and the slice-wise localization score."""
import math

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import io
from FewShotSegmentLib.errors import InputError
from FewShotSegmentLib.landmarks import (landmarks_from_label_map, localization_scores, region_point,
                                         slice_points)


def test_region_point_of_a_box_is_its_centre():
    mask = np.zeros((10, 12, 14), bool)
    mask[2:5, 3:8, 4:13] = True
    assert region_point(mask) == pytest.approx((3.0, 5.0, 8.0))


def test_region_point_uses_the_largest_component():
    mask = np.zeros((10, 10, 10), bool)
    mask[0:2, 0:2, 0:2] = True
    mask[5:10, 5:10, 5:10] = True
    assert region_point(mask) == pytest.approx((7.0, 7.0, 7.0))


def test_region_point_of_a_c_shape_moves_inside():
    # a thick "C" in every slice: its centroid lies in the opening, outside the organ
    yy, xx = np.mgrid[0:41, 0:41]
    radius = np.hypot(yy - 20, xx - 20)
    ring = (radius >= 12) & (radius <= 18) & ~((xx > 20) & (np.abs(yy - 20) < 8))
    mask = np.repeat(ring[None], 5, axis=0)
    centroid = np.argwhere(mask).mean(axis=0)
    assert not mask[tuple(np.round(centroid).astype(int))]
    point = region_point(mask)
    assert mask[tuple(int(round(c)) for c in point)]
    inside = np.argwhere(mask)
    nearest = np.min(np.linalg.norm(inside - centroid, axis=1))
    assert np.linalg.norm(np.array(point) - centroid) == pytest.approx(nearest)


def test_region_point_of_empty_mask_is_an_error():
    with pytest.raises(InputError, match="empty"):
        region_point(np.zeros((3, 3, 3), bool))


@pytest.mark.parametrize("image_name, label_name, names", [
    ("totalseg_ct/example_ct.nii.gz", "totalseg_ct/example_seg_fast_force_split.nii.gz",
     {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}),
    ("chaos_mri/image_3.nii.gz", "chaos_mri/label_3.nii.gz",
     {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}),
])
def test_landmarks_on_real_organs_are_in_lps(shared_data, image_name, label_name, names):
    image = io.read_image(shared_data / image_name)
    label_map = io.read_labelmap(shared_data / label_name, image)
    labels = {value: {"name": name} for value, name in names.items()}
    labels[999] = {"name": "absent"}
    landmarks = landmarks_from_label_map(label_map, labels)
    by_name = {lm["label"]: lm for lm in landmarks}
    assert sorted(by_name) == sorted(names.values())  # one per label present, none for "absent"
    values = sitk.GetArrayViewFromImage(label_map)
    for lm in landmarks:
        x, y, z = lm["index"]
        assert values[int(round(z)), int(round(y)), int(round(x))] == lm["label_value"]
        assert lm["position"] == pytest.approx(label_map.TransformContinuousIndexToPhysicalPoint(lm["index"]))
    # anatomy in LPS: x grows to the patient's left
    right_kidney = by_name[names[2]]["position"]
    left_kidney = by_name[names[3]]["position"]
    spleen = by_name[[n for n in names.values() if n == "spleen"][0]]["position"]
    liver = by_name[[n for n in names.values() if n == "liver"][0]]["position"]
    assert left_kidney[0] > right_kidney[0] + 50
    assert spleen[0] > liver[0] + 50


def test_slice_points_per_axis():
    mask = np.zeros((4, 10, 12), bool)
    mask[1, 2:5, 3:6] = True
    mask[2, 6:9, 8:11] = True
    assert slice_points(mask, axis=0) == {1: pytest.approx((3.0, 4.0)), 2: pytest.approx((7.0, 9.0))}
    along_x = slice_points(mask, axis=2)
    assert sorted(along_x) == [3, 4, 5, 8, 9, 10]
    assert along_x[4] == pytest.approx((1.0, 3.0))  # (z, y) in that sagittal slice


def test_localization_scores(shared_data):
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_mri" / "label_1.nii.gz"))) == 1
    spacing_zyx = (7.7, 1.25, 1.25)
    n = int(ref.any(axis=(1, 2)).sum())

    perfect = localization_scores(ref, ref, spacing_zyx)
    assert perfect == {"slice_accuracy": 1.0, "distance_mm": 0.0, "n_slices": n}

    shifted = np.roll(ref, 6, axis=2)  # 6 pixels = 7.5 mm to the side
    near = localization_scores(shifted, ref, spacing_zyx, tolerance_px=10)
    assert near["slice_accuracy"] == 1.0
    assert near["distance_mm"] == pytest.approx(7.5, abs=1.25)
    assert localization_scores(shifted, ref, spacing_zyx, tolerance_px=3)["slice_accuracy"] == 0.0

    half = ref.copy()
    occupied = np.flatnonzero(ref.any(axis=(1, 2)))
    half[occupied[::2]] = False  # every other reference slice has no prediction: misses
    scores = localization_scores(half, ref, spacing_zyx)
    assert scores["slice_accuracy"] == pytest.approx(len(occupied[1::2]) / n)

    missed = localization_scores(np.zeros_like(ref), ref, spacing_zyx)
    assert missed["slice_accuracy"] == 0.0 and math.isnan(missed["distance_mm"])


def test_match_point_takes_the_cells_most_like_the_roi_near_where_it_was():
    """Two cells look like the painted RoI; the one nearer the template's place wins, and
    without a place the more similar one does."""
    import torch

    from FewShotSegmentLib.backbones import Encoded
    from FewShotSegmentLib.features import VolumeFeatures
    from FewShotSegmentLib.landmarks import match_point

    grid = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    descriptor = torch.zeros(8)
    descriptor[0] = 1.0
    grid[1, 0, 2, 3] = 5.0            # slice 1, near the top left: the best match by features
    grid[2, 0, 12, 13] = 4.0          # slice 2, bottom right: nearly as good, where the RoI was
    features = VolumeFeatures(Encoded(features=grid.half(), scale=1.0, frame=(64, 64)), (64, 64))

    def body_position(srcs):          # (slice, row, col) -> (u, v) in [-1, 1] of a 64 px slice
        return np.stack([srcs[:, 2] / 32 - 1, srcs[:, 1] / 32 - 1], 1)

    assert match_point(features, descriptor, body_position, None, area_px=16.0) == (1, 9.5, 13.5)
    expected = [53.5 / 32 - 1, 49.5 / 32 - 1, 0.01, 0.01]      # u, v of cell (12, 13): pixel (49.5, 53.5)
    assert match_point(features, descriptor, body_position, expected, area_px=16.0) == (2, 49.5, 53.5)


def test_discs_painted_on_one_patient_are_found_on_another(shared_data, feature_cache, tmp_path):
    """Landmarks across patients (issue 6): 5 px discs at each organ's centre on P1's middle
    slice, an adapter trained on them, applied to P2. A label painted this small is placed by
    matching (landmarks.match_point); in-plane distance to P2's reference point (measured on
    CHAOS P1->P2: liver 9.2, right kidney 10.1, left kidney 10.6, spleen 21.8 px; the adapter's
    region centroid before: 36, missed, missed, 5 px) within 5 px of that."""
    from FewShotSegmentLib import pipeline, templates
    from FewShotSegmentLib.config import PipelineConfig

    data = shared_data / "chaos_mri"
    names = {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"}
    support = io.read_image(data / "image_1.nii.gz")
    reference = sitk.GetArrayFromImage(io.read_labelmap(data / "label_1.nii.gz", support))
    discs, _ = templates.disc_template(reference, list(names), 0, 5.0)
    template = sitk.GetImageFromArray(discs)
    template.CopyInformation(support)
    config = PipelineConfig(cache_dir=feature_cache, axis="axial")
    model, _ = pipeline.fit(support, template, config, {v: {"name": n} for v, n in names.items()})
    assert sorted(model.descriptors) == [1, 2, 3, 4]
    model = pipeline.TrainedModel.load(model.save(tmp_path / "discs.pt"))     # descriptors saved
    assert sorted(model.descriptors) == [1, 2, 3, 4]
    query = io.read_image(data / "image_2.nii.gz")
    truth = sitk.GetArrayFromImage(io.read_labelmap(data / "label_2.nii.gz", query))
    prediction = pipeline.predict(model, query, overrides={"cache_dir": feature_cache})
    found = {p["label_value"]: p for p in prediction.landmarks}
    assert {p["method"] for p in prediction.summary["landmarks"]} == {"matched"}
    ceilings = {1: 14.2, 2: 15.1, 3: 15.6, 4: 26.8}
    for value, ceiling in ceilings.items():
        assert found[value]["method"] == "matched"
        z, y, x = templates.disc_template(truth, [value], 0, 0.5)[1][value]
        px, py, _ = found[value]["index"]
        distance = math.hypot(px - x, py - y)
        print(names[value], round(distance, 2))
        assert distance <= ceiling, (names[value], distance)
