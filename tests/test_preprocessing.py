import numpy as np
import pytest

from FewShotSegmentLib.errors import InputError
from FewShotSegmentLib.preprocessing import guess_modality, normalize_volume, parse_ct_window


def test_ct_window_maps_hu_to_unit_range():
    hu = np.array([[[-1000, -160, 40, 240, 3000]]], dtype=np.int16)
    out = normalize_volume(hu, "ct", "abdomen")          # 40 +- 200 HU
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_custom_window_and_bad_window():
    assert parse_ct_window("100,50") == (100.0, 50.0)
    with pytest.raises(InputError, match="center,width"):
        parse_ct_window("wide")
    with pytest.raises(InputError, match="positive"):
        parse_ct_window("0,-5")


def test_mri_uses_robust_percentiles_so_one_hot_voxel_does_not_compress_the_rest():
    rng = np.random.default_rng(0)
    mri = rng.normal(300, 50, size=(4, 32, 32)).astype(np.float32)
    mri[0, 0, 0] = 1e6
    out = normalize_volume(mri, "mri")
    assert 0.4 < np.median(out) < 0.6


def test_modality_guess_and_bad_values():
    assert guess_modality(np.full((2, 8, 8), -1024.0)) == "ct"
    assert guess_modality(np.full((2, 8, 8), 10.0)) == "mri"
    bad = np.zeros((2, 8, 8), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="1 NaN"):
        normalize_volume(bad, "mri")
    with pytest.raises(InputError, match="constant"):
        normalize_volume(np.ones((2, 8, 8)), "mri")
