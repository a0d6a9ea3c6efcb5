"""Render the README picture offscreen: the CT with the segmentation FewShotSegment propagated from
ONE painted axial slice, an axial slice away from the template and a coronal slice across it.

Runs the module's Logic on real MRML (slicer-core) with the real worker, then draws with VTK through
Mesa EGL (no display needed):

    VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow .venv/bin/python Testing/Python/render_result_png.py \
        [--output docs/images/fewshot_ct.png] [--reference]

--reference draws the reference labels instead of running the worker (to check the drawing only).
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import fewshot_mrml  # noqa: E402  (stand-ins for the application parts slicer-core lacks)
import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

WINDOW, LEVEL = 400.0, 40.0


def imageData2D(array2d, spacing):
    """(rows=y, cols=x) numpy -> vtkImageData in the z=0 plane."""
    rows, cols = array2d.shape
    image = vtk.vtkImageData()
    image.SetDimensions(cols, rows, 1)
    image.SetSpacing(spacing[0], spacing[1], 1.0)
    flat = np.ascontiguousarray(array2d).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    return image


def addSlice(renderer, ct2d, labels2d, colors, spacing, title, markerRow=None):
    """CT in an abdominal window, translucent label fill and label outlines."""
    ctImage = imageData2D(ct2d.astype(np.float32), spacing)
    windowLevel = vtk.vtkImageMapToWindowLevelColors()
    windowLevel.SetInputData(ctImage)
    windowLevel.SetWindow(WINDOW)
    windowLevel.SetLevel(LEVEL)
    windowLevel.SetOutputFormatToRGB()
    ctActor = vtk.vtkImageActor()
    ctActor.GetMapper().SetInputConnection(windowLevel.GetOutputPort())
    renderer.AddActor(ctActor)

    table = vtk.vtkLookupTable()
    table.SetNumberOfTableValues(len(colors) + 1)
    table.SetTableRange(0, len(colors))
    table.SetTableValue(0, 0, 0, 0, 0)
    for value, (_, color) in enumerate(colors, start=1):
        table.SetTableValue(value, *color, 0.35)
    table.Build()
    labelImage = imageData2D(labels2d.astype(np.uint8), spacing)
    mapped = vtk.vtkImageMapToColors()
    mapped.SetInputData(labelImage)
    mapped.SetLookupTable(table)
    mapped.SetOutputFormatToRGBA()
    fillActor = vtk.vtkImageActor()
    fillActor.GetMapper().SetInputConnection(mapped.GetOutputPort())
    fillActor.SetPosition(0, 0, -0.5)  # the camera looks along +z: nearer is smaller z
    renderer.AddActor(fillActor)

    for value, (_, color) in enumerate(colors, start=1):
        if not (labels2d == value).any():
            continue
        contour = vtk.vtkDiscreteFlyingEdges2D()
        contour.SetInputData(labelImage)
        contour.SetValue(0, value)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(contour.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*color)
        actor.GetProperty().SetLineWidth(2.5)
        actor.SetPosition(0, 0, -1.0)
        renderer.AddActor(actor)

    if markerRow is not None:  # the painted template slice, as a dashed line
        line = vtk.vtkLineSource()
        y = markerRow * spacing[1]
        line.SetPoint1(0, y, -1.5)
        line.SetPoint2((ct2d.shape[1] - 1) * spacing[0], y, -1.5)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(line.GetOutputPort())
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(1.0, 1.0, 0.3)
        actor.GetProperty().SetLineWidth(1.5)
        actor.GetProperty().SetLineStipplePattern(0xF0F0)
        renderer.AddActor(actor)

    text = vtk.vtkTextActor()
    text.SetInput(title)
    text.GetTextProperty().SetFontSize(15)
    text.GetTextProperty().SetColor(1, 1, 1)
    text.SetPosition(8, 8)
    renderer.AddViewProp(text)

    # radiological convention: patient's right on the left of the picture (camera looks along +z)
    renderer.SetBackground(0, 0, 0)
    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    focal = camera.GetFocalPoint()
    camera.SetPosition(focal[0], focal[1], focal[2] - 1000)
    camera.SetViewUp(0, 1, 0)
    camera.ParallelProjectionOn()
    renderer.ResetCamera()
    camera.SetParallelScale(0.5 * max(ct2d.shape[0] * spacing[1], ct2d.shape[1] * spacing[0]) * 1.02)


def render(ct, labels, colors, spacing, templateSlice, axialSlice, coronalRow, path, subtitle=""):
    """ct, labels: (k, j, i) arrays. spacing: (i, j, k) mm."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    width, height = 1100, 560
    window.SetSize(width, height)
    axial = vtk.vtkRenderer()
    axial.SetViewport(0.0, 0.0, 0.5, 1.0)
    coronal = vtk.vtkRenderer()
    coronal.SetViewport(0.5, 0.0, 1.0, 1.0)
    window.AddRenderer(axial)
    window.AddRenderer(coronal)
    addSlice(axial, ct[axialSlice], labels[axialSlice], colors, (spacing[0], spacing[1]),
             f"axial slice {axialSlice} (template painted on slice {templateSlice} only)")
    addSlice(coronal, ct[:, coronalRow, :], labels[:, coronalRow, :], colors, (spacing[0], spacing[2]),
             "coronal: propagated across slices (dashed: painted slice)", markerRow=templateSlice)
    legend = vtk.vtkTextActor()
    legend.SetInput("   ".join(name for name, _ in colors) + (f"\n{subtitle}" if subtitle else ""))
    legend.GetTextProperty().SetFontSize(14)
    legend.GetTextProperty().SetColor(1, 1, 1)
    legend.GetTextProperty().SetJustificationToRight()
    legend.GetTextProperty().SetVerticalJustificationToTop()
    legend.SetPosition(width / 2 - 8, height - 8)
    axial.AddViewProp(legend)
    for i, (name, color) in enumerate(colors):  # coloured squares as the legend keys
        swatch = vtk.vtkTextActor()
        swatch.SetInput(name)
        swatch.GetTextProperty().SetFontSize(14)
        swatch.GetTextProperty().SetColor(*color)
        swatch.GetTextProperty().BoldOn()
        swatch.SetPosition(10, height - 24 - 18 * i)
        axial.AddViewProp(swatch)
    legend.SetInput(subtitle)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(fewshot_mrml.REPO / "docs" / "images" / "fewshot_ct.png"))
    parser.add_argument("--reference", action="store_true", help="draw the reference labels (no worker)")
    args = parser.parse_args(argv)

    scene, _, logics = fewshot_mrml.buildScene()
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{n: types.SimpleNamespace(logic=(lambda l=l: l)) for n, l in logics.items()})
    import FewShotSegment

    volume, template, reference = fewshot_mrml.paintCtScene(scene, logics)
    names = list(fewshot_mrml.CT_LABELS)
    if args.reference:
        labels = np.zeros(reference.shape, np.uint8)
        for value, name in enumerate(names, start=1):
            labels[reference == fewshot_mrml.CT_LABELS[name]] = value
        colors = [(name, fewshot_mrml.CT_COLORS[name]) for name in names]
        subtitle = "reference labels"
    else:
        logic = FewShotSegment.FewShotSegmentLogic()
        result = logic.run(volume, template, config=fewshot_mrml.fastConfig())
        segmentation = result.segmentationNode
        labels = np.zeros(reference.shape, np.uint8)
        colors = []
        for value, name in enumerate(names, start=1):
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, name, volume) > 0
            labels[mask] = value
            colors.append((name, segmentation.GetSegmentation().GetSegment(name).GetColor()))
        liverDice = fewshot_mrml.dice(labels == 1, reference == fewshot_mrml.CT_LABELS["liver"])
        subtitle = f"FewShotSegment, 1 painted slice; liver 3D Dice {liverDice:.2f}"
    ct = slicer.util.arrayFromVolume(volume)
    spacing = volume.GetSpacing()
    liverRows = np.where((reference == fewshot_mrml.CT_LABELS["liver"]).any(axis=(0, 2)))[0]
    coronalRow = int(np.median(np.where(reference == fewshot_mrml.CT_LABELS["kidney_right"])[1]))
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(ct, labels, colors, spacing, fewshot_mrml.TEMPLATE_SLICE, fewshot_mrml.TEMPLATE_SLICE + 10,
           coronalRow if coronalRow in liverRows else int(np.median(liverRows)), path, subtitle)
    print(path)


if __name__ == "__main__":
    main()
