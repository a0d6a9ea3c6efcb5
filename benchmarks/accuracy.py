"""Accuracy benchmark: 3D Dice per label of each adapter after each step of the pipeline
(adapter only, + 3D connected components, + SAM box refinement), against Slicer's
"Fill between slices" given the same painted slices.

    .venv/bin/python benchmarks/accuracy.py --dataset all --out benchmarks/results/accuracy.md

Each (adapter, template) is trained once; the three steps come from one
``segment(..., keep_stages=True)`` per target volume. On the template's own volume the template
seeds the component clean-up (as in the Slicer module); on another patient there is no template
(as ``pipeline.predict``).

Every finished run is appended to ``<out>.runs.jsonl``; a second invocation reuses those records
(``--fresh`` recomputes), so an interrupted run resumes where it stopped. The markdown file is
rewritten after every run, and each table is printed as soon as its runs are done.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# slicer-core's ITK runs Fill between slices on its pool threads, whose thread-local filters are
# destroyed after ITK itself when the process exits: a segfault (rc 139) after every result was
# written (gdb: OrImageFilter::~OrImageFilter in __call_tls_dtors). Threads that end with each
# filter run (the "Platform" threader) destroy them while ITK is alive. Read when ITK first threads.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")

import numpy as np
import SimpleITK as sitk
import torch

from FewShotSegmentLib import io, pipeline, templates
from FewShotSegmentLib.config import COMPILE_MODES, PRECISIONS, PipelineConfig
from FewShotSegmentLib.landmarks import localization_scores
from FewShotSegmentLib.metrics import format_table, per_label_scores

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = str(ROOT / ".cache" / "features")

# value -> (name given to the pipeline, short column name)
CT_LABELS = {5: ("liver", "liver"), 1: ("spleen", "spleen"), 2: ("kidney_right", "kid_R"),
             3: ("kidney_left", "kid_L"), 52: ("aorta", "aorta")}
CHAOS_LABELS = {1: ("liver", "liver"), 2: ("kidney_right", "kid_R"), 3: ("kidney_left", "kid_L"),
                4: ("spleen", "spleen")}
CHAOS_PATIENTS = (1, 2, 3, 5, 8)

STEPS = (("adapter", "adapter"), ("components", "+components"), ("refined", "+refine"))
# method name -> (adapter, center_features)
METHODS = {"basic": ("basic", False), "basic+centre": ("basic", True),
           "classification": ("classification", False), "contrastive": ("contrastive", False)}
SLICER = "slicer-fill"


# ----------------------------------------------------------------------------------------------
# data

class Volume:
    def __init__(self, image_path: Path, label_path: Path, name: str):
        self.name = name
        self.image = io.read_image(image_path)
        self.reference_image = io.read_labelmap(label_path, reference=self.image)
        self.reference = sitk.GetArrayFromImage(self.reference_image)        # (z, y, x)
        self.axis = templates.canonical_axis(self.image, "axial")            # array axis of axial
        self.spacing_zyx = self.image.GetSpacing()[::-1]
        self._prepared = None

    def prepared(self, config: PipelineConfig, backbone):
        if self._prepared is None:
            self._prepared = pipeline.prepare_volume(self.image, config, backbone)
        return self._prepared

    def template(self, values: list[int], per_label: int, slice_label: int | None = None):
        """Painted template: ``per_label`` slices through each label's extent (or through
        ``slice_label``'s only), each painted with every label of ``values`` present on it."""
        sources = [slice_label] if slice_label is not None else values
        slices = sorted({s for v in sources for s in templates.template_slices(self.reference, v, self.axis, per_label)})
        array = templates.make_template(self.reference, values, self.axis, slices)
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.reference_image)
        return array, image, slices


def ct_volume():
    return Volume(DATA / "totalseg_ct" / "example_ct.nii.gz",
                  DATA / "totalseg_ct" / "example_seg_fast_force_split.nii.gz", "ct")


def chaos_volume(n: int):
    return Volume(DATA / "chaos_mri" / f"image_{n}.nii.gz", DATA / "chaos_mri" / f"label_{n}.nii.gz", f"P{n}")


# ----------------------------------------------------------------------------------------------
# Slicer "Fill between slices"

