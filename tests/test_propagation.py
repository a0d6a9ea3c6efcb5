"""Propagation on synthetic volumes whose answer is known to the pixel: score alignment (no
half-stride shift), smoothing across slices, the painted slices kept as painted, axis choice."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSegmentLib import pipeline, propagation
from FewShotSegmentLib.adapters.base import Adapter
from FewShotSegmentLib.backbones import Encoded
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.features import VolumeFeatures

EDGE = 36.5   # the label begins between columns 36 and 37


class LinearAdapter(Adapter):
    """Label 1 scores (column - EDGE) on the pixels it is asked about, background 0 (a linear
    function, so interpolating between samples is exact and the answer is known to the pixel);
    slice ``flipped`` says the opposite, to test smoothing across slices."""
    kind = "linear"

    def __init__(self, flipped=()):
        super().__init__()
        self.n_labels, self.flipped = 1, set(flipped)

    def score_pixels(self, features, index, rows, cols):
        score = (torch.as_tensor(cols, dtype=torch.float32) - EDGE) * (-1 if index in self.flipped else 1)
        return torch.stack([torch.zeros_like(score), score])


def prepared_volume(n=5, size=512, spacing=1.0):
    """A PreparedVolume of ``n`` blank 512x512 slices with LiteMedSAM-like feature geometry
    (64x64 grid over a 256 frame, so propagation scores every 4th pixel)."""
    image = sitk.Image(size, size, n, sitk.sitkFloat32)
    image.SetSpacing((0.8, 0.8, spacing))
    encoded = Encoded(features=torch.zeros(n, 1, 64, 64, dtype=torch.float16), scale=256 / size, frame=(256, 256))
    return pipeline.PreparedVolume(image, np.zeros((n, size, size), np.float32),
                                   VolumeFeatures(encoded, (size, size)), "axial", 0.0)


def model(adapter, **config):
    return pipeline.TrainedModel(adapter, PipelineConfig(refine="none", landmarks=False, **config), [1],
                                 {1: {"name": "thing", "color": [1, 0, 0]}}, "test")


def test_scores_are_not_shifted_by_the_sampling_stride():
    prepared = prepared_volume()
    index = propagation.score_volume(model(LinearAdapter(), smooth_across_mm=0), prepared).index
    expected = np.zeros((512, 512), np.uint8)
    expected[:, 37:] = 1
    for plane in index:
        np.testing.assert_array_equal(plane, expected)


def test_upsampling_keeps_samples_on_their_pixels():
    scores = torch.arange(12, dtype=torch.float32).view(1, 3, 4)        # samples at rows 0,4,8 cols 0,4,8,12
    up = propagation.upsample_scores(scores, (11, 15), 4)
    assert up.shape == (1, 11, 15)
    np.testing.assert_allclose(up[0, ::4, ::4].numpy(), scores[0].numpy())
    np.testing.assert_allclose(up[0, 9:, 12:].numpy(), scores[0, 2, 3].item())   # beyond the last sample: repeated


def test_a_slice_that_disagrees_with_its_neighbours_is_outvoted_when_smoothing():
    prepared = prepared_volume(n=5, spacing=1.0)
    adapter = LinearAdapter(flipped={2})
    alone = propagation.score_volume(model(adapter, smooth_across_mm=0), prepared).index
    smoothed = propagation.score_volume(model(adapter, smooth_across_mm=1.5), prepared).index
    assert alone[2, 0, 100] == 0 and alone[1, 0, 100] == 1
    assert smoothed[2, 0, 100] == 1 and smoothed[2, 0, 10] == 0
    # far-apart slices (7.7 mm MRI) are not smoothed by a 1.5 mm sigma
    assert propagation.neighbour_weights(1.5, 7.7).tolist() == [1.0]


def test_painted_slices_come_back_exactly_as_painted():
    prepared = prepared_volume(n=4)
    template = np.zeros((4, 512, 512), np.uint16)
    template[1, 100:200, 300:400] = 7          # painted where the adapter says "no" (cols < 37 are 0...)
    template[1, 100:200, 0:30] = 7
    # slice 1 is painted: its unpainted part is background even where the adapter says "thing"
    image = sitk.GetImageFromArray(template)
    image.CopyInformation(prepared.image)
    trained = pipeline.TrainedModel(LinearAdapter(), PipelineConfig(refine="none", landmarks=False,
                                                                    smooth_across_mm=0), [7],
                                    {7: {"name": "thing", "color": [1, 0, 0]}}, "test")
    result = sitk.GetArrayFromImage(pipeline.segment(trained, prepared, image).labels)
    np.testing.assert_array_equal(result[1], template[1])
    assert (result[[0, 2, 3]][:, :, 37:] == 7).all()


def test_axis_auto_follows_the_painting_and_stack_follows_the_acquisition():
    image = sitk.Image(40, 30, 20, sitk.sitkInt16)
    template = sitk.Image(40, 30, 20, sitk.sitkUInt8)
    template.CopyInformation(image)
    template[5:20, 5:20, 7] = 1                               # one axial slice painted (index z = 7)
    assert pipeline.resolve_axis("auto", image, template) == "axial"
    coronal = sitk.Image(template.GetSize(), sitk.sitkUInt8)
    coronal.CopyInformation(image)
    coronal[5:20, 12, 3:9] = 1                                # one coronal slice (index y = 12)
    assert pipeline.resolve_axis("auto", image, coronal) == "coronal"
    # an oblique stack, tilted 60 degrees about left-right: its slices are closest to coronal
    c, s = np.cos(np.radians(60)), np.sin(np.radians(60))
    image.SetDirection((1, 0, 0, 0, c, -s, 0, s, c))
    assert pipeline.resolve_axis("stack", image) == "coronal"
    assert pipeline.resolve_axis("auto", image) == "coronal"
    assert pipeline.resolve_axis("sagittal", image) == "sagittal"


def test_adapter_for_one_axis_refuses_a_volume_prepared_along_another():
    prepared = prepared_volume(n=3)
    trained = model(LinearAdapter(), axis="coronal")
    with pytest.raises(Exception, match="coronal"):
        pipeline.segment(trained, prepared)


class BlockAdapter(Adapter):
    """Two labels in blocks of a slice (and a smooth lukewarm ramp elsewhere), so the exact
    answer at every point is known."""
    kind = "blocks"

    def __init__(self):
        super().__init__()
        self.n_labels = 2
        self.asked = 0

    def score_pixels(self, features, index, rows, cols):
        rows, cols = torch.as_tensor(rows, dtype=torch.float32), torch.as_tensor(cols, dtype=torch.float32)
        self.asked += len(rows)
        one = ((rows >= 100) & (rows < 180) & (cols >= 60) & (cols < 200)).float()
        two = ((rows >= 300) & (rows < 330) & (cols >= 310) & (cols < 420)).float() * 0.9
        return torch.stack([torch.full_like(rows, 0.5), one + 0.3 * cols / 512, two])


def test_coarse_to_fine_scoring_gives_the_full_grid_answer_with_less_work():
    prepared = prepared_volume(n=1)
    adapter = BlockAdapter()
    full = adapter.score_slice(prepared.features, 0, 4)
    asked_full, adapter.asked = adapter.asked, 0
    adaptive = propagation.adaptive_scores(adapter, prepared.features, 0, 4)
    assert adaptive.shape == full.shape
    assert torch.equal(adaptive.argmax(0), full.argmax(0))
    # inside the blocks and the far background the interpolated scores are the exact ones
    assert torch.allclose(adaptive, full, atol=1e-5)
    assert adapter.asked < 0.5 * asked_full, (adapter.asked, asked_full)


class VolumeAdapter(Adapter):
    """Label 1 exactly where ``truth`` (N, H, W) says, background 0.5 elsewhere; records the
    slices it is asked about."""
    kind = "volume"

    def __init__(self, truth):
        super().__init__()
        self.n_labels, self.truth, self.slices = 1, torch.from_numpy(truth.astype(np.float32)), set()

    def score_pixels(self, features, index, rows, cols):
        self.slices.add(index)
        label = self.truth[index][torch.as_tensor(rows), torch.as_tensor(cols)]
        return torch.stack([torch.full_like(label, 0.5), label])


def _segment_blocks(truth, painted_slice, **config):
    """segment() of a 'liver' whose adapter answers ``truth``, painted on one slice."""
    n, size = truth.shape[0], truth.shape[1]
    prepared = prepared_volume(n=n, size=size, spacing=2.0)
    template = np.zeros(truth.shape, np.uint8)
    template[painted_slice] = truth[painted_slice]
    image = sitk.GetImageFromArray(template)
    image.CopyInformation(prepared.image)
    adapter = VolumeAdapter(truth)
    config = {"refine": "none", "landmarks": False, "smooth_across_mm": 3.0, **config}
    trained = pipeline.TrainedModel(adapter, PipelineConfig(**config), [1],
                                    {1: {"name": "liver", "color": [1, 0, 0]}}, "test")
    prediction = pipeline.segment(trained, prepared, image)
    return sitk.GetArrayFromImage(prediction.labels), prediction, adapter.slices


def test_only_slices_the_painting_can_reach_are_scored_and_the_result_is_the_same():
    truth = np.zeros((24, 64, 64), np.uint8)
    truth[4:13, 10:30, 10:30] = 1          # the organ, painted on slice 8
    truth[17:21, 40:60, 40:60] = 1         # a false positive elsewhere, which the clean-up drops
    reach, prediction, asked = _segment_blocks(truth, 8)
    every, full, asked_all = _segment_blocks(truth, 8, reachable_only=False)
    np.testing.assert_array_equal(reach, every)
    np.testing.assert_array_equal(reach[4:13], truth[4:13])
    assert not reach[17:21].any()
    assert prediction.suggestions == full.suggestions
    np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction.uncertainty)[:16],
                                  sitk.GetArrayFromImage(full.uncertainty)[:16])
    assert asked_all == set(range(24))
    assert prediction.summary["scored_slices"] < 20 and not asked & set(range(19, 24)), sorted(asked)


def test_a_component_that_turns_back_towards_unscored_slices_is_followed():
    # from the painting (slice 2) up column A to slice 10, across, down column E to slice 6,
    # across, and up column G beyond slice 10: slice by slice, the sweep loses the path at
    # slice 11 (nothing there touches what it followed); the 3D clean-up sees G reach the last
    # scored slice and the rest is scored
    truth = np.zeros((24, 64, 64), np.uint8)
    truth[2:11, 10:20, 5:10] = 1           # A
    truth[10, 10:20, 5:30] = 1             # bridge A-E
    truth[6:11, 10:20, 25:30] = 1          # E
    truth[6, 10:20, 25:45] = 1             # bridge E-G
    truth[6:20, 10:20, 40:45] = 1          # G
    # no smoothing across slices: it would blur the one-slice bridges away
    reach, prediction, asked = _segment_blocks(truth, 2, cut_regrowth=False, smooth_across_mm=0)
    every, _, _ = _segment_blocks(truth, 2, cut_regrowth=False, smooth_across_mm=0, reachable_only=False)
    np.testing.assert_array_equal(reach, every)
    assert reach[12:20, 10:20, 40:45].all()
    assert asked == set(range(24))        # the fallback scored the rest


def test_connected_next_keeps_exactly_the_components_touching_the_reach():
    """The sweep's step, looked at within each label's box: the same pixels as the whole-slice
    definition (every component of a label that touches its reach grown by one pixel), on
    random label maps with labels at the slice's edges."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    eight = np.ones((3, 3), bool)
    for trial in range(30):
        labels = ndimage.median_filter(rng.integers(0, 4, (60, 70)), 5).astype(np.uint8)
        reach = np.where(rng.random((60, 70)) < 0.02, rng.integers(1, 5, (60, 70)), 0).astype(np.uint8)
        expected = np.zeros_like(reach)
        for k in range(1, 5):
            components, _ = ndimage.label(labels == k, eight)
            hit = np.unique(components[ndimage.binary_dilation(reach == k, eight)])
            expected[np.isin(components, hit[hit > 0])] = k
        assert np.array_equal(propagation._connected_next(labels, reach), expected)
    assert expected.any()


