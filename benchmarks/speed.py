"""Speed benchmark: per-slice time of the encoder alone vs the whole pipeline (encode + train +
propagate + components + refine), and peak memory, for LiteMedSAM and DINOv2 ViT-S.

    .venv/bin/python benchmarks/speed.py --device cpu --slices 16
    .venv/bin/python benchmarks/speed.py --device cuda --slices 256 --bf16

The volume is N axial slices of the TotalSeg example CT around the middle of the liver; the
template is the middle slice, painted with the reference's liver, spleen, kidneys and aorta.
DINOv2 is built with random weights (timm pretrained=False): speed does not depend on the weights.
DINOv2 gives no SAM embeddings, so its pipeline has no box refinement (the library refuses
refine="box" without LiteMedSAM embeddings or a SAM checkpoint); its row says so.

Each measurement runs in its own subprocess so that the peak memory (ru_maxrss; on CUDA also
torch.cuda.max_memory_allocated) belongs to that measurement alone. On CUDA every timer is read
after torch.cuda.synchronize(). The feature cache is off: encoding is what is measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CT = DATA / "totalseg_ct" / "example_ct.nii.gz"
CT_REF = DATA / "totalseg_ct" / "example_seg_fast_force_split.nii.gz"
LABELS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 52: "aorta"}
BACKBONES = ("litemedsam", "dinov2")


# ----------------------------------------------------------------------------------------------
# worker: one (backbone, mode) measurement in a fresh process

def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, bf16: bool):
    import torch

    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _test_volume(n_slices: int):
    """N axial slices of the CT around the liver's middle, and a template on the middle slice."""
    import numpy as np
    import SimpleITK as sitk

    from FewShotSegmentLib import io, templates

    image = io.read_image(CT)
    reference = io.read_labelmap(CT_REF, reference=image)
    ref = sitk.GetArrayFromImage(reference)
    axis = templates.canonical_axis(image, "axial")
    middle = templates.template_slices(ref, 5, axis, 1)[0]
    total = image.GetSize()[2 - axis]
    n = min(n_slices, total)
    lo = max(0, min(middle - n // 2, total - n))
    index, size = [0, 0, 0], list(image.GetSize())
    index[2 - axis], size[2 - axis] = lo, n
    sub_image = sitk.RegionOfInterest(image, size, index)
    sub_ref = sitk.RegionOfInterest(reference, size, index)
    sub = sitk.GetArrayFromImage(sub_ref)
    template = templates.make_template(sub, list(LABELS), axis, [middle - lo])
    template_image = sitk.GetImageFromArray(template)
    template_image.CopyInformation(sub_ref)
    present = {v: {"name": name} for v, name in LABELS.items() if (template == v).any()}
    return sub_image, template_image, present, n


def _backbone(kind: str, device: str):
    from FewShotSegmentLib.backbones import DinoV2Backbone, LiteMedSAMBackbone

    if kind == "litemedsam":
        return LiteMedSAMBackbone(layer="preneck", device=device)
    return DinoV2Backbone(name="vit_small_patch14_dinov2", pretrained=False, device=device)


def worker(args) -> dict:
    import numpy as np
    import torch

    from FewShotSegmentLib import pipeline
    from FewShotSegmentLib.config import PipelineConfig
    from FewShotSegmentLib.features import encode_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    image, template, labels, n = _test_volume(args.slices)
    backbone = _backbone(args.backbone, args.device)
    device = backbone.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    refine = "box" if backbone.provides_sam_embeddings else "none"
    config = PipelineConfig(adapter=args.adapter, refine=refine, device=args.device, cache_dir="",
                            batch_size=args.batch_size, landmarks=False).validate()
    result = {"backbone": backbone.id, "mode": args.mode, "slices": n, "device": str(device),
              "bf16": args.bf16, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "refine": refine, "adapter": args.adapter}

    # warm-up on one batch (first-call allocations, kernels, lazy imports), not timed
    with _autocast(device, args.bf16):
        warm = np.zeros((min(args.batch_size, n),) + tuple(image.GetSize()[:2][::-1]), np.float32)
        backbone.encode(warm)
    _sync(device)

    if args.mode == "encoder":
        # the same orientation and normalization as prepare_volume, done before the timer starts
        import SimpleITK as sitk

        from FewShotSegmentLib.features import slices_along
        from FewShotSegmentLib.preprocessing import normalize_volume

        volume = normalize_volume(sitk.GetArrayFromImage(pipeline._to_canonical(image)), config.modality, config.ct_window)
        slices = np.ascontiguousarray(slices_along(volume, config.axis), dtype=np.float32)
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, args.bf16):
            encode_volume(slices, backbone, batch_size=args.batch_size)
        _sync(device)
        result["encode_s"] = time.perf_counter() - start
        result["total_s"] = result["encode_s"]
    else:
        start = time.perf_counter()
        with _autocast(device, args.bf16):
            prepared = pipeline.prepare_volume(image, config, backbone)
        _sync(device)
        result["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model = pipeline.train(prepared, template, config, labels, backbone.id)
        _sync(device)
        result["train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        prediction = pipeline.segment(model, prepared, template)
        _sync(device)
        result["segment_s"] = time.perf_counter() - start
        timings = prediction.summary["timings"]
        result["propagate_s"] = timings["propagate_s"]
        result["refine_s"] = timings.get("refine_s")
        result["total_s"] = result["encode_s"] + result["train_s"] + result["segment_s"]
    result["per_slice_s"] = result["total_s"] / n
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


# ----------------------------------------------------------------------------------------------
# driver

def run_worker(args, backbone: str, mode: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--backbone", backbone, "--mode", mode,
               "--device", args.device, "--slices", str(args.slices), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--adapter", args.adapter] + (["--bf16"] if args.bf16 else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{backbone}/{mode} failed:\n{done.stderr[-3000:]}")


def table(results: list[dict]) -> str:
    from FewShotSegmentLib.metrics import format_table

    rows = []
    for r in results:
        ms = lambda key: None if r.get(key) is None else round(1000 * r[key] / r["slices"])
        rows.append({"backbone": r["backbone"], "measure": r["mode"], "slices": r["slices"],
                     "ms/slice": round(1000 * r["per_slice_s"]), "encode ms/slice": ms("encode_s"),
                     "train s": None if r.get("train_s") is None else round(r["train_s"], 1),
                     "propagate ms/slice": ms("propagate_s"),
                     "refine ms/slice": ms("refine_s") if r["mode"] == "pipeline" and r["refine"] != "none"
                     else ("n/a" if r["mode"] == "pipeline" else None),
                     "total s": round(r["total_s"], 1), "peak RSS MB": round(r["maxrss_mb"]),
                     "CUDA peak MB": None if r.get("cuda_peak_mb") is None else round(r["cuda_peak_mb"])})
    columns = ["backbone", "measure", "slices", "ms/slice", "encode ms/slice", "train s", "propagate ms/slice",
               "refine ms/slice", "total s", "peak RSS MB", "CUDA peak MB"]
    return format_table(rows, columns)


def header(args) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gpu = ""
    if args.device == "cuda":
        import torch

        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    command = " ".join([".venv/bin/python", "benchmarks/speed.py"] + sys.argv[1:])
    return (f"# Speed benchmark\n\n- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores{gpu} (shared with other jobs)\n"
            f"- commit: {commit}\n- command: `{command}`\n"
            f"- device {args.device}, bf16 autocast {'on' if args.bf16 else 'off'}, encoder batch {args.batch_size}, "
            f"torch threads {args.threads or 'default'}, adapter {args.adapter}\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--slices", type=int, default=16, help="axial slices in the test volume (CT has 112)")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around the encoder")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per encoder batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--adapter", default="contrastive", choices=("basic", "classification", "contrastive"))
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("encoder", "pipeline"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA GPU")
    results = []
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        if backbone not in BACKBONES:
            raise SystemExit(f"backbones are {BACKBONES}, got {backbone!r}")
        for mode in ("encoder", "pipeline"):
            start = time.perf_counter()
            results.append(run_worker(args, backbone, mode))
            print(f"{backbone} {mode}: {results[-1]['per_slice_s'] * 1000:.0f} ms/slice "
                  f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(header(args) + "\n```\n" + text + "\n```\n\n<details><summary>raw</summary>\n\n```json\n"
                                  + json.dumps(results, indent=1) + "\n```\n</details>\n")


if __name__ == "__main__":
    main()
