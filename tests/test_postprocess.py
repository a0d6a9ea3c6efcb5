"""postprocess: connected-component clean-up on small arrays where the answer is obvious, and on
real CHAOS labels with added false positives."""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from FewShotSegmentLib.errors import InputError
from FewShotSegmentLib.postprocess import clean_label, clean_label_map, default_keep


def _blobs():
    """Three separate cubes: big (27 voxels), medium (8), small (1)."""
    mask = np.zeros((10, 10, 10), bool)
    mask[0:3, 0:3, 0:3] = True
    mask[6:8, 6:8, 6:8] = True
    mask[9, 0, 9] = True
    return mask


def test_keep_largest_without_seed():
    mask = _blobs()
    kept = clean_label(mask, None, keep=1, min_voxels=1)
    assert kept.sum() == 27 and kept[1, 1, 1]
    kept = clean_label(mask, None, keep=2, min_voxels=1)
    assert kept.sum() == 27 + 8
    assert clean_label(mask, None, keep=5, min_voxels=1).sum() == 36


def test_seeded_component_wins_over_a_larger_one():
    mask = _blobs()
    seed = np.zeros_like(mask)
    seed[7, 7, 7] = True  # the user painted the medium cube
    kept = clean_label(mask, seed, keep=1, min_voxels=1)
    assert kept.sum() == 8 and kept[6, 6, 6] and not kept[0, 0, 0]
    # keep=2: the seeded one plus the largest other
    assert clean_label(mask, seed, keep=2, min_voxels=1).sum() == 8 + 27
    # a seeded component is kept even when below min_voxels
    seed[:] = False
    seed[9, 0, 9] = True
    kept = clean_label(mask, seed, keep=1, min_voxels=20)
    assert kept.sum() == 1 and kept[9, 0, 9]


def test_min_voxels_drops_small_unseeded_components():
    mask = _blobs()
    assert clean_label(mask, None, keep=3, min_voxels=8).sum() == 27 + 8
    assert clean_label(mask, None, keep=3, min_voxels=28).sum() == 0


def test_corner_contact_joins_components_26_connectivity():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal chain across slices
    mask[3, 0, 3] = True
    kept = clean_label(mask, None, keep=1, min_voxels=1)
    assert kept.sum() == 3 and not kept[3, 0, 3]


def test_bad_arguments():
    with pytest.raises(InputError, match="3D"):
        clean_label(np.ones((4, 4), bool))
    with pytest.raises(InputError, match="keep"):
        clean_label(_blobs(), keep=0)
    with pytest.raises(InputError, match="seed shape"):
        clean_label(_blobs(), np.ones((2, 2, 2), bool))


def test_label_maps_of_any_integer_kind_are_cleaned_and_fractions_refused():
    values = _blobs().astype(np.uint8) * 3
    expected = clean_label_map(values, None, keep=1)
    assert (expected == 3).sum() == 27 and set(np.unique(expected)) == {0, 3}
    for kind in (np.int16, np.uint16, np.float32):
        np.testing.assert_array_equal(clean_label_map(values.astype(kind), None, keep=1), expected)
    np.testing.assert_array_equal(clean_label_map(_blobs(), None, keep=1), expected == 3)
    with pytest.raises(InputError, match="fractions"):
        clean_label_map(values * 0.5, None)
    with pytest.raises(InputError, match="negative"):
        clean_label_map(-values.astype(np.int8), None)


@pytest.fixture(scope="module")
def chaos_labels(shared_data):
    return sitk.ReadImage(str(shared_data / "chaos_mri" / "label_2.nii.gz"), sitk.sitkUInt8)


def _with_false_positives(values, rng):
    """Per label: 30 single-voxel speckles and one 48-voxel blob, all well away from every organ
    (so they can't touch one) and from each other."""
    noisy = values.copy()
    near_organ = ndimage.binary_dilation(values > 0, iterations=3)
    far = np.argwhere(~near_organ[:, :200, :])  # rows >= 200 are kept free for the blobs
    assert not values[:, 200:, :].any()
    for label in (1, 2, 3, 4):
        for z, y, x in far[rng.choice(len(far), 30, replace=False)]:
            noisy[z, y, x] = label
        noisy[5:8, 230:234, 40 * label:40 * label + 4] = label
    return noisy


