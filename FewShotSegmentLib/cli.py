"""Command line for headless batch runs: ``fewshot-segment run|train|predict|make-template``.

Every command reads its inputs, checks them before any slow step, shows a progress bar on
stderr, writes into --out (never over existing files without --overwrite) and exits non-zero
with a one-line message on bad input.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import (ADAPTERS, ANATOMICAL_AXES, AXES, COMPILE_MODES, DEVICES, ENSEMBLE_FOR_OTHER_VOLUMES, FEATURE_LAYER_CHOICES,
                     LOCATIONS, PRECISIONS, REFINEMENTS, PipelineConfig)
from .errors import Cancelled, FewShotError, InputError


class ProgressBar:
    def __init__(self, stream=sys.stderr, width=30):
        self.stream, self.width, self.stage = stream, width, None

    def __call__(self, fraction, stage, message):
        filled = int(self.width * min(max(fraction, 0.0), 1.0))
        line = f"\r[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}% {stage:<9} {message[:50]:<50}"
        if stage != self.stage and self.stage is not None:
            self.stream.write("\n")
        self.stage = stage
        self.stream.write(line)
        self.stream.flush()

    def close(self):
        self.stream.write("\n")


def parse_labels(items: list[str]) -> dict[int, dict]:
    """``5=liver`` or ``5=liver:0.8,0.3,0.3`` -> {5: {"name": "liver", "color": [...]}}"""
    labels = {}
    for item in items or []:
        try:
            value, _, rest = item.partition("=")
            name, _, color = rest.partition(":")
            spec = {"name": name or f"label_{int(value)}"}
            if color:
                spec["color"] = [float(c) for c in color.split(",")]
                if len(spec["color"]) != 3:
                    raise ValueError
            labels[int(value)] = spec
        except ValueError:
            raise InputError(f"--label must look like 5=liver or 5=liver:0.8,0.3,0.3, got {item!r}") from None
    return labels


def _config_args(parser):
    g = parser.add_argument_group("method")
    g.add_argument("--adapter", choices=ADAPTERS, default="contrastive")
    g.add_argument("--backbone", choices=("litemedsam", "dinov2", "checkpoint"), default="litemedsam")
    g.add_argument("--backbone-name", default="vit_small_patch14_dinov2", help="timm model name for DINOv2")
    g.add_argument("--checkpoint", default="", help="local backbone weights file (offline use)")
    g.add_argument("--feature-layer", choices=FEATURE_LAYER_CHOICES, default="auto",
                   help="LiteMedSAM features; auto: stages for train, preneck for run")
    g.add_argument("--modality", choices=("auto", "ct", "mri"), default="auto")
    g.add_argument("--ct-window", default="abdomen", help="preset name or 'center,width' in HU")
    g.add_argument("--axis", choices=AXES, default="auto",
                   help="slices to propagate over; auto: the axis the template is painted along; "
                        "stack: the volume's own slice axis (oblique stacks)")
    g.add_argument("--refine", choices=REFINEMENTS, default="box")
    g.add_argument("--sam-checkpoint", default="", help="segment-anything SAM weights for refinement")
    g.add_argument("--keep-components", type=int, default=0, help="components kept per label (0: by name)")
    g.add_argument("--no-landmarks", action="store_true")
    g.add_argument("--location", choices=LOCATIONS, default=PipelineConfig.location,
                   help="body-relative position as adapter input (off, inplane, 3d); auto: inplane for "
                        "'train' (an adapter for other patients), off for 'run' (the painted volume)")
    g.add_argument("--location-prior", type=float, default=PipelineConfig.location_prior,
                   help="weight of where the template had each label when choosing between labels (0: off)")
    g.add_argument("--self-support", type=float, default=PipelineConfig.self_support, help=SELF_SUPPORT_HELP)
    g.add_argument("--ensemble", type=int, default=PipelineConfig.ensemble,
                   help="adapters (seeds seed, seed+1, ...) whose scores are averaged; 0: auto, "
                        f"{ENSEMBLE_FOR_OTHER_VOLUMES} for 'train' (an adapter for other patients), 1 for 'run'")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=DEVICES, default="auto")
    _speed_args(g)
    g.add_argument("--cache-dir", default="", help="reuse encoder features of the same volume")


SELF_SUPPORT_HELP = ("on volumes without painting: the share (0-1) of each label's reference pixels taken, in a "
                     "second pass, from the pixels the first pass was surest of (0: off)")


def _speed_args(group, default="auto"):
    group.add_argument("--precision", choices=PRECISIONS, default=default,
                       help="encoder arithmetic; auto: bf16 where the CPU/GPU has fast bf16, else fp32")
    group.add_argument("--compile", choices=COMPILE_MODES, default=default,
                       help="compile the encoder ahead of time (AOTInductor, kept in a per-user cache); auto: when a C++ compiler is available")
    group.add_argument("--encode-step", type=int, default=0 if default == "auto" else None,
                       help="encode every N-th slice and interpolate the features between; 0: by the slice "
                            "spacing (every 2nd slice of a 1 mm CT), 1: every slice")


def _config(args) -> dict:
    return PipelineConfig(
        backbone=args.backbone, backbone_name=args.backbone_name, checkpoint=args.checkpoint,
        feature_layer=args.feature_layer, modality=args.modality, ct_window=args.ct_window,
        adapter=args.adapter, axis=args.axis, refine=args.refine, sam_checkpoint=args.sam_checkpoint,
        keep_components=args.keep_components, landmarks=not args.no_landmarks, seed=args.seed,
        location=args.location, location_prior=args.location_prior, self_support=args.self_support,
        ensemble=args.ensemble,
        device=args.device, precision=args.precision, compile=args.compile, encode_step=args.encode_step,
        cache_dir=args.cache_dir).validate().to_dict()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot-segment", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train on the template slices and label the whole image"),
                            ("train", "train an adapter and save it (no segmentation)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--image", required=True, action="append",
                       help="volume file or DICOM folder; repeat with --template to train on several "
                            "volumes (the first is the one segmented)")
        p.add_argument("--template", required=True, action="append",
                       help="label map or .seg.nrrd painted on a few slices (one per --image)")
        p.add_argument("--label", action="append", help="value=name[:r,g,b]; repeat; default: all painted")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--overwrite", action="store_true")
        _config_args(p)
    p = sub.add_parser("predict", help="apply a saved adapter to other volumes")
    p.add_argument("--model", required=True, help="adapter file from run/train (adapter.pt)")
    p.add_argument("--image", required=True, nargs="+", help="one or more volumes")
    p.add_argument("--out", required=True, help="output folder (one subfolder per image when several)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--refine", choices=REFINEMENTS)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--self-support", type=float, help=SELF_SUPPORT_HELP)
    _speed_args(p, default=None)
    p.add_argument("--cache-dir")
    p.add_argument("--no-landmarks", action="store_true")
    p = sub.add_parser("make-template", help="simulate painting: copy reference labels on chosen slices")
    p.add_argument("--reference", required=True, help="full reference label map")
    p.add_argument("--image", required=True, help="the volume the reference belongs to")
    p.add_argument("--labels", required=True, help="comma-separated label values, e.g. 5,1")
    p.add_argument("--axis", choices=ANATOMICAL_AXES + ("stack",), default="axial")
    p.add_argument("--slices", type=int, default=1, help="number of template slices, spread over the first label")
    p.add_argument("--protocol", action="store_true",
                   help="the standard few-shot support slices: each label's slices at 1/6, 1/2, 5/6 of its extent")
    p.add_argument("--out", required=True, help="template file (.nrrd / .nii.gz)")
    p.add_argument("--overwrite", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bar = ProgressBar()
    cancelled = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *a: cancelled.update(flag=True))
    try:
        if args.command == "make-template":
            from .templates import make_template_file
            path = make_template_file(args.reference, args.image, [int(v) for v in args.labels.split(",")],
                                      args.axis, args.slices, args.out, args.overwrite, args.protocol)
            print(json.dumps({"template": str(path)}))
            return 0
        from .worker import execute
        jobs = []
        if args.command in ("run", "train"):
            if len(args.image) != len(args.template):
                raise InputError(f"give one --template per --image ({len(args.image)} images, "
                                 f"{len(args.template)} templates)")
            jobs.append({"task": args.command, "image": args.image[0], "template": args.template[0],
                         "more_templates": [{"image": i, "template": t}
                                            for i, t in zip(args.image[1:], args.template[1:])],
                         "labels": {str(k): v for k, v in parse_labels(args.label).items()},
                         "output_dir": args.out, "overwrite": args.overwrite, "config": _config(args)})
        else:
            overrides = {k: v for k, v in (("refine", args.refine), ("device", args.device),
                                           ("precision", args.precision), ("compile", args.compile),
                                           ("cache_dir", args.cache_dir), ("self_support", args.self_support),
                                           ("encode_step", args.encode_step))
                         if v is not None}
            if args.no_landmarks:
                overrides["landmarks"] = False
            for image in args.image:
                out = Path(args.out) if len(args.image) == 1 else Path(args.out) / _stem(image)
                jobs.append({"task": "predict", "image": image, "model": args.model, "output_dir": str(out),
                             "overwrite": args.overwrite, "config": overrides})
        from .session import Session
        session = Session()          # several images: the backbone is built (and compiled) once
        for job in jobs:
            outputs = execute(job, bar, lambda: cancelled["flag"], session=session)
            bar.close()
            _report(outputs)
            print(json.dumps({"image": job["image"], "outputs": outputs}))
        return 0
    except Cancelled:
        bar.close()
        print("fewshot-segment: cancelled", file=sys.stderr)
        return 143
    except (FewShotError, OSError) as exc:
        print(f"\nfewshot-segment: error: {exc}", file=sys.stderr)
        return 1


def _report(outputs: dict) -> None:
    """What a user should look at: labels not found, labels SAM was not trusted with, and the
    slices worth painting next (on stderr; stdout stays one JSON line per image)."""
    if "summary" not in outputs or "suggestions" not in outputs:
        return
    summary = json.loads(Path(outputs["summary"]).read_text())
    if summary.get("not_found"):
        print(f"not found: {', '.join(summary['not_found'])}", file=sys.stderr)
    unrefined = [name for name, d in summary.get("refinement", {}).items() if not d["refined"]]
    if unrefined:
        print(f"not refined (SAM could not redraw the painting): {', '.join(unrefined)}", file=sys.stderr)
    for rank, pick in enumerate(summary.get("suggested_slices", [])[:3], start=1):
        print(f"paint next #{rank}: {pick['axis']} slice {pick['index']} (LPS {', '.join(f'{v:.1f}' for v in pick['position_lps'])};"
              f" doubtful for {', '.join(pick['labels'])})", file=sys.stderr)


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


if __name__ == "__main__":
    sys.exit(main())
