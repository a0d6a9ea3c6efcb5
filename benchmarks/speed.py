"""Speed benchmark (issue 9): the encoder in fp32 eager and optimized, measured in one run, and
the whole job end to end on the demo CT and on a 512x512x300 CT, re-propagation after one more
painted slice, and peak memory.

    .venv/bin/python benchmarks/speed.py --device cpu
    .venv/bin/python benchmarks/speed.py --device cuda          # on a machine with a CUDA GPU

Each measurement runs in its own process (peak RSS = ru_maxrss of that process; on CUDA also
torch.cuda.max_memory_allocated; every timer read after torch.cuda.synchronize). The feature
cache is off everywhere except where a measurement says so.
- encoder: N axial slices of the demo CT, batch 4. "before" is fp32 eager with glibc's default
  allocator settings (FEWSHOT_KEEP_FREED_MEMORY=0, what the project ran before); then fp32 eager,
  fp32 optimized (folded, channels-last, compiled) and the default "auto" path. The first batch
  (compilation, first-touch allocations) is timed separately and not counted per slice.
- demo / ct300: worker.execute of a "run" job (read, encode, train, propagate, clean, refine,
  landmarks, write), default config (slices encoded on demand: only those the painting
  reaches; the table says how many). The 300-slice CT is the demo CT resampled (linear; labels
  nearest) to 512x512 pixels of 0.7 mm in-plane and 300 slices; the template is one axial slice
  with liver, spleen and both kidneys from the reference. Built in a temporary folder, never kept.
  Its 1.1 mm slices are encoded every second one by default (features.encoding_step);
  ct300_every_slice is the same job with encode_step 1, for the side-by-side figure.
- repropagate: the demo job in a session (the persistent worker's path), then the same job with
  one more painted slice; the second job's wall time.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "FewShotSegment" / "Resources" / "SampleData"
CT = SAMPLE / "example_ct.nii.gz"
CT_REF = SAMPLE / "example_seg_fast_force_split.nii.gz"
LABELS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left"}
ENCODER_VARIANTS = {  # name: (precision, compile, keep freed memory)
    "fp32 eager, default malloc (before)": ("fp32", "off", "0"),
    "fp32 eager": ("fp32", "off", "1"),
    "fp32 optimized": ("fp32", "auto", "1"),
    "optimized (auto)": ("auto", "auto", "1"),
}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(result: dict, device) -> dict:
    import torch

    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux: KiB
    if device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return result


def measure_encoder(args) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from FewShotSegmentLib import io, pipeline
    from FewShotSegmentLib.backbones import build_backbone
    from FewShotSegmentLib.features import encode_volume, slices_along
    from FewShotSegmentLib.preprocessing import normalize_volume

    precision, compile_mode, _ = ENCODER_VARIANTS[args.variant]
    image = io.read_image(CT)
    volume = normalize_volume(sitk.GetArrayFromImage(pipeline._to_canonical(image)), "auto", "abdomen")
    slices = np.ascontiguousarray(slices_along(volume, "axial"), dtype=np.float32)
    middle = len(slices) // 2
    slices = slices[max(0, middle - args.slices // 2):][:args.slices]
    backbone = build_backbone("litemedsam", device=args.device, precision=precision, compile=compile_mode)
    start = time.perf_counter()
    backbone.encode(slices[:args.batch_size])            # compile / first touch, timed apart
    _sync(backbone.device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    features = encode_volume(slices, backbone, batch_size=args.batch_size)
    _sync(backbone.device)
    seconds = time.perf_counter() - start
    np.save(Path(args.scratch) / f"{args.variant_index}.npy", features.features[:8].float().numpy())
    return _peak({"variant": args.variant, "slices": len(slices), "first_batch_s": round(first, 2),
                  "s_per_slice": seconds / len(slices), "acceleration": backbone.acceleration,
                  "threads": __import__("torch").get_num_threads()}, backbone.device)


def _template_on(reference, image, extra_slice: bool):
    """One axial slice through the liver's middle with every organ of LABELS painted on it (and,
    with extra_slice, a second one 8 slices below): what a user paints."""
    import numpy as np
    import SimpleITK as sitk

    from FewShotSegmentLib import templates

    ref = sitk.GetArrayFromImage(reference)
    axis = templates.canonical_axis(image, "axial")
    middle = templates.template_slices(ref, 5, axis, 1)[0]
    chosen = [middle] + ([middle - 8] if extra_slice else [])
    template = templates.make_template(ref, list(LABELS), axis, chosen)
    out = sitk.GetImageFromArray(template.astype(np.uint8))
    out.CopyInformation(reference)
    return out


def _ct300(folder: Path):
    """The demo CT resampled to 512x512x300 (and its labels), written as .nrrd in ``folder``."""
    return resampled_ct(folder, 300)


def resampled_ct(folder: Path, slices: int):
    """The demo CT resampled to 512x512 pixels and ``slices`` slices (and its labels), written as
    ct<slices>.nrrd in ``folder``; returns (path, image, labels)."""
    import SimpleITK as sitk

    from FewShotSegmentLib import io

    image = io.read_image(CT)
    reference = io.read_labelmap(CT_REF, reference=image)
    size, spacing = image.GetSize(), image.GetSpacing()
    extent = [sz * sp for sz, sp in zip(size, spacing)]
    new_size = [512, 512, slices]
    new_spacing = [e / n for e, n in zip(extent, new_size)]
    grid = sitk.Image(new_size, sitk.sitkInt16)
    grid.SetSpacing(new_spacing)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * ns / sp for ns, sp in zip(new_spacing, spacing)]))
    big = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16)
    labels = sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(big, str(folder / f"ct{slices}.nrrd"))
    sitk.WriteImage(labels, str(folder / f"ct{slices}_labels.nrrd"))
    return folder / f"ct{slices}.nrrd", big, labels


def _job(image_path, template_path, out_dir, device, **config):
    return {"task": "run", "image": str(image_path), "template": str(template_path), "output_dir": str(out_dir),
            "labels": {str(v): {"name": n} for v, n in LABELS.items()}, "overwrite": True,
            "config": {"device": device, "cache_dir": "", **config}}


def measure_job(args) -> dict:
    import SimpleITK as sitk

    from FewShotSegmentLib import io, worker

    scratch = Path(args.scratch)
    if args.job.startswith("ct300"):
        image_path, image, reference = _ct300(scratch)
    else:
        image_path = CT
        image = io.read_image(CT)
        reference = io.read_labelmap(CT_REF, reference=image)
    template_path = scratch / f"{args.job}_template.nrrd"
    sitk.WriteImage(_template_on(reference, image, False), str(template_path))
    size = list(image.GetSize())
    del image, reference             # the job reads its own copies: these would count in its peak
    start = time.perf_counter()
    # ct300_every_slice: the same job encoding every slice (encode_step 1), beside the default
    # (every second slice of this 1.1 mm CT), so the thin-slice step is measured in the same run
    step = {"encode_step": 1} if args.job == "ct300_every_slice" else {}
    worker.execute(_job(image_path, template_path, scratch / args.job, args.device, **step))
    seconds = time.perf_counter() - start
    summary = json.loads((scratch / args.job / "summary.json").read_text())
    import torch

    return _peak({"job": args.job, "size": size, "end_to_end_s": round(seconds, 1),
                  "timings": {k: round(v, 2) for k, v in summary["timings"].items()},
                  "encoded_slices": summary.get("encoded_slices"), "scored_slices": summary.get("scored_slices"),
                  "threads": torch.get_num_threads()}, torch.device("cuda" if args.device == "cuda" else "cpu"))


def measure_repropagate(args) -> dict:
    import SimpleITK as sitk

    from FewShotSegmentLib import io, worker
    from FewShotSegmentLib.session import Session

    scratch = Path(args.scratch)
    image = io.read_image(CT)
    reference = io.read_labelmap(CT_REF, reference=image)
    session = Session()
    times = []
    for step, extra in enumerate((False, True)):
        template_path = scratch / f"repropagate_{step}.nrrd"
        sitk.WriteImage(_template_on(reference, image, extra), str(template_path))
        start = time.perf_counter()
        worker.execute(_job(CT, template_path, scratch / f"repropagate_{step}", args.device), session=session)
        times.append(time.perf_counter() - start)
    summary = json.loads((scratch / "repropagate_1" / "summary.json").read_text())
    import torch

    return _peak({"job": "repropagate", "first_s": round(times[0], 1), "repropagate_s": round(times[1], 1),
                  "timings": {k: round(v, 2) for k, v in summary["timings"].items()},
                  "encoded_slices": summary.get("encoded_slices"), "scored_slices": summary.get("scored_slices"), "reused": summary.get("reused")},
                 torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# driver

def _child(args, *extra, env=None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--slices", str(args.slices),
               "--batch-size", str(args.batch_size), "--scratch", args.scratch, *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{extra} failed:\n{done.stderr[-3000:]}")


def _cosines(scratch: Path, names: list[str]) -> dict:
    import numpy as np

    reference = np.load(scratch / "1.npy").reshape(8, -1)      # fp32 eager
    out = {}
    for i, name in enumerate(names):
        other = np.load(scratch / f"{i}.npy").reshape(8, -1)
        cos = (reference * other).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(other, axis=1)
        out[name] = round(float(cos.min()), 5)
    return out


def report(results: dict, args) -> tuple[str, dict]:
    from FewShotSegmentLib.metrics import format_table

    enc = results["encoder"]
    eager = enc["fp32 eager, default malloc (before)"]["s_per_slice"]
    fast = enc["optimized (auto)"]
    rows = [{"measure": f"encoder: {name}", "s/slice": round(r["s_per_slice"], 3),
             "x vs before": round(eager / r["s_per_slice"], 2), "first batch s": r["first_batch_s"],
             "cosine to fp32 eager": results["cosine"][name], "peak RSS MB": r["peak_rss_mb"],
             "notes": f"{r['acceleration']['precision']}{', compiled' if r['acceleration']['compiled'] else ''}"}
            for name, r in enc.items()]
    ct300 = results.get("ct300") or results["demo"]          # --skip ct300: ratios from the demo
    encode300 = ct300["timings"]["encode_s"]
    for name in ("demo", "ct300", "ct300_every_slice"):
        if name not in results:
            continue
        r = results[name]
        stages = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["timings"].items())
        title = "ct300, encode_step 1" if name == "ct300_every_slice" else name
        rows.append({"measure": f"end to end: {title} {'x'.join(map(str, r['size']))}", "s/slice": None,
                     "x vs before": None, "first batch s": None, "cosine to fp32 eager": None,
                     "peak RSS MB": r["peak_rss_mb"],
                     "notes": f"{r['end_to_end_s']} s ({stages}); {r.get('encoded_slices')} of {r['size'][2]} "
                              f"slices encoded"})
    rep = results.get("repropagate") or {"repropagate_s": None, "first_s": None, "timings": {}, "peak_rss_mb": None}
    rows.append({"measure": "re-propagation, one more painted slice (demo, session)", "s/slice": None,
                 "x vs before": None, "first batch s": None, "cosine to fp32 eager": None,
                 "peak RSS MB": rep["peak_rss_mb"],
                 "notes": f"{rep['repropagate_s']} s (first job {rep['first_s']} s; "
                          + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in rep["timings"].items()) + ")"})
    columns = ["measure", "s/slice", "x vs before", "first batch s", "cosine to fp32 eager", "peak RSS MB", "notes"]
    summary = {"device": args.device, "encoder_s_per_slice": round(fast["s_per_slice"], 3),
               "encoder_fp32_fallback_s_per_slice": round(enc["fp32 optimized"]["s_per_slice"], 3),
               "speedup_vs_eager": round(eager / fast["s_per_slice"], 2),
               "speedup_vs_eager_same_allocator": round(enc["fp32 eager"]["s_per_slice"] / fast["s_per_slice"], 2),
               "demo_end_to_end_s": results["demo"]["end_to_end_s"],
               "ct300_end_to_end_s": results["ct300"]["end_to_end_s"] if "ct300" in results else None,
               "ct300_every_slice_end_to_end_s": (results["ct300_every_slice"]["end_to_end_s"]
                                                  if "ct300_every_slice" in results else None),
               "pipeline_over_encoder": round(ct300["end_to_end_s"] / max(encode300, 1e-6), 2),
               # slices are encoded on demand (only those the painting reaches): the job against
               # what encoding every slice of the volume costs at the measured rate
               "pipeline_over_encoding_every_slice": round(
                   ct300["end_to_end_s"] / (fast["s_per_slice"] * ct300["size"][2]), 2),
               "ct300_encoded_slices": ct300.get("encoded_slices"),
               "repropagate_s": rep["repropagate_s"],
               "peak_rss_mb": max(results[k]["peak_rss_mb"] for k in ("demo", "ct300") if k in results),
               "ct300_peak_rss_mb": ct300["peak_rss_mb"], "raw": results}
    return format_table(rows, columns), summary


def cpu_description() -> str:
    """The CPU's model name and its bf16 units (what the encoder's speed depends on): figures of
    an AMX CPU and of an AVX512-BF16 one differ by 2x and must not be compared."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    cpu = getattr(torch, "cpu", None)
    units = [unit for unit, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
             if getattr(cpu, probe, None) is not None and getattr(cpu, probe)()]
    return f"{name} ({', '.join(units) or 'no bf16 units'})"


