"""Encoding on demand (features.py): a slice is encoded when first read, a block of batch-size
slices at a time, with the same features as encoding the whole volume; a cache entry keeps what
was encoded and which slices are still missing; a propagation that reaches only part of the
volume encodes only that part and gives the same labels."""
import json

import numpy as np
import SimpleITK as sitk
import torch

from FewShotSegmentLib import pipeline
from FewShotSegmentLib.backbones import Encoded
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.features import encode_volume


class CountingBackbone:
    """A stand-in encoder (2 channels: the slice's mean and its index-independent max, on an 8x8
    grid) that records which slices it was given: what matters here is which slices are encoded
    and that each slice's features depend on that slice only."""
    id = cache_tag = "counting"
    provides_sam_embeddings = False

    def __init__(self):
        self.seen = []

    def encode(self, slices):
        slices = torch.from_numpy(np.asarray(slices, np.float32))
        self.seen.extend(float(s[0, 0]) for s in slices)     # slice i is filled with i / 100
        grid = torch.nn.functional.adaptive_avg_pool2d(slices[:, None], 8)
        features = torch.cat([grid, grid * 2], 1).half()
        return Encoded(features=features, scale=8 / slices.shape[-1], frame=(8, 8))


def _slices(n=21, size=16):
    return np.stack([np.full((size, size), i / 100, np.float32) for i in range(n)])


def _encoded_indices(backbone):
    return sorted({round(v * 100) for v in backbone.seen})


def test_slices_are_encoded_when_first_read_with_the_same_features():
    slices = _slices()
    whole = encode_volume(slices, CountingBackbone(), batch_size=4)
    backbone = CountingBackbone()
    lazy = encode_volume(slices, backbone, batch_size=4, on_demand=True)
    assert _encoded_indices(backbone) == [8, 9, 10, 11]           # the middle block: the grids' shape
    assert lazy.encoded.sum() == 4 and lazy.encoder_seconds == 0.0
    torch.testing.assert_close(lazy.sample(13, np.array([3]), np.array([5])),
                               whole.sample(13, np.array([3]), np.array([5])))
    assert _encoded_indices(backbone) == list(range(8, 16))       # slice 13's block, whole
    lazy.ensure([20])                                            # the last, short block is padded
    assert lazy.encoded[20] and not lazy.encoded[:8].any() and lazy.encoder_seconds > 0
    torch.testing.assert_close(lazy.grid, whole.features)         # everything, when all is asked for
    assert lazy.encoded.all()


def test_a_cache_entry_keeps_what_was_encoded_and_fills_the_rest_later(tmp_path):
    slices = _slices()
    first = CountingBackbone()
    lazy = encode_volume(slices, first, batch_size=4, cache_dir=tmp_path, on_demand=True)
    lazy.ensure([0])
    (entry,) = tmp_path.iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["missing"] == [i for i in range(21) if not (i < 4 or 8 <= i < 12)]
    second = CountingBackbone()                                  # a later job on the same volume
    again = encode_volume(slices, second, batch_size=4, cache_dir=tmp_path, on_demand=True)
    assert second.seen == [] and again.encoded.sum() == 8
    again.ensure([17])
    assert _encoded_indices(second) == [16, 17, 18, 19]
    third = CountingBackbone()                                   # a job that needs every slice
    whole = encode_volume(slices, third, batch_size=4, cache_dir=tmp_path)
    assert _encoded_indices(third) == [4, 5, 6, 7, 12, 13, 14, 15, 20]
    assert "missing" not in json.loads((entry / "meta.json").read_text())
    torch.testing.assert_close(whole.features, encode_volume(slices, CountingBackbone(), batch_size=4).features)
    assert encode_volume(slices, CountingBackbone(), batch_size=4, cache_dir=tmp_path).encoder is None


class OrganAdapter:
    """Label 1 where the slice index lies in ``organ`` (rows and columns 4-11), background
    elsewhere; it reads each slice's features, as a real adapter does."""
    n_labels = 1
    kind = "organ"

    def __init__(self, organ):
        self.organ = organ

    def score_slice(self, features, index, stride):
        features.sample(index, np.array([0]), np.array([0]))
        h, w = features.slice_shape
        rows, cols = np.arange(0, h, stride), np.arange(0, w, stride)
        inside = torch.zeros(len(rows), len(cols))
        if index in self.organ:
            inside[np.ix_((rows >= 4) & (rows < 12), (cols >= 4) & (cols < 12))] = 1
        return torch.stack([1 - inside, inside])

    def score_pixels(self, features, index, rows, cols):
        return self.score_slice(features, index, 1)[:, rows, cols]


