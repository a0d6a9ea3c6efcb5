"""One volume from one painted slice per organ, on a real MRI (CHAOS patient 1, human reference):
every organ found, the painting kept voxel for voxel, under-painting tolerated, a ring-shaped label
not destroyed by refinement, an oblique copy of the stack labelled as the original. Floors sit
0.03-0.05 under what was measured (benchmarks/one_volume.py)."""
import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import io, pipeline, templates
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.metrics import per_label_scores

ORGANS = {1: {"name": "liver"}, 2: {"name": "kidney_right"}, 3: {"name": "kidney_left"}, 4: {"name": "spleen"}}
RIM = 11
# measured with these defaults (benchmarks/one_volume.py --only one_slice, P1, AMD EPYC: liver 0.836,
# kidneys 0.907 0.951, spleen 0.960 with bf16 training; 0.832 0.907 0.952 0.960 with fp32) minus 0.03-0.05
FLOORS = {1: 0.79, 2: 0.86, 3: 0.92, 4: 0.93}
RIM_FLOOR = 0.49          # measured 0.563, and 0.523 on an AMD EPYC (rim left unrefined: SAM redrew it with Dice 0.31)


@pytest.fixture(scope="module")
def patient(shared_data, feature_cache):
    image = io.read_image(shared_data / "chaos_mri" / "image_1.nii.gz")
    reference = sitk.GetArrayFromImage(io.read_labelmap(shared_data / "chaos_mri" / "label_1.nii.gz", image))
    axis = templates.canonical_axis(image, "axial")
    slices = sorted({s for v in ORGANS for s in templates.template_slices(reference, v, axis, 1)})
    template = templates.make_template(reference, list(ORGANS), axis, slices)
    config = PipelineConfig(cache_dir=feature_cache, device="cpu")
    backbone = pipeline.build_backbone_for(config)
    return image, reference, axis, slices, template, config, backbone


def run(patient, template, labels=ORGANS, image=None, **settings):
    original, _, _, _, _, config, backbone = patient
    image = image or original
    template_image = sitk.GetImageFromArray(template)
    template_image.CopyInformation(image)
    config = pipeline.resolved(PipelineConfig.from_dict({**config.to_dict(), **settings}), image, template_image)
    prepared = pipeline.prepare_volume(image, config, backbone)
    model = pipeline.train(prepared, template_image, config, labels, backbone.id)
    return pipeline.segment(model, prepared, template_image)


def dice(prediction, reference, values):
    labels = sitk.GetArrayFromImage(prediction.labels)
    return {v: s["dice"] for v, s in per_label_scores(labels, reference, values).items()}


@pytest.fixture(scope="module")
def full(patient):
    return run(patient, patient[4])


def test_every_organ_from_one_painted_slice_each(patient, full):
    scores = dice(full, patient[1], list(ORGANS))
    assert all(scores[v] >= FLOORS[v] for v in ORGANS), scores
    assert full.summary["not_found"] == []


def test_painted_slices_come_back_voxel_for_voxel(patient, full):
    _, _, axis, slices, template, _, _ = patient
    result = sitk.GetArrayFromImage(full.labels)
    np.testing.assert_array_equal(np.take(result, slices, axis=axis), np.take(template, slices, axis=axis))


def test_under_painting_the_inner_80_percent_costs_at_most_002(patient, full):
    _, reference, axis, slices, template, _, _ = patient
    hurried = run(patient, templates.under_paint(template, axis, slices, 0.8))
    painted = np.mean(list(dice(full, reference, list(ORGANS)).values()))
    under = np.mean(list(dice(hurried, reference, list(ORGANS)).values()))
    assert under >= painted - 0.02, (painted, under)


def test_refinement_keeps_a_ring_it_cannot_draw(patient):
    """The liver split into a core and a 4-px rim around it: SAM, prompted by the rim's box, fills
    it, so the rim is left unrefined (and the solid organs are still refined)."""
    _, reference, axis, slices, template, _, _ = patient
    ringed = templates.split_rim(reference, 1, RIM, axis)
    ring_template = np.where(template == 1, ringed, template)
    labels = {**ORGANS, 1: {"name": "liver_core"}, RIM: {"name": "liver_rim"}}
    checked = run(patient, ring_template, labels)
    forced = run(patient, ring_template, labels, refine_min_dice=0.0)
    off = run(patient, ring_template, labels, refine="none")
    rim = {name: dice(result, ringed, [RIM])[RIM] for name, result in
           (("checked", checked), ("forced", forced), ("off", off))}
    assert rim["checked"] >= rim["off"] - 0.005 and rim["checked"] >= RIM_FLOOR, rim
    assert rim["forced"] < rim["off"] - 0.1, rim          # the case is real: blind refinement destroys it
    decisions = checked.summary["refinement"]
    assert decisions["liver_rim"]["refined"] is False, decisions
    assert all(decisions[name]["refined"] for name in ("kidney_right", "kidney_left", "spleen")), decisions


def test_an_oblique_copy_is_labelled_as_the_original(patient, full):
    image, reference, _, _, template, _, _ = patient
    tilted = templates.oblique_copy(image, 60)
    assert pipeline.resolve_axis("axial", tilted) == "axial"      # "axial" would now cut across the stack
    assert pipeline.stack_axis(tilted) != "axial"
    result = run(patient, template, image=tilted)
    assert result.summary["axis"] == pipeline.stack_axis(tilted)
    original = np.mean(list(dice(full, reference, list(ORGANS)).values()))
    oblique = np.mean(list(dice(result, reference, list(ORGANS)).values()))
    # measured 0.010 (0.895 -> 0.885): the re-oriented slices reach the encoder transposed; scoring on
    # another thread count moves it by a few thousandths more
    assert abs(oblique - original) <= 0.02, (original, oblique)
