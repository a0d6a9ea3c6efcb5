"""Body-relative location (location.py) and the component choice by evidence (postprocess.py)."""
import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib import location, pipeline
from FewShotSegmentLib.config import PipelineConfig, resolve_location
from FewShotSegmentLib.errors import InputError
from FewShotSegmentLib.postprocess import (MIN_VOLUME_FRACTION, axial_distance, centre_bounds, choose_components,
                                          is_known_organ, strong_components)


def _phantom():
    """A 'body' (ellipse) on a dark background with a bright blob on the patient's left:
    canonical (z, y, x) LPS, so x grows towards the patient's left."""
    volume = np.zeros((6, 64, 80), np.float32)
    yy, xx = np.ogrid[:64, :80]
    body = ((yy - 32) / 26.0) ** 2 + ((xx - 40) / 34.0) ** 2 <= 1
    volume[:, body] = 0.3
    volume[:, 28:36, 56:64] = 1.0            # left of the patient (larger x in LPS)
    return volume


def test_body_frame_spans_the_body_and_says_left_from_right():
    frame = location.BodyFrame.from_volume(_phantom())
    y0, y1, x0, x1 = frame.boxes[3]
    assert abs(y0 - 6) <= 2 and abs(y1 - 58) <= 2 and abs(x0 - 6) <= 2 and abs(x1 - 74) <= 2
    u, v, _ = frame.coordinates(np.array([[3.0, 32.0, 60.0]]))[0]
    assert 0.4 < u < 0.7 and abs(v) < 0.1       # patient's left, middle front-to-back
    right, = frame.coordinates(np.array([[3.0, 32.0, 20.0]]))[:, 0]
    assert right < -0.4


def test_a_large_slice_is_searched_at_half_resolution_and_gives_the_full_resolution_box():
    big = np.kron(_phantom(), np.ones((1, 8, 8), np.float32))            # 512 x 640 px
    frame = location.BodyFrame.from_volume(big)
    full = location.body_mask(big)[3]
    rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
    # within 1 % of the body's size: the opening's 2 pixels are 4 at half resolution, which trims
    # the narrow tips of the ellipse (a coordinate change of 0.01 in [-1, 1])
    np.testing.assert_allclose(frame.boxes[3], [rows[0], rows[-1], cols[0], cols[-1]], atol=0.01 * big.shape[1])


def test_left_right_comes_from_the_direction_not_the_array_order():
    """The same patient stored with the x axis flipped (RPS instead of LPS, voxels mirrored) puts
    the blob at the same body-relative place: pipeline volumes are reoriented by direction."""
    array = _phantom()
    lps = sitk.GetImageFromArray(array)
    rps = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, ::-1]))
    rps.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    rps.SetOrigin((79.0, 0, 0))
    for image in (lps, rps):
        canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
        frame = location.BodyFrame.from_volume(canonical)
        blob = np.argwhere(canonical > 0.9).astype(float)
        assert frame.coordinates(blob)[:, 0].mean() > 0.4


def test_located_features_append_channels_on_every_axis():
    class Base:
        slice_shape = (64, 80)
        dim = 5

        def sample(self, index, rows, cols):
            import torch
            return torch.zeros(len(rows), 5)

        def __len__(self):
            return 6
    frame = location.BodyFrame.from_volume(_phantom())
    for axis, mode in (("axial", "inplane"), ("coronal", "3d"), ("sagittal", "inplane")):
        feats = location.LocatedFeatures(Base(), frame, axis, mode)
        assert feats.dim == 5 + location.channels(mode)
        assert feats.sample(2, np.array([1, 2]), np.array([3, 4])).shape == (2, feats.dim)
    with pytest.raises(InputError):
        location.LocatedFeatures(Base(), frame, "axial", "sideways")
    with pytest.raises(InputError, match="location must be one of"):
        PipelineConfig(location="sideways").validate()
    with pytest.raises(InputError, match="'inplane' or '3d'"):
        location.LocatedFeatures(Base(), frame, "axial", "auto")


