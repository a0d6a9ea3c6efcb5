"""The self-test that Slicer's "Reload and Test" and the extension's ctest run: a synthetic volume with
two blobs, one painted slice each, a full run in the worker, and checks of the new nodes. It never
installs anything: without the dependencies it is skipped with a message saying how to get them."""
from __future__ import annotations

import logging
import unittest

import vtk

import slicer

from .Dependencies import missingDependencies
from .Logic import FewShotSegmentLogic


def skipMessage():
    """Why the self-test cannot run here, or '' when it can."""
    missing = missingDependencies()
    if not missing:
        return ""
    return ("FewShotSegment self-test skipped: the worker's Python packages are missing "
            f"({', '.join(missing)}); install them with the module's 'Check / install dependencies' button")


def makeSyntheticScene():
    """A 32x64x64 volume (CT-like HU) with a bright ellipsoid and a darker ball, and a template
    segmentation painted on the middle slice of each. Returns (volume, template, truth dict)."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (32, 64, 64)  # k, j, i
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]]
    blob = ((k - 16) / 11.0) ** 2 + ((j - 30) / 14.0) ** 2 + ((i - 22) / 12.0) ** 2 <= 1
    ball = ((k - 16) / 7.0) ** 2 + ((j - 32) / 9.0) ** 2 + ((i - 47) / 9.0) ** 2 <= 1
    body = ((j - 32) / 30.0) ** 2 + ((i - 32) / 31.0) ** 2 <= 1
    image = np.where(body, 0.0, -1000.0) + rng.normal(0, 10, shape)
    image[blob] = 120 + rng.normal(0, 10, int(blob.sum()))
    image[ball] = 60 + rng.normal(0, 10, int(ball.sum()))
    image = image.astype(np.int16)
    ijkToRAS = vtk.vtkMatrix4x4()
    for axis, spacing in enumerate((1.5, 1.5, 2.5)):
        ijkToRAS.SetElement(axis, axis, spacing)
    volume = slicer.util.addVolumeFromArray(image, ijkToRAS=ijkToRAS, name="FewShotSynthetic")
    template = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FewShotSyntheticTemplate")
    template.CreateDefaultDisplayNodes()
    template.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    truth = {"blob": blob, "ball": ball}
    for name, color, mask in (("blob", (0.9, 0.4, 0.3), blob), ("ball", (0.3, 0.5, 0.9), ball)):
        segmentId = template.GetSegmentation().AddEmptySegment(name, name, color)
        painted = np.zeros(shape, dtype=np.uint8)
        painted[16] = mask[16]
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted, template, segmentId, volume)
    return volume, template, truth


def runSyntheticTest(test: unittest.TestCase):
    """The body of FewShotSegmentTest.test_FewShotSegment_synthetic."""
    message = skipMessage()
    if message:
        logging.warning(message)
        raise unittest.SkipTest(message)
    test.delayDisplay("Building a synthetic volume and a template painted on one slice")
    volume, template, truth = makeSyntheticScene()
    nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
    logic = FewShotSegmentLogic()
    test.delayDisplay("Running the worker (the first run encodes 32 slices)")
    try:
        result = logic.run(volume, template, config={"refine": "box", "device": "cpu", "epochs": 40,
                                                    "cache_dir": logic.defaultFeatureCacheDir()})
    finally:
        logic.shutdownWorker()  # this Logic's worker process is not needed after the test
    segmentation = result.segmentationNode
    test.assertIsNotNone(segmentation)
    test.assertNotEqual(segmentation.GetID(), template.GetID())
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    test.assertEqual(names, ["blob", "ball"])
    for name, mask in truth.items():
        predicted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, name, volume) > 0
        dice = 2.0 * (predicted & mask).sum() / (predicted.sum() + mask.sum())
        test.delayDisplay(f"{name}: Dice {dice:.3f}")
        test.assertGreater(dice, 0.7, f"{name} Dice {dice:.3f}")
    test.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
    test.delayDisplay("Test passed")