def test_slices_scored_side_by_side_decide_as_one_after_another(monkeypatch):
    """Raw scores computed ahead by slice workers (SliceDecisions.prefetch, one torch thread
    each) give every decision bit for bit, on the whole volume and in the painting's sweeps."""
    import threading

    from FewShotSegmentLib.adapters.base import TrainingPixels
    from FewShotSegmentLib.adapters.contrastive import ContrastiveAdapter

    n, size = 14, 128
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(n, 8, 64, 64, generator=gen)
    grid[:, :, 20:44, 20:44] += 2.0                   # an "organ" across the middle slices
    grid[:3] -= 2.0 * (grid[:3] > 1)
    encoded = Encoded(features=grid.half(), scale=256 / size, frame=(256, 256))
    image = sitk.Image(size, size, n, sitk.sitkFloat32)
    prepared = pipeline.PreparedVolume(image, np.zeros((n, size, size), np.float32),
                                       VolumeFeatures(encoded, (size, size)), "axial", 0.0)
    inside = torch.zeros(64, 64, dtype=torch.long)
    inside[22:42, 22:42] = 1
    pixels = TrainingPixels(grid[7].flatten(1).T.float(), inside.flatten())
    adapter = ContrastiveAdapter(steps=40, batch=256, hidden=32, embed=16)
    adapter.fit(pixels)
    trained = model(adapter, smooth_across_mm=1.5)
    seeds = np.zeros((n, size, size), np.uint8)
    seeds[7, 50:80, 50:80] = 1
    scorers = set()
    score = adapter._score

    def recording(*args):
        scorers.add(threading.get_ident())
        return score(*args)
    monkeypatch.setattr(adapter, "_score", recording)
    results = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("FEWSHOT_SMALL_OP_THREADS", workers)
        for reach in (None, seeds):
            scores = propagation.score_volume(trained, prepared, reach_from=reach)
            results[workers, reach is None] = scores
    assert len(scorers - {threading.get_ident()}) == 2      # two slice workers did score
    for whole in (True, False):
        one, two = results["1", whole], results["2", whole]
        np.testing.assert_array_equal(one.scored, two.scored)
        for name in ("index", "runner_up", "uncertainty", "confidence"):
            np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert results["1", True].index[5:10].any()              # not a blank answer
