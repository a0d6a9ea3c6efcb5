"""Uncertainty and slice suggestions (guidance.py), and what a run writes for them."""
import json

import numpy as np
import SimpleITK as sitk

from FewShotSegmentLib import guidance, pipeline
from FewShotSegmentLib.backbones import LiteMedSAMBackbone
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.worker import execute


def test_uncertainty_is_one_for_a_tie_and_zero_for_a_clear_lead():
    scores = np.zeros((3, 1, 3), np.float32)
    scores[:, 0, 0] = [0.5, 0.5, 0.1]        # tie between background and label 1
    scores[:, 0, 1] = [0.5, 1.0, 0.0]        # label 1 leads by 0.5
    scores[:, 0, 2] = [0.5, 0.6, 0.2]        # leads by 0.1
    u = guidance.uncertainty_from_scores(scores)[0]
    assert u[0] == 255 and u[1] == 0 and u[2] == round(0.8 * 255)


def test_suggestions_go_where_doubt_is_far_from_the_painting_and_spread_out():
    n, h, w = 20, 8, 8
    index = np.zeros((n, h, w), np.uint8)
    index[2:18, 2:6, 2:6] = 1
    runner = np.zeros_like(index)
    uncertainty = np.zeros_like(index)
    uncertainty[[3, 4, 15, 16], 2:6, 2:6] = 255      # doubtful near slice 4 (painted) and near 15-16
    picks = guidance.suggest_slices(uncertainty, runner, index, {1: [4]}, count=3)
    assert picks[0]["index"] in (15, 16) and picks[0]["labels"] == [1]
    # once 15 or 16 is suggested, its neighbour counts a third (it lies 1 slice from a "painted" one)
    assert picks[1]["score"] == picks[0]["score"] / 3
    assert all(p["index"] != 4 for p in picks)
    # nothing doubtful: nothing to suggest
    assert guidance.suggest_slices(np.zeros_like(index), runner, index, {1: [4]}) == []


def test_a_run_writes_uncertainty_and_suggestions_and_a_rerun_reuses_the_features(tmp_path, monkeypatch):
    """Paint one slice, run; paint one more, run again: the second run must not encode again."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 5, (8, 64, 64)).astype(np.float32)
    volume[1:7, 20:44, 16:40] += 100          # a bright block through six slices
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    calls = []
    original = LiteMedSAMBackbone._encode
    monkeypatch.setattr(LiteMedSAMBackbone, "_encode", lambda self, x: calls.append(len(x)) or original(self, x))
    config = PipelineConfig(steps=100, refine="none", cache_dir=str(tmp_path / "cache"), device="cpu").to_dict()
    template = np.zeros(volume.shape, np.uint8)
    for run, painted in enumerate(([3], [3, 5])):
        for z in painted:
            template[z] = (volume[z] > 50).astype(np.uint8)
        path = tmp_path / f"template{run}.nrrd"
        t = sitk.GetImageFromArray(template)
        t.CopyInformation(image)
        sitk.WriteImage(t, str(path))
        outputs = execute({"task": "run", "image": str(tmp_path / "image.nrrd"), "template": str(path),
                           "output_dir": str(tmp_path / f"out{run}"), "config": config})
        if run == 0:
            assert sum(calls) == 8                      # every slice encoded once
    assert sum(calls) == 8, calls                        # the second run took the cached features
    uncertainty = sitk.ReadImage(outputs["uncertainty"])
    assert uncertainty.GetSize() == image.GetSize() and uncertainty.GetSpacing() == image.GetSpacing()
    u = sitk.GetArrayFromImage(uncertainty)
    assert u.dtype == np.uint8 and (u[[3, 5]] == 0).all() and u.max() <= 255
    suggestions = json.loads(open(outputs["suggestions"]).read())
    assert suggestions["axis"] == "axial"
    for pick in suggestions["slices"]:
        assert 0 <= pick["index"] < 8 and pick["index"] not in (3, 5)
        index = image.TransformPhysicalPointToIndex(pick["position_lps"])
        assert index[2] == pick["index"]