def _segment(on_demand: bool):
    n, size = 40, 16
    image = sitk.GetImageFromArray(np.zeros((n, size, size), np.float32))
    image.SetSpacing((1.0, 1.0, 3.0))
    backbone = CountingBackbone()
    features = encode_volume(_slices(n, size), backbone, batch_size=4, on_demand=on_demand)
    prepared = pipeline.PreparedVolume(image, _slices(n, size), features, "axial", 0.0)
    organ = range(22, 31)
    template = np.zeros((n, size, size), np.uint8)
    template[26, 4:12, 4:12] = 1
    painting = sitk.GetImageFromArray(template)
    painting.CopyInformation(image)
    config = PipelineConfig(refine="none", landmarks=False, adaptive_scoring=False, encode_on_demand=on_demand)
    model = pipeline.TrainedModel(OrganAdapter(organ), config, [1], {1: {"name": "liver", "color": [1, 0, 0]}},
                                  "counting")
    prediction = pipeline.segment(model, prepared, painting)
    return sitk.GetArrayFromImage(prediction.labels), prediction, _encoded_indices(backbone)


def test_a_propagation_encodes_only_the_slices_it_reaches_and_labels_the_same():
    lazy, prediction, encoded = _segment(True)
    whole, _, everything = _segment(False)
    np.testing.assert_array_equal(lazy, whole)
    assert lazy[22:31, 4:12, 4:12].all() and lazy.sum() == 9 * 64
    assert everything == list(range(40))
    # the organ's slices and the one beyond each end that stops the sweep, with their smoothing
    # neighbours, in whole blocks of 4: slices 16-35 (the middle block, 20-23, among them)
    assert encoded == list(range(16, 36)), encoded
    assert prediction.summary["timings"]["encode_s"] > 0


def test_encoding_all_at_once_reports_each_block_and_a_cancel_keeps_no_entry(tmp_path):
    import pytest

    from FewShotSegmentLib.errors import Cancelled

    slices = _slices()
    reports = []
    backbone = CountingBackbone()
    whole = encode_volume(slices, backbone, batch_size=4, progress=lambda f, s, m: reports.append((f, m)))
    assert len(backbone.seen) == 24                     # 6 blocks of 4, the last one padded
    assert [round(f, 3) for f, _ in reports] == [round(b / 6, 3) for b in range(1, 7)]
    assert reports[-1][1] == "encoded slice 21/21" and whole.encoder is None

    calls = []
    with pytest.raises(Cancelled):
        encode_volume(slices, CountingBackbone(), batch_size=4, cache_dir=tmp_path,
                      cancel=lambda: calls.append(1) or len(calls) > 3)
    assert not any(tmp_path.iterdir())                  # a cancelled encoding leaves no cache entry


def test_with_a_step_only_the_lattice_is_encoded_and_slices_between_read_it_interpolated():
    from FewShotSegmentLib.features import encoding_lattice

    slices = _slices()
    whole = encode_volume(slices, CountingBackbone(), batch_size=4)
    backbone = CountingBackbone()
    lazy = encode_volume(slices, backbone, batch_size=4, on_demand=True, step=2)
    assert list(encoding_lattice(21, 2)) == list(range(0, 21, 2)) and list(encoding_lattice(20, 3)) == [0, 3, 6, 9, 12, 15, 18, 19]
    assert _encoded_indices(backbone) == [8, 10, 12, 14]     # the lattice block holding the middle slice
    between = lazy.slice_grid(13)
    assert _encoded_indices(backbone) == [8, 10, 12, 14]     # slice 13 is read from 12 and 14, never encoded
    torch.testing.assert_close(between, ((whole.features[12:13].float() + whole.features[14:15].float()) / 2).half())
    torch.testing.assert_close(lazy.slice_grid(12), whole.features[12:13])     # the lattice: exact
    lazy.ensure([19])                                         # 18 and 20: the last lattice block, padded
    assert _encoded_indices(backbone) == [8, 10, 12, 14, 16, 18, 20]

    before = lazy.sample(13, np.array([3]), np.array([5]))
    lazy.keep_exact([13])                                     # a painted slice: training reads its own pixels
    assert 13 in _encoded_indices(backbone) and lazy.encoded[13]
    torch.testing.assert_close(lazy.slice_grid(13), whole.features[13:14])
    version = lazy.version
    lazy.keep_exact([5])                                      # another painting: 13 is interpolated again
    assert lazy.version > version and 5 in _encoded_indices(backbone)
    torch.testing.assert_close(lazy.slice_grid(13), between)
    torch.testing.assert_close(lazy.sample(13, np.array([3]), np.array([5])), before)   # no stale copy kept
    torch.testing.assert_close(lazy.grid[1::2].float(),     # every slice, 5 exact, the rest interpolated
                               (whole.features[0:-1:2].float() + whole.features[2::2].float()) / 2, atol=1e-3, rtol=0)


def test_the_step_follows_the_slice_spacing_against_the_feature_cell():
    from FewShotSegmentLib.features import MAX_STEP, encoding_step

    assert encoding_step(5.7, 1.12) == 2            # LiteMedSAM on a 512x512 CT of 0.7 mm pixels, 1.1 mm slices
    assert encoding_step(5.7, 3.0) == 1             # the demo CT (3 mm)
    assert encoding_step(5.0, 7.7) == 1             # CHAOS MRI
    assert encoding_step(5.6, 0.5) == MAX_STEP      # never more than every MAX_STEP-th slice
    assert encoding_step(5.7, 1.12, asked=1) == 1 and encoding_step(5.0, 7.7, asked=3) == 3
    assert encoding_step(0.0, 1.0) == 1             # a backbone that names no cell
