"""The bundled sample CT: present with its attribution, and registered with Slicer's Sample Data
module once the application has started (skipped cleanly where that module is absent)."""
from __future__ import annotations

import sys
import types
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import slicer

from fewshot_mrml import CT, CT_REFERENCE, REPO


def test_bundled_files_and_attribution_are_there():
    folder = REPO / "FewShotSegment" / "Resources" / "SampleData"
    assert CT.parent == folder and CT.stat().st_size > 1_000_000 and CT_REFERENCE.is_file()
    attribution = (folder / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "Apache-2.0" in attribution and "Wasserthal" in attribution
    cmake = (REPO / "FewShotSegment" / "CMakeLists.txt").read_text()
    assert all(f"Resources/SampleData/{name}" in cmake for name in (CT.name, CT_REFERENCE.name, "ATTRIBUTION.md"))


def test_module_registers_the_ct_with_sample_data_after_startup(fss, monkeypatch):
    registered, slots = [], {}

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(**source):
            registered.append(source)

    app = types.SimpleNamespace(connect=lambda signal, slot: slots.setdefault(signal, slot))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    fss.FewShotSegment(types.SimpleNamespace())
    assert registered == []  # nothing before the application has started
    slots["startupCompleted()"]()
    assert [s["sampleName"] for s in registered] == ["FewShotSegmentCT", "FewShotSegmentCT reference labels"]
    for source, expected in zip(registered, (CT, CT_REFERENCE)):
        assert Path(url2pathname(urlparse(source["uris"]).path)) == expected and source["category"] == "FewShotSegment"
    assert registered[1]["loadFileType"] == "SegmentationFile"


def test_without_sample_data_module_nothing_is_registered(monkeypatch):
    from FewShotSegmentSlicer.SampleDataRegistration import registerSampleData

    monkeypatch.setitem(sys.modules, "SampleData", None)
    assert registerSampleData() is False