def test_clean_label_map_removes_false_positives_on_real_labels(chaos_labels):
    values = sitk.GetArrayFromImage(chaos_labels)
    noisy = _with_false_positives(values, np.random.default_rng(1))
    assert (noisy != values).sum() > 100

    kidneys = np.isin(noisy, (2, 3))
    # both kidneys as one "kidneys" label: 2 components to keep, both of them the true kidneys
    kept = clean_label(kidneys, None, keep=2, min_voxels=20)
    np.testing.assert_array_equal(kept, np.isin(values, (2, 3)))

    cleaned = clean_label_map(sitk.GetImageFromArray(noisy), None, keep=1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cleaned), values)


def test_clean_label_map_with_template_seeds_keeps_geometry(chaos_labels):
    values = sitk.GetArrayFromImage(chaos_labels)
    liver = values == 1
    z_mid = int(np.argwhere(liver)[:, 0].mean())
    # prediction: the liver from slice z_mid on, and a larger false block in slices 0-4
    prediction = np.where(values == 1, 1, 0).astype(np.uint8)
    prediction[:z_mid] = 0
    prediction[0:5, 20:236, 20:236] = 1
    assert (prediction[0:5] == 1).sum() > (prediction[z_mid:] == 1).sum()
    template = np.zeros_like(prediction)
    template[z_mid] = values[z_mid] == 1  # the user painted the liver on one slice

    image = sitk.GetImageFromArray(prediction)
    image.CopyInformation(chaos_labels)
    with_seed = clean_label_map(image, sitk.GetImageFromArray(template), keep={1: 1}, min_voxels=20)
    assert with_seed.GetOrigin() == chaos_labels.GetOrigin()
    assert with_seed.GetSpacing() == chaos_labels.GetSpacing()
    kept = sitk.GetArrayFromImage(with_seed)
    np.testing.assert_array_equal(kept == 1, (values == 1) & (np.arange(len(values))[:, None, None] >= z_mid))
    # without the painted seed, the larger false block would have won
    without_seed = clean_label_map(prediction, None, keep=1, min_voxels=20)
    assert without_seed[0:5, 20:236, 20:236].all() and not without_seed[z_mid:].any()


@pytest.mark.parametrize("name, expected", [
    ("kidney", 2), ("Kidneys", 2), ("lungs", 2), ("adrenal gland", 2), ("femur", 2),
    ("kidney_left", 1), ("right kidney", 1), ("lung_upper_lobe_left", 1), ("Femur R", 1),
    ("liver", 1), ("spleen", 1), ("aorta", 1)])
def test_default_keep(name, expected):
    assert default_keep(name) == expected


def test_a_label_that_narrows_and_widens_again_beyond_its_painting_is_cut_at_the_neck():
    from FewShotSegmentLib.postprocess import cut_regrowth

    # an organ on slices 2-7 painted on 3 and 4, narrowing to a neck on slice 7 and running on
    # into a wide structure on slices 8-10 (areas 36 49 36 16 9 4 | 25 64 64: 64 > 1.5 x 4 + 1 % of 49)
    sizes = {2: 6, 3: 7, 4: 6, 5: 4, 6: 3, 7: 2, 8: 5, 9: 8, 10: 8}
    stack = np.zeros((12, 16, 16), np.uint8)
    for z, s in sizes.items():
        stack[z, 2:2 + s, 2:2 + s] = 1
    stack[3:9, 12:14, 12:14] = 2                       # a second label, painted, untouched
    seeds = np.zeros_like(stack)
    seeds[[3, 4]] = stack[[3, 4]]
    out = cut_regrowth(stack, seeds, {1: 1, 2: 1})
    areas = (out == 1).reshape(12, -1).sum(1)
    assert areas[:8].tolist() == [0, 0, 36, 49, 36, 16, 9, 4] and areas[8:].sum() == 0
    assert ((out == 2) == (stack == 2)).all()
    # an organ that only grows, or grows then shrinks, beyond its painting is left alone
    grows = np.zeros_like(stack)
    for z, s in {2: 2, 3: 3, 4: 5, 5: 8}.items():
        grows[z, :s, :s] = 1
    assert (cut_regrowth(grows, np.where(np.arange(12)[:, None, None] == 2, grows, 0), {1: 1}) == grows).all()
    grow_shrink = np.zeros_like(stack)
    for z, s in {2: 3, 3: 5, 4: 7, 5: 5, 6: 2}.items():
        grow_shrink[z, :s, :s] = 1
    only_first = np.where(np.arange(12)[:, None, None] == 2, grow_shrink, 0)
    assert (cut_regrowth(grow_shrink, only_first, {1: 1}) == grow_shrink).all()
    # paired labels (two components kept) are not cut: two organs' areas add up
    assert (cut_regrowth(stack, seeds, {1: 2, 2: 1}) == stack).all()


