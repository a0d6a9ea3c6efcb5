"""Propagation on synthetic volumes whose answer is known to the pixel: score alignment (no
half-stride shift), smoothing across slices, the painted slices kept as painted, axis choice."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FewShotSegmentLib import pipeline
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
    index = pipeline.score_volume(model(LinearAdapter(), smooth_across_mm=0), prepared).index
    expected = np.zeros((512, 512), np.uint8)
    expected[:, 37:] = 1
    for plane in index:
        np.testing.assert_array_equal(plane, expected)


def test_upsampling_keeps_samples_on_their_pixels():
    scores = torch.arange(12, dtype=torch.float32).view(1, 3, 4)        # samples at rows 0,4,8 cols 0,4,8,12
    up = pipeline.upsample_scores(scores, (11, 15), 4)
    assert up.shape == (1, 11, 15)
    np.testing.assert_allclose(up[0, ::4, ::4].numpy(), scores[0].numpy())
    np.testing.assert_allclose(up[0, 9:, 12:].numpy(), scores[0, 2, 3].item())   # beyond the last sample: repeated


def test_a_slice_that_disagrees_with_its_neighbours_is_outvoted_when_smoothing():
    prepared = prepared_volume(n=5, spacing=1.0)
    adapter = LinearAdapter(flipped={2})
    alone = pipeline.score_volume(model(adapter, smooth_across_mm=0), prepared).index
    smoothed = pipeline.score_volume(model(adapter, smooth_across_mm=1.5), prepared).index
    assert alone[2, 0, 100] == 0 and alone[1, 0, 100] == 1
    assert smoothed[2, 0, 100] == 1 and smoothed[2, 0, 10] == 0
    # far-apart slices (7.7 mm MRI) are not smoothed by a 1.5 mm sigma
    assert pipeline.neighbour_weights(1.5, 7.7).tolist() == [1.0]


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
    adaptive = pipeline.adaptive_scores(adapter, prepared.features, 0, 4)
    assert adaptive.shape == full.shape
    assert torch.equal(adaptive.argmax(0), full.argmax(0))
    # inside the blocks and the far background the interpolated scores are the exact ones
    assert torch.allclose(adaptive, full, atol=1e-5)
    assert adapter.asked < 0.5 * asked_full, (adapter.asked, asked_full)