def header(args, minutes: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gpu = ""
    if args.device == "cuda":
        import torch

        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    command = " ".join([".venv/bin/python", "benchmarks/speed.py"] + sys.argv[1:])
    return (f"# Speed benchmark ({args.device})\n\n- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {cpu_description()}{gpu}\n- commit: {commit}\n"
            f"- command: `{command}` ({minutes:.1f} min)\n- encoder: {args.slices} demo-CT slices, batch {args.batch_size}\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--slices", type=int, default=32, help="demo-CT slices for the encoder rows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="", help="markdown file (default benchmarks/results/speed_<device>.md)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: ct300,ct300_every_slice,repropagate")
    parser.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--variant-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(measure_encoder(args)), flush=True)
        return
    if args.job == "repropagate":
        print("RESULT " + json.dumps(measure_repropagate(args)), flush=True)
        return
    if args.job:
        print("RESULT " + json.dumps(measure_job(args)), flush=True)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA GPU")
    began = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="fewshot-speed-") as scratch:
        args.scratch = scratch
        results = {"encoder": {}}
        names = list(ENCODER_VARIANTS)
        for i, name in enumerate(names):
            keep = ENCODER_VARIANTS[name][2]
            results["encoder"][name] = _child(args, "--variant", name, "--variant-index", str(i),
                                              env={"FEWSHOT_KEEP_FREED_MEMORY": keep})
            print(f"encoder {name}: {results['encoder'][name]['s_per_slice']:.3f} s/slice", flush=True)
        results["cosine"] = _cosines(Path(scratch), names)
        for job in ("demo", "ct300", "ct300_every_slice", "repropagate"):
            if job in skip:
                continue
            results[job] = _child(args, "--job", job)
            print(f"{job}: {results[job]}", flush=True)
    text, summary = report(results, args)
    print(text)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    minutes = (time.perf_counter() - began) / 60
    summary.update(command=" ".join(["benchmarks/speed.py"] + sys.argv[1:]), minutes=round(minutes, 1), cpu=cpu_description(),
                   commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip(),
                   date=datetime.datetime.now().isoformat(timespec="minutes"))
    out.write_text(header(args, minutes) + "\n```\n" + text + "\n```\n")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