def test_auto_location_is_on_only_for_an_adapter_meant_for_other_volumes():
    assert PipelineConfig().location == "auto"
    assert resolve_location("auto", for_other_volumes=True) == "inplane"
    assert resolve_location("auto", for_other_volumes=False) == "off"
    for mode in ("off", "inplane", "3d"):          # a mode the user chose is kept either way
        assert resolve_location(mode, True) == resolve_location(mode, False) == mode


def _two_blobs():
    mask = np.zeros((10, 40, 40), bool)
    mask[2:8, 5:15, 5:15] = True             # 600 voxels, left part of the image
    mask[2:8, 20:35, 22:38] = True           # 1440 voxels, right part: the larger
    confidence = np.zeros(mask.shape, np.uint8)
    confidence[2:8, 5:15, 5:15] = 230        # 0.90
    confidence[2:8, 20:35, 22:38] = 170      # 0.67
    return mask, confidence


def _position(zyx):
    # body-relative (u, v) as a linear map of the 40x40 image
    return np.stack([zyx[:, 2] / 20 - 1, zyx[:, 1] / 20 - 1], 1)


def test_evidence_not_size_chooses_the_component():
    mask, confidence = _two_blobs()
    expected = (-0.5, -0.5, 0.1, 0.1)          # the template had the label at the small blob's place
    kept, evidence = choose_components(mask, confidence, 1, 20, _position, expected)
    assert kept[4, 10, 10] and not kept[4, 27, 30]
    assert evidence[0]["voxels"] == 600 and evidence[0]["distance"] < 1
    # without location the confidence-weighted size still decides: 1440 x 0.67 > 600 x 0.90
    kept, _ = choose_components(mask, confidence, 1, 20)
    assert kept[4, 27, 30] and not kept[4, 10, 10]


def test_no_convincing_component_means_not_found():
    mask, confidence = _two_blobs()
    far = (0.9, 0.9, 0.05, 0.05)               # the label belongs somewhere neither blob is
    kept, evidence = choose_components(mask, confidence, 1, 20, _position, far)
    assert not kept.any() and evidence == []
    weak = np.where(mask, 140, 0).astype(np.uint8)    # 0.55: barely above the adapter's threshold
    kept, _ = choose_components(mask, weak, 1, 20)
    assert not kept.any()


def test_a_fragment_far_smaller_than_the_painted_organ_is_not_it():
    mask, confidence = _two_blobs()
    expected = (-0.5, -0.5, 0.1, 0.1)          # at the small blob's place (600 voxels)
    organ = 600 / MIN_VOLUME_FRACTION          # the template's estimate: the blob is just big enough
    kept, evidence = choose_components(mask, confidence, 1, 20, _position, expected, painted_volume=organ)
    assert kept[4, 10, 10] and evidence[0]["volume_fraction"] == pytest.approx(MIN_VOLUME_FRACTION)
    kept, evidence = choose_components(mask, confidence, 1, 20, _position, expected, painted_volume=organ * 1.1)
    assert not kept[4, 10, 10] and all(e["voxels"] != 600 for e in evidence)


def test_unknown_labels_keep_strong_unpainted_components():
    mask, confidence = _two_blobs()
    seed = np.zeros(mask.shape, bool)
    seed[4, 27, 30] = True                       # painted on the large blob only
    extra = strong_components(mask, seed, confidence)
    assert extra[4, 10, 10] and not extra[4, 27, 30]      # the sure, unpainted one is added
    confidence[2:8, 5:15, 5:15] = 180
    assert not strong_components(mask, seed, confidence).any()
    assert is_known_organ("liver") and is_known_organ("kidney_right") and is_known_organ("Left lung")
    assert not is_known_organ("Segment_1") and not is_known_organ("lesions") and not is_known_organ("vertebrae")