def fill_between_slices(template: np.ndarray) -> np.ndarray:
    """Slicer's Fill between slices on a (z, y, x) label array: vtkITKMorphologicalContourInterpolator
    with Slicer's settings (the filter's defaults: all axes, heuristic alignment, no distance
    transform, cross structuring element) on the merged labelmap cropped to the extent of the
    segments, as the effect does (EXTENT_UNION_OF_EFFECTIVE_SEGMENTS)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    out = np.zeros_like(template)
    nonzero = np.argwhere(template > 0)
    if len(nonzero) == 0:
        return out
    lo, hi = nonzero.min(0), nonzero.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = np.ascontiguousarray(template[box].astype(np.int16))
    nz, ny, nx = crop.shape
    image = vtk.vtkImageData()
    image.SetDimensions(nx, ny, nz)          # VTK: x fastest, so a C-order (z, y, x) array maps directly
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(crop.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    interpolator = slicer.vtkITKMorphologicalContourInterpolator()
    interpolator.SetInputData(image)
    interpolator.Update()
    result = numpy_support.vtk_to_numpy(interpolator.GetOutput().GetPointData().GetScalars()).reshape(nz, ny, nx)
    out[box] = result
    return out


# ----------------------------------------------------------------------------------------------
# scoring

def dice_row(pred: np.ndarray, reference: np.ndarray, labels: dict, learned: list[int]) -> dict:
    scores = per_label_scores(pred, reference, list(labels))
    row = {}
    for value, (_, short) in labels.items():
        row[short] = scores[value]["dice"] if value in learned else None
    values = [row[labels[v][1]] for v in learned if not math.isnan(row[labels[v][1]])]
    row["mean"] = float(np.mean(values)) if values else math.nan
    return row


def localization_row(pred: np.ndarray, volume: Volume, labels: dict, learned: list[int]) -> dict:
    row, accs, dists = {}, [], []
    for value, (_, short) in labels.items():
        if value not in learned:
            continue
        s = localization_scores(pred == value, volume.reference == value, volume.spacing_zyx, volume.axis, 10)
        row[f"{short} acc"], row[f"{short} mm"] = s["slice_accuracy"], s["distance_mm"]
        accs.append(s["slice_accuracy"])
        if not math.isnan(s["distance_mm"]):
            dists.append(s["distance_mm"])
    row["mean acc"] = float(np.mean(accs)) if accs else math.nan
    row["mean mm"] = float(np.mean(dists)) if dists else math.nan
    return row


# ----------------------------------------------------------------------------------------------
# runs

class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.runs_file = self.out.with_name(self.out.name.removesuffix(".md") + ".runs.jsonl")
        self.records: dict[str, dict] = {}
        if self.runs_file.is_file() and not args.fresh:
            for line in self.runs_file.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record
            if self.records:
                print(f"reusing {len(self.records)} finished runs from {self.runs_file} (--fresh to recompute)", flush=True)
        elif args.fresh and self.runs_file.exists():
            self.runs_file.unlink()
        self.sections: list[str] = []
        self.header = header_text(args)
        self.backbone = None
        self.volumes: dict[str, Volume] = {}

    def config(self, method: str) -> PipelineConfig:
        adapter, centre = METHODS[method]
        return PipelineConfig(adapter=adapter, center_features=centre, cache_dir=self.args.cache_dir,
                              device="cpu", seed=self.args.seed, precision=self.args.precision,
                              compile=self.args.compile).validate()

    def get_backbone(self):
        if self.backbone is None:
            self.backbone = pipeline.build_backbone_for(self.config("contrastive"))
        return self.backbone

    def volume(self, key: str, make):
        if key not in self.volumes:
            self.volumes[key] = make()
        return self.volumes[key]

    def save(self, record: dict):
        self.records[record["key"]] = record
        self.runs_file.parent.mkdir(parents=True, exist_ok=True)
        with self.runs_file.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")

    def write_markdown(self, extra: str = ""):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(self.header + "\n".join(self.sections) + extra)

    # --- one template -> targets, all methods ---------------------------------------------------
    def run_template(self, dataset: str, labels: dict, variant: str, template_volume: Volume,
                     values: list[int], per_label: int, slice_label: int | None, targets: list[tuple[str, callable]],
                     description: list[str]) -> list[dict]:
        template_array, template_image, slices = template_volume.template(values, per_label, slice_label)
        painted = {labels[v][1]: int((template_array == v).any(axis=tuple(a for a in range(3) if a != template_volume.axis)).sum())
                   for v in values}
        description.append(f"- template `{variant}` on {template_volume.name}: axial slices {slices} "
                           f"(array axis {template_volume.axis}); painted slices per label {painted}")
        rows = []
        # Slicer baseline on the template's own volume
        key = f"{dataset}|{variant}|{template_volume.name}|{SLICER}|{template_volume.name}"
        if key not in self.records:
            import slicer  # noqa: F401  (import outside the timer)

            start = time.perf_counter()
            filled = fill_between_slices(template_array)
            seconds = time.perf_counter() - start
            on_template = np.take(filled, slices, axis=template_volume.axis)
            exact = bool((on_template == np.take(template_array, slices, axis=template_volume.axis)).all())
            self.save({"key": key, "dataset": dataset, "variant": variant, "template": template_volume.name,
                       "method": SLICER, "target": template_volume.name, "slices": slices,
                       "dice": {"fill": dice_row(filled, template_volume.reference, labels, values)},
                       "template_dice": dice_row(on_template, np.take(template_volume.reference, slices, axis=template_volume.axis), labels, values),
                       "template_exact": exact, "fill_s": seconds,
                       "only_painted": bool((filled > 0).sum() == (template_array > 0).sum())})
        record = self.records[key]
        print(f"  {SLICER:14s} {variant} {record['target']}: mean Dice {record['dice']['fill']['mean']:.3f}, "
              f"{record['fill_s']:.1f} s; painted slices reproduced exactly: {record['template_exact']} "
              f"(Dice on them {record['template_dice']['mean']:.3f})"
              + ("; output = the painted slices only (nothing to interpolate)" if record["only_painted"] else ""),
              flush=True)
        rows.append(record)
        for method in self.args.methods:
            keys = {name: f"{dataset}|{variant}|{template_volume.name}|{method}|{name}" for name, _ in targets}
            if all(k in self.records for k in keys.values()):
                for name, _ in targets:
                    rows.append(self.records[keys[name]])
                    print_run(self.records[keys[name]])
                continue
            config = self.config(method)
            backbone = self.get_backbone()
            prepared = template_volume.prepared(config, backbone)
            start = time.perf_counter()
            model = pipeline.train(prepared, template_image, config, {v: {"name": labels[v][0]} for v in values}, backbone.id)
            train_s = time.perf_counter() - start
            for name, make in targets:
                if keys[name] in self.records:
                    rows.append(self.records[keys[name]])
                    print_run(self.records[keys[name]])
                    continue
                target = self.volume(name, make)
                same = target is template_volume
                start = time.perf_counter()
                target_prepared = target.prepared(config, backbone)
                encode_s = time.perf_counter() - start
                start = time.perf_counter()
                prediction = pipeline.segment(model, target_prepared, template_image if same else None, keep_stages=True)
                segment_s = time.perf_counter() - start
                timings = prediction.summary["timings"]
                record = {"key": keys[name], "dataset": dataset, "variant": variant, "template": template_volume.name,
                          "method": method, "target": name, "slices": slices, "train_s": train_s,
                          "encode_s": encode_s, "segment_s": segment_s,
                          "propagate_s": timings.get("propagate_s", math.nan), "refine_s": timings.get("refine_s", math.nan),
                          "not_found": prediction.summary["not_found"], "dice": {}, "localization": {}}
                for stage, step in STEPS:
                    pred = sitk.GetArrayFromImage(prediction.stages[stage])
                    record["dice"][step] = dice_row(pred, target.reference, labels, values)
                    if method == "contrastive":
                        record["localization"][step] = localization_row(pred, target, labels, values)
                self.save(record)
                rows.append(record)
                print_run(record)
        return rows


def print_run(record: dict):
    steps = " -> ".join(f"{record['dice'][step]['mean']:.3f}" for _, step in STEPS)
    print(f"  {record['method']:14s} {record['variant']} {record['template']}->{record['target']}: mean Dice {steps} "
          f"(train {record['train_s']:.0f} s, propagate {record['propagate_s']:.0f} s, refine {record['refine_s']:.0f} s, "
          f"segment {record['segment_s']:.0f} s)" + (f"; not found: {record['not_found']}" if record["not_found"] else ""),
          flush=True)


# ----------------------------------------------------------------------------------------------
# tables

def seconds(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(round(value))


def detail_table(rows: list[dict], labels: dict) -> str:
    shorts = [s for _, s in labels.values()]
    columns = ["template", "target", "method", "step"] + shorts + ["mean", "train_s", "segment_s"]
    table = []
    for record in rows:
        base = {"template": f"{record['variant']} {record['template']}", "target": record["target"],
                "method": record["method"]}
        if record["method"] == SLICER:
            table.append({**base, "step": "fill", **record["dice"]["fill"], "segment_s": seconds(record["fill_s"])})
            continue
        for i, (_, step) in enumerate(STEPS):
            last = i == len(STEPS) - 1
            table.append({**base, "step": step, **record["dice"][step],
                          "train_s": seconds(record["train_s"]) if last else None,
                          "segment_s": seconds(record["segment_s"]) if last else None})
    return format_table(table, columns)


def summary_table(rows: list[dict]) -> str:
    """Final-step mean Dice: one row per (template, method), one column per target."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    table = {}
    for record in rows:
        row = table.setdefault((record["variant"], record["template"], record["method"]),
                               {"template": f"{record['variant']} {record['template']}", "method": record["method"]})
        final = record["dice"]["fill"] if record["method"] == SLICER else record["dice"]["+refine"]
        row[record["target"]] = final["mean"]
    for row in table.values():
        cross = [v for t, v in row.items() if t in targets and t != row["template"].split()[-1]]
        row["cross mean"] = float(np.mean(cross)) if cross else None
    return format_table(list(table.values()), ["template", "method"] + targets + ["cross mean"])


