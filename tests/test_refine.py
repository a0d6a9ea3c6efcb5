"""Box refinement (refine.py) on real LiteMedSAM embeddings: each label's components prompted
with boxes, SAM's answer kept within each box, the highest logit winning between labels (the
whole-slice definition, computed here the long way), and a second refinement of the same labels
answered from the volume's decoded boxes."""
import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import io, pipeline, refine
from FewShotSegmentLib.errors import Cancelled
from FewShotSegmentLib.backbones import build_backbone
from FewShotSegmentLib.features import encode_volume, slices_along
from FewShotSegmentLib.preprocessing import normalize_volume

SAMPLE = "FewShotSegment/Resources/SampleData/"
SLICES = slice(60, 63)


@pytest.fixture(scope="module")
def slices_and_labels():
    image = io.read_image(SAMPLE + "example_ct.nii.gz")
    labels = io.read_labelmap(SAMPLE + "example_seg_fast_force_split.nii.gz", reference=image)
    volume = normalize_volume(sitk.GetArrayFromImage(pipeline._to_canonical(image)), "ct", "abdomen")
    label_volume = sitk.GetArrayFromImage(pipeline._to_canonical(labels))
    slices01 = np.ascontiguousarray(slices_along(volume, "axial")[SLICES], dtype=np.float32)
    stack = slices_along(label_volume, "axial")[SLICES]
    values = [v for v in np.unique(stack) if v][:4]
    index = np.zeros(stack.shape, np.uint8)
    for k, v in enumerate(values, start=1):
        index[stack == v] = k
    features = encode_volume(slices01, build_backbone("litemedsam", device="cpu", precision="fp32", compile="off"))
    return slices01, index, features


def _whole_slice_refinement(plane, refiner, features, index):
    """Every prompt's logits on the whole slice, -inf outside its box; the highest logit > 0 wins."""
    result, best = np.zeros_like(plane), np.zeros(plane.shape, np.float32)
    rng = np.random.default_rng(0)
    for value in sorted(set(np.unique(plane).tolist()) - {0}):
        for box, _ in refine.component_prompts(plane == value, "box", 10, rng):
            logit = np.full(plane.shape, -np.inf, np.float32)
            region = refine.box_region(box)
            logit[region] = refiner.box_logits(features.sam_embeddings[index], features.scale, plane.shape,
                                               box[None])[0][region]
            win = logit > best
            result[win], best[win] = value, logit[win]
    return result


def test_box_refinement_is_the_whole_slice_definition_and_reuses_decoded_boxes(slices_and_labels):
    slices01, index, features = slices_and_labels
    assert len(np.unique(index)) >= 3                      # several labels compete on these slices
    refined = refine.refine_label_slices(index, features, slices01)
    refiner = refine.LiteMedSAMRefiner()
    for i in range(len(index)):
        assert np.array_equal(refined[i], _whole_slice_refinement(index[i], refiner, features, i))
    cache = refine.DecodedBoxes.of(features)
    misses = cache.misses
    again = refine.refine_label_slices(index, features, slices01)
    assert cache.misses == misses and cache.hits >= misses      # every box answered from memory
    assert np.array_equal(again, refined)


def test_slice_workers_refine_as_one_after_another_and_cancel(slices_and_labels, monkeypatch):
    slices01, index, features = slices_and_labels
    previous = features.decoded_boxes if hasattr(features, "decoded_boxes") else None
    try:
        features.decoded_boxes = None                  # every box decoded again, not remembered
        monkeypatch.setenv("FEWSHOT_SMALL_OP_THREADS", "1")
        alone = refine.refine_label_slices(index, features, slices01)
        features.decoded_boxes = None
        monkeypatch.setenv("FEWSHOT_SMALL_OP_THREADS", "2")
        reported = []
        together = refine.refine_label_slices(index, features, slices01, progress=lambda f, m: reported.append(f))
        assert np.array_equal(together, alone)
        assert reported == [pytest.approx((i + 1) / len(index)) for i in range(len(index))]
        features.decoded_boxes = None
        asked = []
        with pytest.raises(Cancelled):
            refine.refine_label_slices(index, features, slices01, progress=lambda f, m: asked.append(f),
                                       cancel=lambda: len(asked) >= 2)
        assert len(asked) == 2
    finally:
        features.decoded_boxes = previous
