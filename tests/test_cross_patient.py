"""Across patients through the CLI (issue 6): an adapter trained on the standard few-shot support
slices of one CHAOS patient (or of two) labels another patient; an organ that is not in the scan
is reported "not found"; templates that disagree and a volume of another modality are refused
with a one-line message.

Floors sit below what this test measured (default settings, seed 0): see FLOORS;
benchmarks/results/cross_patient.md has all 20 pairs.
"""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSegmentLib import cli, io
from FewShotSegmentLib.pipeline import TrainedModel
from FewShotSegmentLib.metrics import dice

ORGANS = {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"}
LABEL_ARGS = [f"{v}={name}" for v, name in ORGANS.items()]
# Dice within each organ's slice range on P2 (the protocol's convention). The adapter's training is
# one-threaded and seeded, yet it is not the same on every CPU: the matmul kernels (AMX on an Intel
# machine, AVX512-BF16 on an AMD one) sum in another order, and across patients that moved the left
# kidney by 0.08 and, with two supports, the spleen by 0.29 (location off). With location "auto"
# (inplane for these adapters) and feature_layer "auto" (stages) only the AMD machine was measured, so
# the floors sit 0.08 below it (the largest one-support move between the two CPU kinds).
# Listed: liver, kidney_right, kidney_left, spleen.
FLOORS = {
    # AMD, ensemble of 3, stages features: 0.901, 0.937, 0.929, 0.857 (pre-neck features 0.895, 0.917,
    # 0.913, 0.787; one adapter 0.890, 0.933, 0.906, 0.766; location off: Intel 0.902, 0.798, 0.849, 0.818)
    "P1->P2": {"liver": 0.82, "kidney_right": 0.85, "kidney_left": 0.85, "spleen": 0.77},
    # AMD, stages: 0.886, 0.911, 0.926, 0.876 (pre-neck 0.892, 0.916, 0.921, 0.572; location off: Intel
    # spleen 0.873, AMD 0.581)
    "P1+P3->P2": {"liver": 0.80, "kidney_right": 0.83, "kidney_left": 0.84, "spleen": 0.79},
    # --self-support 0.5, AMD, stages: 0.901, 0.938, 0.928, 0.849 (pre-neck 0.897, 0.931, 0.905, 0.780)
    "P1->P2 self-support": {"liver": 0.82, "kidney_right": 0.85, "kidney_left": 0.84, "spleen": 0.76},
    # AMD: 0.888, 0.921, 0.917, 0.732 (relative_place off: the spleen 0.000); 0.05 below
    "P8->P2": {"liver": 0.84, "kidney_right": 0.87, "kidney_left": 0.86, "spleen": 0.68},
}


@pytest.fixture(scope="module")
def chaos(shared_data, tmp_path_factory, feature_cache):
    root = tmp_path_factory.mktemp("cross")
    data = shared_data / "chaos_mri"
    paths = {n: (data / f"image_{n}.nii.gz", data / f"label_{n}.nii.gz") for n in (1, 2, 3, 8)}
    templates = {}
    for n in (1, 3, 8):
        out = root / f"template_{n}.nii.gz"
        assert cli.main(["make-template", "--reference", str(paths[n][1]), "--image", str(paths[n][0]),
                         "--labels", "1,2,3,4", "--protocol", "--out", str(out)]) == 0
        templates[n] = out
    return {"root": root, "paths": paths, "templates": templates, "cache": feature_cache}


def _train(chaos, patients, out):
    argv = ["train", "--out", str(out), "--cache-dir", chaos["cache"]]
    for n in patients:
        argv += ["--image", str(chaos["paths"][n][0]), "--template", str(chaos["templates"][n])]
    for item in LABEL_ARGS:
        argv += ["--label", item]
    return cli.main(argv)


def _range_dice(labels: np.ndarray, reference: np.ndarray) -> dict:
    scores = {}
    for value, name in ORGANS.items():
        present = np.flatnonzero((reference == value).any((1, 2)))
        window = slice(present[0], present[-1] + 1)
        scores[name] = dice(labels[window] == value, reference[window] == value)
    return scores


@pytest.fixture(scope="module")
def one_support(chaos):
    out = chaos["root"] / "p1"
    assert _train(chaos, [1], out) == 0
    return out / "adapter.pt"


def _predict(chaos, model, image, out, *more):
    code = cli.main(["predict", "--model", str(model), "--image", str(image), "--out", str(out),
                     "--cache-dir", chaos["cache"], *more])
    return code, out


def _check_floors(chaos, model, key, capsys, *more):
    code, out = _predict(chaos, model, chaos["paths"][2][0], chaos["root"] / key.replace(">", "").replace(" ", "_"),
                         *more)
    assert code == 0
    labels = sitk.GetArrayFromImage(io.read_image(out / "labels.nrrd"))
    reference = sitk.GetArrayFromImage(io.read_labelmap(chaos["paths"][2][1]))
    scores = _range_dice(labels, reference)
    print(key, json.dumps(scores))
    for name, floor in FLOORS[key].items():
        assert not math.isnan(scores[name]) and scores[name] >= floor, (key, name, scores)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["not_found"] == []
    assert set(summary["components"]) == set(ORGANS.values())


def test_cross_patient_every_organ_including_the_right_kidney(chaos, one_support, capsys):
    _check_floors(chaos, one_support, "P1->P2", capsys)
    # the protocol paints each organ on 3+ slices: the adapter knows their order along the scan
    # (the spleen's centre above the left kidney's, LPS z to superior) and the choice used it
    model = TrainedModel.load(one_support)
    offsets = model.axial_offsets_mm
    # an adapter trained for other patients sees where each pixel lies in the body (location "auto"),
    # and knows roughly how large each organ painted across its slices is
    assert model.config.location == "inplane" and set(model.volumes_mm3) == set(ORGANS)
    # ...from the first 64x64 stage's features beside the pre-neck's (feature_layer "auto")
    assert model.config.feature_layer == "stages" and model.backbone_id.endswith(":stages")
    # ...and averages three adapters (ensemble "auto"), each trained on its own draw of the pixels
    members = model.adapter.members
    assert model.config.ensemble == 3 and [m.seed for m in members] == [0, 1, 2]
    assert not torch.equal(members[0].references, members[1].references)
    assert set(offsets) == set(ORGANS) and offsets[4][3] > 0 and offsets[3][4] == -offsets[4][3]
    summary = json.loads((chaos["root"] / "P1-P2" / "summary.json").read_text())
    assert all("axial_distance" in kept[0] for kept in summary["components"].values())


def test_a_second_pass_supported_by_the_patients_own_pixels_labels_every_organ(chaos, one_support, capsys):
    """--self-support (off by default: across the 20 pairs it raised the kidneys, lowered the spleen)."""
    _check_floors(chaos, one_support, "P1->P2 self-support", capsys, "--self-support", "0.5")
    summary = json.loads((chaos["root"] / "P1-P2_self-support" / "summary.json").read_text())
    assert summary["timings"]["propagate_s"] > 0


def test_templates_of_two_patients_train_one_adapter(chaos, capsys):
    out = chaos["root"] / "p1p3"
    assert _train(chaos, [1, 3], out) == 0
    _check_floors(chaos, out / "adapter.pt", "P1+P3->P2", capsys)


def test_a_patient_whose_body_outline_moves_every_organ_still_gets_each_organ(chaos, capsys):
    """P8 -> P2: P2's body outline puts every organ 0.06-0.28 further back (body-relative) than P8's,
    and a structure below the left kidney sat nearer the spleen's place on the template than P2's
    spleen did. The second look at each label's place, from where the other organs were found
    (pipeline.relative_place), takes the spleen (Dice 0.00 without it)."""
    out = chaos["root"] / "p8"
    assert _train(chaos, [8], out) == 0
    _check_floors(chaos, out / "adapter.pt", "P8->P2", capsys)


def test_an_absent_organ_is_not_found(chaos, one_support, capsys):
    """P2 cut above its kidneys: the kidneys are not in the scan, the liver and spleen are."""
    image = io.read_image(chaos["paths"][2][0])
    reference = sitk.GetArrayFromImage(io.read_labelmap(chaos["paths"][2][1]))
    kidneys = np.flatnonzero(np.isin(reference, (2, 3)).any((1, 2)))
    top = int(kidneys.max()) + 2                  # array axis 0 runs to superior in this file (LAS)
    assert (reference[top:] == 1).any() and (reference[top:] == 4).any()
    cropped = image[:, :, top:]
    path = chaos["root"] / "p2_above_kidneys.nii.gz"
    sitk.WriteImage(cropped, str(path))
    code, out = _predict(chaos, one_support, path, chaos["root"] / "absent")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"kidney_right", "kidney_left"} <= set(summary["not_found"]), summary["not_found"]
    assert "liver" not in summary["not_found"]
    labels = sitk.GetArrayFromImage(io.read_image(out / "labels.nrrd"))
    assert not np.isin(labels, (2, 3)).any()
    assert "not found: kidney_right, kidney_left" in capsys.readouterr().err