def test_templates_must_paint_the_same_names():
    image = sitk.GetImageFromArray(_phantom())
    a = np.zeros((6, 64, 80), np.uint8)
    a[3, 20:30, 20:30] = 1
    a[3, 40:50, 50:60] = 2
    template = sitk.GetImageFromArray(a)
    template.CopyInformation(image)
    prepared = pipeline.PreparedVolume(image, None, None, "axial", 0.0, "mri")
    good = pipeline.match_labels([(prepared, template, {1: {"name": "liver"}, 2: {"name": "spleen"}}),
                                  (prepared, template, {2: {"name": "liver"}, 1: {"name": "spleen"}})])
    assert good[0][0] == [1, 2] and good[1][0] == [2, 1]      # matched by name, not by value
    with pytest.raises(InputError, match="every template must paint the same segment names"):
        pipeline.match_labels([(prepared, template, {1: {"name": "liver"}, 2: {"name": "spleen"}}),
                               (prepared, template, {1: {"name": "liver"}, 2: {"name": "kidney"}})])


def test_a_sliver_far_smaller_than_the_painted_organ_is_not_the_organ():
    mask, confidence = _two_blobs()
    confidence[2:8, 20:35, 22:38] = 230
    # largest cross-sections: 100 px (small blob) and 240 px (large blob); painted organ 500 px
    kept, evidence = choose_components(mask, confidence, 2, 20, painted_area=500.0)
    assert kept[4, 27, 30] and not kept[4, 10, 10]
    assert [e["area_fraction"] for e in evidence] == [0.48]
    kept, _ = choose_components(mask, confidence, 1, 20, painted_area=1000.0)
    assert not kept.any()
    # the cross-section is taken along the propagation axis: along x the small blob is 60 px
    kept, evidence = choose_components(mask, confidence, 2, 20, painted_area=100.0, slice_axis=2)
    assert sorted(e["area_fraction"] for e in evidence) == [0.6, 0.9]


def test_where_the_other_labels_were_found_along_the_scan_chooses_the_component():
    mask = np.zeros((40, 30, 30), bool)
    mask[2:10, 5:15, 5:15] = True            # low in the scan, the larger: 800 voxels
    mask[25:32, 5:15, 5:15] = True           # high: 700 voxels, the same place in-plane
    confidence = np.where(mask, 230, 0).astype(np.uint8)
    kept, _ = choose_components(mask, confidence, 1, 20)
    assert kept[5, 10, 10] and not kept[28, 10, 10]
    # another label found centred on slice 20; the template had this one 8 slices above it
    anchors = [(20.0, 8.0, 6.0)]
    kept, evidence = choose_components(mask, confidence, 1, 20, anchors=anchors)
    assert kept[28, 10, 10] and not kept[5, 10, 10]
    assert evidence[0]["axial_distance"] == 0.0              # slices 25-31: centre 28 = 20 + 8
    # two anchors agree, one found in the wrong place: the median of the three still decides
    kept, _ = choose_components(mask, confidence, 1, 20, anchors=anchors * 2 + [(-10.0, 8.0, 6.0)])
    assert kept[28, 10, 10] and not kept[5, 10, 10]
    # too far from everything the template says: not found
    kept, _ = choose_components(mask, confidence, 1, 20, anchors=[(60.0, 8.0, 3.0)])
    assert not kept.any()


