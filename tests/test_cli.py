"""The command line: bad input fails fast with a clear one-line error and loses nothing; a real
cross-patient run (train on CHAOS patient 1, predict patient 2) writes Slicer-readable outputs."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import io
from FewShotSegmentLib.cli import main
from FewShotSegmentLib.metrics import per_label_scores

MRI_LABELS = ["1=liver", "2=kidney_right", "3=kidney_left", "4=spleen"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def template_1(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "template_1.nrrd"
    assert main(["make-template", "--reference", str(shared_data / "chaos_mri" / "label_1.nii.gz"),
                 "--image", str(shared_data / "chaos_mri" / "image_1.nii.gz"), "--labels", "1,2,3,4",
                 "--out", str(out)]) == 0
    return out


def test_bad_inputs_fail_with_clear_messages(tmp_path, capsys, shared_data, template_1):
    image = shared_data / "chaos_mri" / "image_1.nii.gz"
    flat = sitk.Image([32, 32], sitk.sitkFloat32)
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    nan = sitk.GetImageFromArray(np.full((4, 16, 16), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    other = sitk.ReadImage(str(template_1))
    other.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(other, str(tmp_path / "other_grid.nrrd"))
    cases = [
        (["--image", tmp_path / "flat.nrrd"], "2D"),
        (["--image", tmp_path / "nan.nrrd"], "NaN"),
        (["--image", tmp_path / "missing.nii.gz"], "does not exist"),
        (["--image", image, "--template", tmp_path / "other_grid.nrrd"], "geometry mismatch"),
        (["--image", image, "--label", "7=pancreas"], "not painted"),
    ]
    for extra, message in cases:
        args = {"--image": image, "--template": template_1, "--out": tmp_path / "out"}
        args.update(dict(zip(extra[::2], extra[1::2])))   # each case replaces or adds options
        code, _, err = run_cli(capsys, "run", *[x for option in args.items() for x in option])
        assert code == 1 and message in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_cross_patient_mri_from_patient_1_to_patient_2(tmp_path, capsys, shared_data, template_1, feature_cache):
    """Train one multi-label adapter on CHAOS patient 1's painted slices, apply it to patient 2."""
    data = shared_data / "chaos_mri"
    code, out, err = run_cli(capsys, "train", "--image", data / "image_1.nii.gz", "--template", template_1,
                             *[x for label in MRI_LABELS for x in ("--label", label)],
                             "--out", tmp_path / "train", "--cache-dir", feature_cache)
    assert code == 0, err
    model = json.loads(out.splitlines()[-1])["outputs"]["model"]
    code, out, err = run_cli(capsys, "predict", "--model", model, "--image", data / "image_2.nii.gz",
                             "--out", tmp_path / "p2", "--cache-dir", feature_cache)
    assert code == 0, err
    outputs = json.loads(out.splitlines()[-1])["outputs"]
    image = io.read_image(data / "image_2.nii.gz")
    labels, segments = io.read_seg_nrrd(outputs["segmentation"])
    assert [s["name"] for _, s in sorted(segments.items())] == ["liver", "kidney_right", "kidney_left", "spleen"]
    reference = sitk.GetArrayFromImage(io.read_labelmap(data / "label_2.nii.gz", image))
    scores = per_label_scores(sitk.GetArrayFromImage(io.read_labelmap(outputs["labels"], image)), reference,
                              [1, 2, 3, 4])
    dice = {k: round(v["dice"], 3) for k, v in scores.items()}
    # measured 1 -> 2 (AMD EPYC) with the adapter for other patients seeing where each pixel lies
    # in the body (location "auto" -> inplane) and averaging three adapters (ensemble auto): liver
    # 0.778, right kidney 0.934, left kidney 0.907, spleen 0.491 (one adapter: 0.767, 0.936, 0.885,
    # 0.581; location off: 0.765, 0.908, 0.909, 0.564; the right kidney was lost, 0.00, before
    # components were chosen by evidence). Painted on one slice, the spleen's place is known too narrowly.
    assert dice[1] >= 0.73 and dice[2] >= 0.88 and dice[3] >= 0.86 and dice[4] >= 0.44, dice
    points = io.read_markups_json(outputs["landmarks"])
    assert {p["label"] for p in points} >= {"liver", "kidney_left", "spleen"}
    # nothing is overwritten without --overwrite
    code, _, err = run_cli(capsys, "predict", "--model", model, "--image", data / "image_2.nii.gz",
                           "--out", tmp_path / "p2")
    assert code == 1 and "exist" in err
