"""Shared pytest fixtures."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (../shared/data from the repository root). Tests that use it
    fail, never skip, when it is missing: a silent skip would hide that nothing was tested."""
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA}"
    return SHARED_DATA


REPO = Path(__file__).resolve().parents[1]
# Encoder features are cached here between tests and runs (and shared with the Slicer module's
# tests), so each test volume is encoded once: ~2 min for the CT on 2 CPU cores.
FEATURE_CACHE = REPO / ".cache" / "features"


@pytest.fixture(scope="session")
def feature_cache() -> str:
    FEATURE_CACHE.mkdir(parents=True, exist_ok=True)
    return str(FEATURE_CACHE)


@pytest.fixture(scope="session")
def ct(shared_data):
    """The TotalSegmentator CT and its reference label map (as read by the library)."""
    from FewShotSegmentLib import io

    image = io.read_image(shared_data / "totalseg_ct" / "example_ct.nii.gz")
    reference = io.read_labelmap(shared_data / "totalseg_ct" / "example_seg_fast_force_split.nii.gz", image)
    return image, reference