# P1's adapter on a 5-slice slab (38 mm) of P8 through its spleen's middle; Dice on the slab. AMD:
# liver 0.939, kidney_right 0.860, kidney_left 0.938, spleen 0.957 (without the scan's coverage in the
# volume check the liver, 0.11 of the template's unscaled estimate, was "not found": 0.000)
SLAB_FLOORS = {"liver": 0.89, "kidney_right": 0.81, "kidney_left": 0.88, "spleen": 0.90}


def test_organs_cut_by_a_short_scan_are_still_found(chaos, one_support, capsys):
    """A slab through the upper abdomen holds a few cm of organs painted over 10-17 cm on the
    template: the volume check scales the template's estimate by the share of the painted span
    the scan can hold (pipeline.scan_coverage), so a liver cut by the scan's ends is not taken
    for a fragment."""
    image = io.read_image(chaos["paths"][8][0])
    reference = sitk.GetArrayFromImage(io.read_labelmap(chaos["paths"][8][1]))
    spleen = np.flatnonzero((reference == 4).any((1, 2)))
    low = int(spleen.mean()) - 2
    path = chaos["root"] / "p8_slab.nii.gz"
    sitk.WriteImage(image[:, :, low:low + 5], str(path))
    code, out = _predict(chaos, one_support, path, chaos["root"] / "slab")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["not_found"] == [], summary["not_found"]
    labels = sitk.GetArrayFromImage(io.read_image(out / "labels.nrrd"))
    slab = reference[low:low + 5]
    scores = {name: dice(labels == value, slab == value) for value, name in ORGANS.items()}
    print("P1->P8 slab", json.dumps(scores))
    for name, floor in SLAB_FLOORS.items():
        assert scores[name] >= floor, (name, scores)


