"""The correction loop on real data (issue 8): painting the slice the run suggests helps more
than painting a random slice of the organ, on CHAOS P1 (one slice per organ, then one more).

The full simulation (1 to 4 slices per organ, suggested / even / random, against Fill between
slices) is benchmarks/loop.py; this is its smallest case, with refinement off and a coarser
scoring grid so that it fits in CI (the measured values are for exactly these settings)."""
import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import io, pipeline, templates
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.metrics import dice

ORGANS = {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"}
LABELS = {v: {"name": n} for v, n in ORGANS.items()}
RANDOM_SEEDS = (0, 1, 2)
# measured with this file's settings (2026-12-02): start 0.883; one more slice per organ where
# suggested 0.952 (liver .955, kidney_right .958, kidney_left .942, spleen .955); at random
# 0.948 / 0.946 / 0.941 (seeds 0, 1, 2: mean 0.945). Floors 0.03 below; the suggestion must win.
ORGAN_FLOORS = {"liver": 0.92, "kidney_right": 0.92, "kidney_left": 0.91, "spleen": 0.92}
SUGGESTED_FLOOR = 0.92


@pytest.fixture(scope="module")
def p1(shared_data, feature_cache):
    image = io.read_image(shared_data / "chaos_mri" / "image_1.nii.gz")
    reference_image = io.read_labelmap(shared_data / "chaos_mri" / "label_1.nii.gz", image)
    reference = sitk.GetArrayFromImage(reference_image)
    config = PipelineConfig(cache_dir=feature_cache, axis="axial", refine="none", score_stride_cells=1.0)
    backbone = pipeline.build_backbone_for(config)
    prepared = pipeline.prepare_volume(image, config, backbone)
    axis = templates.canonical_axis(image, "axial")

    def run(painted):
        array = templates.make_template(reference, list(ORGANS), axis, sorted(set(painted)))
        template = sitk.GetImageFromArray(array)
        template.CopyInformation(reference_image)
        model = pipeline.train(prepared, template, config, LABELS)
        prediction = pipeline.segment(model, prepared, template, suggestion_count=40)
        labels = sitk.GetArrayFromImage(prediction.labels)
        per_organ = {n: dice(labels == v, reference == v) for v, n in ORGANS.items()}
        return per_organ, prediction

    return image, reference, axis, run


def test_the_suggested_slice_beats_a_random_one(p1):
    image, reference, axis, run = p1
    start = sorted({templates.template_slices(reference, v, axis, 1)[0] for v in ORGANS})
    first, prediction = run(start)
    first = float(np.mean(list(first.values())))
    assert prediction.suggestions, "a run on a volume painted on a few slices must suggest where to paint next"
    # one more slice per organ: the best-ranked suggestion that lists it
    suggested, taken = list(start), set(start)
    for name in ORGANS.values():
        for pick in prediction.suggestions:
            index = image.TransformPhysicalPointToIndex(pick["position_lps"])[2 - axis]
            assert 0 <= index < reference.shape[axis] and pick["score"] > 0
            if name in pick["labels"] and index not in taken:
                suggested.append(index)
                taken.add(index)
                break
    assert len(suggested) > len(start)
    per_organ, _ = run(suggested)
    with_suggested = float(np.mean(list(per_organ.values())))
    randoms = []
    for seed in RANDOM_SEEDS:
        rng = np.random.default_rng(seed)
        painted = set(start)
        for v in ORGANS:
            extent = np.nonzero((reference == v).any(axis=tuple(a for a in range(3) if a != axis)))[0]
            painted.add(int(rng.choice([s for s in extent if s not in painted])))
        randoms.append(float(np.mean(list(run(sorted(painted))[0].values()))))
    print(f"start {first:.4f} suggested {with_suggested:.4f} {per_organ} random {np.round(randoms, 4)}")
    assert with_suggested > first
    assert with_suggested >= SUGGESTED_FLOOR
    assert all(per_organ[name] >= floor for name, floor in ORGAN_FLOORS.items()), per_organ
    assert with_suggested > np.mean(randoms), (with_suggested, randoms)