def localization_table(rows: list[dict], labels: dict) -> str:
    shorts = [s for _, s in labels.values()]
    columns = ["template", "target", "step"] + [f"{s} {m}" for s in shorts for m in ("acc", "mm")] + ["mean acc", "mean mm"]
    table = []
    for record in rows:
        if record["method"] != "contrastive":
            continue
        for _, step in STEPS:
            table.append({"template": f"{record['variant']} {record['template']}", "target": record["target"],
                          "step": step, **record["localization"][step]})
    return format_table(table, columns)


def section(title: str, description: list[str], rows: list[dict], labels: dict) -> str:
    parts = [f"\n## {title}\n", *description, "",
             "Final mean Dice (after box refinement; Slicer: its fill), per target:\n", "```",
             summary_table(rows), "```", "",
             "3D Dice per label after each step (train_s: adapter training, once per template; "
             "segment_s: propagation + components + refinement on that target, features from cache):\n",
             "```", detail_table(rows, labels), "```"]
    if any(r["method"] == "contrastive" for r in rows):
        parts += ["", "Localization, contrastive adapter (acc: fraction of reference slices whose predicted 2D "
                  "point is within 10 px of the reference's; mm: 3D distance between region points):\n",
                  "```", localization_table(rows, labels), "```"]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# datasets