def test_templates_that_disagree_are_refused_in_one_line(chaos, capsys):
    """P3's template without its spleen: the two templates do not paint the same names."""
    template = io.read_labelmap(chaos["templates"][3])
    array = sitk.GetArrayFromImage(template)
    array[array == 4] = 0
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(template)
    path = chaos["root"] / "template_3_no_spleen.nii.gz"
    sitk.WriteImage(bad, str(path))
    out = chaos["root"] / "disagree"
    argv = ["train", "--out", str(out), "--image", str(chaos["paths"][1][0]), "--template",
            str(chaos["templates"][1]), "--image", str(chaos["paths"][3][0]), "--template", str(path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fewshot-segment: error: template 2 paints labels")
    assert not (out / "adapter.pt").exists()
    assert cli.main(argv[:7] + ["--template", str(path)]) == 1          # one template per image
    assert "give one --template per --image" in capsys.readouterr().err


def test_a_volume_of_another_modality_is_refused(chaos, one_support, shared_data, capsys):
    code, out = _predict(chaos, one_support, shared_data / "totalseg_ct" / "example_ct.nii.gz",
                         chaos["root"] / "ct")
    assert code == 1
    assert "the adapter was trained on MRI and this image looks like CT" in capsys.readouterr().err
    assert not (out / "labels.nrrd").exists()
