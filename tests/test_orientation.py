"""Slicing by physical geometry: the same anatomy gives the same slices whatever the storage order,
and results go back onto the input grid exactly."""
import numpy as np
import pytest
import SimpleITK as sitk

from FewShotSegmentLib.pipeline import PreparedVolume, _to_canonical
from FewShotSegmentLib.templates import canonical_axis


def _image(direction):
    array = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(direction)
    return image


LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)
RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
SAGITTAL_STACK = (0, 0, 1, 1, 0, 0, 0, 1, 0)   # slices stacked left-right, as sagittal MRI often is


@pytest.mark.parametrize("direction", [LPS, RAS, SAGITTAL_STACK])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slices_round_trip_onto_the_input_grid(direction, axis):
    image = _image(direction)
    prepared = PreparedVolume(image=image, slices01=None, features=None, axis=axis, seconds=0.0)
    stack = prepared.to_slices(image)
    back = prepared.from_slices(stack)
    assert back.GetSize() == image.GetSize() and back.GetDirection() == image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_same_anatomy_gives_same_axial_slices_in_any_storage_order():
    lps = _image(LPS)
    flipped = sitk.Flip(lps, [True, True, False])   # the same voxels stored RAS-wise
    assert flipped.GetDirection() != lps.GetDirection()
    a = sitk.GetArrayFromImage(_to_canonical(lps))
    b = sitk.GetArrayFromImage(_to_canonical(flipped))
    np.testing.assert_array_equal(a, b)


def test_canonical_axis_reads_the_direction():
    assert canonical_axis(_image(LPS), "axial") == 0
    assert canonical_axis(_image(SAGITTAL_STACK), "sagittal") == 0
    assert canonical_axis(_image(SAGITTAL_STACK), "axial") == 1