def run_ct(runner: Runner) -> str:
    labels = {v: n for v, n in CT_LABELS.items() if v != 52 or runner.args.aorta}
    volume = runner.volume("ct", ct_volume)
    targets = [("ct", ct_volume)]
    description = ["TotalSegmentator example CT (122x101x112, 3 mm); reference = TotalSegmentator output "
                   "(not manual). Same volume: the template seeds the component clean-up."]
    rows = []
    values = list(labels)
    variants = [("1 slice", values, 1, 5), ("liver only", [5], 1, 5), ("3/label", values, 3, None)]
    for variant, vals, per_label, slice_label in variants:
        if variant not in runner.args.variants:
            continue
        print(f"\n[ct] template '{variant}'", flush=True)
        rows += runner.run_template("ct", labels, variant, volume, vals, per_label, slice_label, targets, description)
        runner.write_markdown(section("TotalSeg CT (in progress)", description, rows, labels))
    text = section("TotalSeg CT", description, rows, labels)
    print(text, flush=True)
    return text


def run_chaos(runner: Runner) -> str:
    labels = CHAOS_LABELS
    values = list(labels)
    patients = CHAOS_PATIENTS if runner.args.pairs == "all" else (runner.args.template_patient,)
    description = ["CHAOS T2-SPIR MRI (256x256x31-46, 1.25x1.25x7.7 mm); human reference. "
                   "Template on the template patient only; other patients are segmented without template "
                   "(as `pipeline.predict`)."]
    rows = []
    for patient in patients:
        template_volume = runner.volume(f"P{patient}", lambda p=patient: chaos_volume(p))
        cross = CHAOS_PATIENTS if runner.args.pairs == "all" else runner.args.targets
        all_targets = [(f"P{patient}", lambda p=patient: chaos_volume(p))] + \
                      [(f"P{t}", lambda t=t: chaos_volume(t)) for t in cross if t != patient]
        for variant, per_label in (("1/label", 1), ("3/label", 3)):
            if variant not in runner.args.variants:
                continue
            targets = all_targets if (per_label == 1 or runner.args.three_slice_targets == "all") else all_targets[:1]
            print(f"\n[chaos] template '{variant}' from P{patient} -> {[t for t, _ in targets]}", flush=True)
            rows += runner.run_template("chaos", labels, variant, template_volume, values, per_label, None,
                                        targets, description)
            runner.write_markdown(section("CHAOS MRI (in progress)", description, rows, labels))
    text = section("CHAOS MRI", description, rows, labels)
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "FewShotSegmentLib"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return commit + (" (library has uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def header_text(args) -> str:
    command = " ".join([".venv/bin/python", "benchmarks/accuracy.py"] + sys.argv[1:])
    return (f"# Accuracy benchmark\n\n"
            f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU (shared with other jobs; "
            f"torch threads: {args.threads})\n"
            f"- commit: {git_commit()}\n"
            f"- command: `{command}`\n"
            f"- backbone: LiteMedSAM pre-neck features (bundled weights), box refinement with LiteMedSAM; "
            f"seed {args.seed}\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("ct", "chaos", "all"), default="all")
    parser.add_argument("--adapters", default="basic,classification,contrastive",
                        help="comma list of basic, classification, contrastive (basic runs without and with centring)")
    parser.add_argument("--template-patient", type=int, default=1, choices=CHAOS_PATIENTS)
    parser.add_argument("--targets", default="2,3,5,8", help="CHAOS patients segmented with the template patient's adapter")
    parser.add_argument("--pairs", choices=("targets", "all"), default="targets",
                        help="all: every CHAOS patient as template, every other as target")
    parser.add_argument("--variants", default="1 slice,liver only,3/label,1/label",
                        help="template variants to run (CT: '1 slice', 'liver only', '3/label'; CHAOS: '1/label', '3/label')")
    parser.add_argument("--three-slice-targets", choices=("same", "all"), default="same",
                        help="3/label templates: segment only the template's own volume (the comparison with "
                             "Slicer's fill) or also the other patients")
    parser.add_argument("--no-aorta", dest="aorta", action="store_false", help="CT: leave out the aorta (label 52)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: measured 4-10x faster than 2 here when other jobs share the 2 cores)")
    parser.add_argument("--cache-dir", default=CACHE)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the encoder's arithmetic (fp32 with --compile off: the reference the fast encoder must match)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.md"))
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs recorded next to --out")
    args = parser.parse_args(argv)
    methods = []
    for adapter in [a.strip() for a in args.adapters.split(",") if a.strip()]:
        if adapter not in ("basic", "classification", "contrastive"):
            parser.error(f"unknown adapter {adapter!r}")
        methods += ["basic", "basic+centre"] if adapter == "basic" else [adapter]
    args.methods = methods
    args.targets = [int(t) for t in args.targets.split(",") if t.strip()]
    for t in args.targets:
        if t not in CHAOS_PATIENTS:
            parser.error(f"CHAOS patients are {CHAOS_PATIENTS}, got {t}")
    args.variants = {v.strip() for v in args.variants.split(",")}
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runner = Runner(args)
    texts = []
    if args.dataset in ("ct", "all"):
        texts.append(run_ct(runner))
        runner.sections = list(texts)
        runner.write_markdown()
    if args.dataset in ("chaos", "all"):
        texts.append(run_chaos(runner))
        runner.sections = list(texts)
    total = time.perf_counter() - start
    runner.write_markdown(f"\nTotal wall time of this invocation: {total / 60:.1f} min "
                          f"(runs reused from {runner.runs_file.name} cost nothing).\n")
    print(f"total {total / 60:.1f} min; tables written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
