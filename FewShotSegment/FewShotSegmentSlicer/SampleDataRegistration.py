"""The bundled sample (Resources/SampleData): the TotalSegmentator example CT and its reference labels,
registered with Slicer's Sample Data module so a user can try FewShotSegment without own data."""
from __future__ import annotations

import logging
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
CT_FILE = SAMPLE_DIR / "example_ct.nii.gz"
LABELS_FILE = SAMPLE_DIR / "example_seg_fast_force_split.nii.gz"
# reference label values ("total" task of TotalSegmentator) of the organs the demo paints
CT_LABELS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}


def registerSampleData() -> bool:
    """Add the CT to Slicer's Sample Data module; False (and nothing done) where it is absent."""
    try:
        import SampleData
    except ImportError:
        logging.info("FewShotSegment: no SampleData module; the bundled CT is not registered")
        return False
    if not CT_FILE.is_file():
        logging.warning(f"FewShotSegment: bundled sample missing: {CT_FILE}")
        return False
    thumbnail = str(SAMPLE_DIR.parent / "Icons" / "FewShotSegment.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FewShotSegment", sampleName="FewShotSegmentCT", thumbnailFileName=thumbnail,
        uris=CT_FILE.as_uri(), fileNames=CT_FILE.name, nodeNames="FewShotSegmentCT")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="FewShotSegment", sampleName="FewShotSegmentCT reference labels", thumbnailFileName=thumbnail,
        uris=LABELS_FILE.as_uri(), fileNames=LABELS_FILE.name, nodeNames="FewShotSegmentCT reference labels",
        loadFileType="SegmentationFile")
    return True