def test_the_place_expected_in_plane_follows_where_the_other_labels_were_found():
    """Another patient's body frame shifts every organ alike (CHAOS P2's lie 0.1-0.25 further back
    than P8's): the expected place comes from the labels found and the template's offsets."""
    template = {1: [-0.6, 0.0, 0.2, 0.2], 2: [0.4, 0.3, 0.1, 0.1], 3: [0.8, 0.1, 0.1, 0.1]}
    shift = np.array([0.05, 0.25])
    found = {1: np.array([-0.6, 0.0]) + shift, 2: np.array([0.4, 0.3]) + shift}
    expected = pipeline.relative_place(3, template, found)
    np.testing.assert_allclose(expected, [0.85, 0.35, 0.1, 0.1])
    # one of three labels found in the wrong place: the median still follows the two that agree
    found[4], template[4] = np.array([0.9, -0.9]), [0.0, 0.0, 0.1, 0.1]
    np.testing.assert_allclose(pipeline.relative_place(3, template, found)[:2], [0.85, 0.35])
    # nothing else found, or a label the template does not place: the body frame alone
    assert pipeline.relative_place(3, template, {3: np.zeros(2)}) is None
    assert pipeline.relative_place(5, template, found) is None
    # and the component at the shifted place wins over one at the template's absolute place
    mask, confidence = _two_blobs()
    absolute = (-0.5, -0.5, 0.1, 0.1)                      # the small blob's place
    kept, _ = choose_components(mask, confidence, 1, 20, _position, absolute)
    assert kept[4, 10, 10]
    shifted = pipeline.relative_place(1, {1: list(absolute), 2: [-0.6, -0.6, 0.1, 0.1]},
                                      {2: np.array([0.4, 0.4])})
    kept, _ = choose_components(mask, confidence, 1, 20, _position, shifted)
    assert kept[4, 27, 30] and not kept[4, 10, 10]


def test_a_structure_cut_by_the_scan_has_only_a_bound_for_its_centre():
    """A slab holds every organ on all of its slices: their centres there are not where the
    template's offsets put them. A structure seen over less than its painted span and cut by the
    scan's end continues beyond it: its centre is a bound."""
    assert centre_bounds(3, 9, 20, 10.0) == (6.0, 6.0)          # ends inside the scan
    assert centre_bounds(0, 9, 20, 10.0) == (-np.inf, 4.5)      # cut at the start: may reach lower
    assert centre_bounds(3, 19, 20, 20.0) == (11.0, np.inf)
    assert centre_bounds(0, 4, 5, 8.0) == (-np.inf, np.inf)     # fills a slab shorter than the organ
    # seen over its painted span (or a false extension running to the scan's end): its centre
    assert centre_bounds(0, 12, 20, 10.0) == (6.0, 6.0)
    assert centre_bounds(0, 4, 5) == (2.0, 2.0)                 # span unknown
    # the template: 8 slices above the anchor; anchor and component both fill a 5-slice slab
    assert axial_distance(centre_bounds(0, 4, 5, 8.0), [(centre_bounds(0, 4, 5, 8.0), 8.0, 4.0)]) == 0.0
    # seen whole, 2 slices above an anchor that ends inside: 6 slices short of the template
    assert axial_distance(12.0, [(10.0, 8.0, 3.0)]) == 2.0
    # ...the same anchor cut by the scan's start may lie lower: no shortfall
    assert axial_distance(12.0, [((-np.inf, 10.0), 8.0, 3.0)]) == 0.0
    # ...but a component cut by the scan's start may lie lower still, never higher
    assert axial_distance((-np.inf, 12.0), [(10.0, 8.0, 3.0)]) == 2.0
    mask = np.zeros((5, 30, 30), bool)
    mask[:, 5:15, 5:15] = True
    confidence = np.where(mask, 230, 0).astype(np.uint8)
    anchors = [(centre_bounds(0, 4, 5, 8.0), 8.0, 1.0)]
    kept, evidence = choose_components(mask, confidence, 1, 20, anchors=anchors, painted_span=8.0)
    assert kept.any() and evidence[0]["axial_distance"] == 0.0
    # an anchor seen whole at the slab's centre: the component, cut by both ends, may lie 8 above
    kept, _ = choose_components(mask, confidence, 1, 20, anchors=[(2.0, 8.0, 1.0)], painted_span=8.0)
    assert kept.any()
    kept, _ = choose_components(mask, confidence, 1, 20, anchors=[(2.0, 8.0, 1.0)])   # span unknown: 8 away
    assert not kept.any()
