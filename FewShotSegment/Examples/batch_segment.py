"""Headless FewShotSegment with 3D Slicer: no window, one command, files in and files out.

Train on a painted template and label the same volume:

    Slicer --no-main-window --additional-module-paths /path/to/repo/FewShotSegment \
        --python-script batch_segment.py \
        --image ct.nii.gz --template template.seg.nrrd --output result.seg.nrrd \
        [--landmarks result.mrk.json] [--save-adapter liver.pt] [--refine box] [--device cuda]

Apply a saved adapter to other volumes (one new .seg.nrrd per volume in --output-dir):

    Slicer --no-main-window --additional-module-paths /path/to/repo/FewShotSegment \
        --python-script batch_segment.py \
        --adapter liver.pt --image a.nrrd b.nii.gz c.mha --output-dir results/

The template is any segmentation Slicer can load (.seg.nrrd, or a label map .nii.gz/.nrrd whose
non-zero voxels on one or a few slices are the painted labels). Exit status 0 on success, 1 on error.
"""
import argparse
import sys
import traceback
from pathlib import Path

import slicer


def parseArguments(argv):
    parser = argparse.ArgumentParser(prog="batch_segment.py", description="FewShotSegment without a window")
    parser.add_argument("--image", nargs="+", required=True, help="volume file(s)")
    parser.add_argument("--template", help="painted template segmentation (train + label --image)")
    parser.add_argument("--adapter", help="saved adapter (.pt) to apply to every --image")
    parser.add_argument("--output", help="result .seg.nrrd (template mode)")
    parser.add_argument("--output-dir", help="folder for the results (adapter mode)")
    parser.add_argument("--landmarks", help="also save the landmarks .mrk.json here (template mode)")
    parser.add_argument("--save-adapter", help="keep the adapter trained on the template here")
    for name in ("adapter-type", "backbone", "refine", "device", "axis"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--checkpoint", help="local backbone weights (DINOv2 / checkpoint backbone)")
    args = parser.parse_args(argv)
    if bool(args.template) == bool(args.adapter):
        parser.error("give either --template (train and label) or --adapter (apply a saved adapter)")
    if args.template and (len(args.image) != 1 or not args.output):
        parser.error("--template needs exactly one --image and --output")
    if args.adapter and not args.output_dir:
        parser.error("--adapter needs --output-dir")
    return args


def loadTemplate(path, volume):
    if str(path).lower().endswith(".seg.nrrd"):
        return slicer.util.loadSegmentation(str(path))
    labelmap = slicer.util.loadLabelVolume(str(path))
    template = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", Path(path).name)
    template.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, template)
    slicer.mrmlScene.RemoveNode(labelmap)
    return template


def main(argv):
    args = parseArguments(argv)
    import FewShotSegment

    if FewShotSegment.missingDependencies():
        print("installing dependencies:", FewShotSegment.missingDependencies())
        if not FewShotSegment.installDependencies(askConfirmation=False):
            raise RuntimeError("could not install the dependencies")
    logic = FewShotSegment.FewShotSegmentLogic()
    config = {key: value for key, value in (("adapter", args.adapter_type), ("backbone", args.backbone),
                                            ("refine", args.refine), ("device", args.device),
                                            ("axis", args.axis), ("checkpoint", args.checkpoint)) if value}
    config["cache_dir"] = logic.defaultFeatureCacheDir()

    def report(job, event):
        if event.get("event") == "progress":
            print(f"  {100 * event.get('progress', 0):5.1f}%  {event.get('stage', '')}: {event.get('message', '')}",
                  flush=True)

    if args.template:
        volume = slicer.util.loadVolume(args.image[0])
        template = loadTemplate(args.template, volume)
        result = logic.run(volume, template, config=config, keepModelAs=args.save_adapter, callback=report)
        slicer.util.saveNode(result.segmentationNode, args.output)
        print("saved", args.output)
        if args.landmarks and result.landmarksNode is not None:
            slicer.util.saveNode(result.landmarksNode, args.landmarks)
            print("saved", args.landmarks)
        if result.modelPath:
            print("adapter saved as", result.modelPath)
        return 0

    outputDir = Path(args.output_dir)
    outputDir.mkdir(parents=True, exist_ok=True)
    volumes = [slicer.util.loadVolume(path) for path in args.image]
    results = logic.predictBatch(volumes, args.adapter, config=config, callback=report)
    failed = 0
    for path, volume, result in zip(args.image, volumes, results):
        if result is None:
            failed += 1
            continue
        target = outputDir / (volume.GetName() + ".seg.nrrd")
        slicer.util.saveNode(result.segmentationNode, str(target))
        print("saved", target)
    for name, error in logic.batchErrors:
        print(f"FAILED {name}: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except Exception:
        traceback.print_exc()
        status = 1
    slicer.util.exit(status)
