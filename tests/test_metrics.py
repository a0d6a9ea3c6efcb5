"""metrics: Dice / IoU on hand-countable arrays and on real CHAOS labels, and the text table."""
import math

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib.errors import InputError
from FewShotSegmentLib.metrics import dice, format_table, iou, per_label_scores


def test_dice_and_iou_count_voxels():
    pred = np.zeros((2, 4, 4), bool)
    ref = np.zeros((2, 4, 4), bool)
    pred[0, :2, :3] = True  # 6 voxels
    ref[0, :2, 1:] = True   # 6 voxels, 4 shared
    assert dice(pred, ref) == pytest.approx(2 * 4 / 12)
    assert iou(pred, ref) == pytest.approx(4 / 8)
    assert dice(ref, ref) == 1.0 and iou(ref, ref) == 1.0


def test_empty_cases():
    empty = np.zeros((3, 3, 3), bool)
    full = np.ones((3, 3, 3), bool)
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_per_label_scores_on_real_labels(shared_data):
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "chaos_mri" / "label_1.nii.gz"))).astype(np.int16)
    pred = np.roll(ref, 3, axis=2)  # the whole prediction 3 pixels off
    pred[pred == 4] = 0             # spleen missed entirely
    scores = per_label_scores(pred, ref, [1, 2, 3, 4, 7])
    for label in (1, 2, 3):
        expected = 2 * np.sum((pred == label) & (ref == label)) / (np.sum(pred == label) + np.sum(ref == label))
        assert scores[label]["dice"] == pytest.approx(expected)
        assert 0.3 < scores[label]["dice"] < 1.0
        # Dice and IoU of the same pair are tied: D = 2J / (1 + J)
        j = scores[label]["iou"]
        assert scores[label]["dice"] == pytest.approx(2 * j / (1 + j))
        assert scores[label]["ref_voxels"] == int(np.sum(ref == label))
    assert scores[1]["dice"] > scores[2]["dice"]  # a 3 px shift hurts a small kidney more than the liver
    assert scores[4] == {"dice": 0.0, "iou": 0.0, "pred_voxels": 0, "ref_voxels": int(np.sum(ref == 4))}
    assert math.isnan(scores[7]["dice"]) and scores[7]["pred_voxels"] == 0


def test_format_table_aligns_columns():
    rows = [{"label": "liver", "dice": 0.93456, "voxels": 123456},
            {"label": "right kidney", "dice": float("nan"), "voxels": 7},
            {"label": "spleen", "voxels": 42}]
    text = format_table(rows, ["label", "dice", "voxels"])
    lines = text.splitlines()
    assert lines[0].split() == ["label", "dice", "voxels"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["liver", "0.935", "123456"]
    assert lines[3].split() == ["right", "kidney", "nan", "7"]
    assert lines[4].split() == ["spleen", "42"]
    # numbers are right-aligned: every row's last column ends at the same place
    assert len({len(line) for line in lines}) == 1
    assert lines[2].index("liver") == lines[3].index("right") == 0
