"""Thin slices (features.encoding_step): on a CT whose slices lie closer than half a feature cell,
only every step-th slice (and the painted ones) is encoded and the slices between read their
neighbours' features interpolated. On the real 2 mm DICOM CT, encoding every second slice (4 mm
apart, more than the automatic rule would allow there) labels its organs as well as encoding every
slice did (benchmarks/results/speed_cpu.md, "Thin slices")."""
import json

import numpy as np
import SimpleITK as sitk

from FewShotSegmentLib import io, pipeline
from FewShotSegmentLib.cli import main
from FewShotSegmentLib.config import PipelineConfig
from FewShotSegmentLib.metrics import dice
from FewShotSegmentLib.worker import OUTPUT_NAMES

ORGANS = {1: "spleen", 5: "liver", 6: "stomach", 52: "aorta"}
# measured (AMD EPYC, 2 cores), slice 9 painted: 0.964 0.975 0.911 0.933 with every second slice
# encoded, 0.964 0.974 0.910 0.932 with every slice
FLOORS = {"spleen": 0.93, "liver": 0.94, "stomach": 0.87, "aorta": 0.89}
PAINTED = 9                                  # off the lattice of every second slice: encoded exactly


def test_every_second_slice_of_a_thin_slice_ct_is_encoded_and_every_organ_is_found(shared_data, tmp_path):
    folder = shared_data / "totalseg_ct"
    image = io.read_image(folder / "example_ct_dicom")             # 512x512x20, 0.98 x 0.98 x 2 mm
    reference = sitk.GetArrayFromImage(io.read_labelmap(folder / "example_seg_dicom.nii.gz", reference=image))
    painting = np.zeros_like(reference)
    for value in ORGANS:
        painting[PAINTED][reference[PAINTED] == value] = value
    template = sitk.GetImageFromArray(painting)
    template.CopyInformation(image)
    sitk.WriteImage(template, str(tmp_path / "painting.nrrd"))

    # through the command line, as a user asks for it
    assert main(["run", "--image", str(folder / "example_ct_dicom"), "--template", str(tmp_path / "painting.nrrd"),
                 "--out", str(tmp_path / "out"), "--axis", "axial", "--encode-step", "2", "--no-landmarks"]
                + [arg for value, name in ORGANS.items() for arg in ("--label", f"{value}={name}")]) == 0
    summary = json.loads((tmp_path / "out" / OUTPUT_NAMES["summary"]).read_text())
    assert summary["config"]["encode_step"] == 2
    # the lattice 0, 2, ..., 18 and the last slice, and the painted slice 9
    assert summary["encoded_slices"] == 12
    labels = sitk.GetArrayFromImage(io.read_labelmap(tmp_path / "out" / OUTPUT_NAMES["labels"], reference=image))
    scores = {name: dice(labels == value, reference == value) for value, name in ORGANS.items()}
    assert all(scores[name] >= floor for name, floor in FLOORS.items()), scores

    # the automatic step: every slice here (2 mm against a 7.8 mm cell), every second slice of the
    # same CT on 1.1 mm slices of 0.7 mm pixels
    backbone = pipeline.build_backbone_for(PipelineConfig(device="cpu", compile="off"))
    assert pipeline._encoding_step(PipelineConfig(), backbone, (2.0, 0.977, 0.977), "axial", (512, 512)) == 1
    assert pipeline._encoding_step(PipelineConfig(), backbone, (1.12, 0.715, 0.715), "axial", (512, 512)) == 2
    assert pipeline._encoding_step(PipelineConfig(), backbone, (3.0, 3.0, 3.0), "axial", (101, 122)) == 1


def test_a_bad_encode_step_is_a_one_line_error():
    import pytest

    from FewShotSegmentLib.errors import InputError

    for bad in (-1, 1.5, "2", True):
        with pytest.raises(InputError, match="encode_step must be 0"):
            PipelineConfig(encode_step=bad).validate()