def test_an_organ_that_keeps_growing_beyond_its_painting_is_not_cut_for_a_dip():
    """A liver painted on one slice of a finely sliced CT grows for 40 slices beyond it, with
    dips of a few percent on the way (measured: a 1 % dip, then 1.6x growth; cutting there
    lost 44 slices). A neck needs a narrowing by more than 10 % of the widest section so far."""
    from FewShotSegmentLib.postprocess import cut_regrowth, regrowth_neck

    areas = np.array([0, 280, 300, 296, 320, 360, 330, 400, 450, 440, 430, 0])   # painted at 1
    assert regrowth_neck(areas, 1, 1, 0.5, 3) is None
    side = np.sqrt(areas).round().astype(int)
    stack = np.zeros((12, 24, 24), np.uint8)
    for z, s in enumerate(side):
        stack[z, :s, :s] = 1
    seeds = np.where(np.arange(12)[:, None, None] == 1, stack, 0)
    assert (cut_regrowth(stack, seeds, {1: 1}) == stack).all()
    # a narrowing (450 -> 250) that widens again by more than 1.5x is a neck
    necked = np.array([0, 280, 300, 360, 450, 250, 200, 320, 420, 0, 0, 0])
    assert regrowth_neck(necked, 1, 1, 0.5, 3) == 6
    # the demo CT's liver tip, painted on slice 9, walking down: 24 % narrower, then 2x wider
    tip = np.array([0, 456, 431, 382, 283, 236, 191, 208, 240, 250, 0, 0])
    assert regrowth_neck(tip, 9, -1, 0.5, 3) == 6


def test_components_found_in_the_bounding_box_match_those_of_the_whole_grid():
    """The clean-up labels components within each label's bounding box only (memory): the result
    must be what labelling the whole grid gives, seeds and keep counts included."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    grid = np.zeros((30, 40, 50), np.uint8)
    grid[5:25, 10:35, 20:45] = (ndimage.gaussian_filter(rng.random((20, 25, 25)), 1.5) > 0.5) * 1
    grid[2:6, 2:8, 2:8] = 2
    grid[20:28, 30:38, 3:9] = 2
    seeds = np.zeros_like(grid)
    seeds[12] = grid[12]
    cleaned = clean_label_map(grid, seeds, {1: 1, 2: 2}, min_voxels=5)

    structure = np.ones((3, 3, 3), bool)
    expected = np.zeros_like(grid)
    for value, keep in ((1, 1), (2, 2)):
        components, count = ndimage.label(grid == value, structure)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        kept = set(np.unique(components[seeds == value]).tolist()) - {0}
        for c in sorted(range(1, count + 1), key=lambda c: (-sizes[c], c)):
            if len(kept) >= keep or sizes[c] < 5:
                break
            kept.add(c)
        expected[np.isin(components, sorted(kept))] = value
    assert (grid == 1).sum() > (cleaned == 1).sum() > 0          # something was removed
    np.testing.assert_array_equal(cleaned, expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32])
def test_values_present_are_the_distinct_values_in_order(dtype):
    from FewShotSegmentLib.postprocess import values_present

    values = np.array([[7, 0, 3], [3, 7, 12]], dtype) * (-1 if np.dtype(dtype).kind == "i" else 1)
    got = values_present(values)
    np.testing.assert_array_equal(got, np.unique(values))
    assert got.dtype == values.dtype
