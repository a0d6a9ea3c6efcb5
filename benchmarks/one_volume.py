"""One-volume benchmark: the whole structure back from one painted slice per organ.

    .venv/bin/python benchmarks/one_volume.py                       # everything, defaults
    .venv/bin/python benchmarks/one_volume.py --only one_slice --set smooth_across_mm=0 --tag nosmooth

Experiments (each on the development data in ../shared/data):
- one_slice: every organ's middle axial slice is painted, with every organ visible on it (CHAOS
  patients 1, 2, 3, 5, 8 and the TotalSegmentator CT). 3D Dice per organ after each step, and
  95th-percentile Hausdorff / average surface distance of the final result.
- underpainted (CT, P1, P2, P3): the same slices painted only on the inner 80 % of each organ's cross-section (the
  reference eroded by a distance threshold), as a hurried user paints.
- rim: CHAOS patient 1, the liver split into a core and a rim (liver minus its erosion, nested around the
  core), as a wall around a lumen; refinement on (the default: SAM is checked against the painting
  per label) against refinement off and refinement forced on every label.
- oblique: CHAOS patient 1 with the same voxels but direction cosines rotated by 60
  degrees (the stack is no longer "axial"); the default axis ("auto") against the original.

Finished runs are appended to benchmarks/results/one_volume.runs.jsonl (keyed by experiment,
volume and settings) and reused; the markdown table and the JSON summary are rewritten at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CHAOS_LABELS, CHAOS_PATIENTS, CT_LABELS, ROOT, chaos_volume, ct_volume, git_commit  # noqa: E402

from FewShotSegmentLib import pipeline, templates  # noqa: E402
from FewShotSegmentLib.config import PipelineConfig  # noqa: E402
from FewShotSegmentLib.metrics import format_table, per_label_scores, surface_distances  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = str(ROOT / ".cache" / "features")
CT_ORGANS = {v: CT_LABELS[v] for v in (5, 1, 2, 3)}
# a run is reused only for the same library source (the digest changes with any edit of it)
LIBRARY = hashlib.sha1(b"".join(p.read_bytes() for p in sorted((ROOT / "FewShotSegmentLib").rglob("*.py")))).hexdigest()[:12]
CT_ORGANS_SHORT = [short for _, short in CT_ORGANS.values()]
RIM, CORE = 11, 1      # rim case: label values (core keeps the liver's value)
RIM_LABELS = {CORE: ("liver_core", "core"), RIM: ("liver_rim", "rim"), 2: ("kidney_right", "kid_R"),
              3: ("kidney_left", "kid_L"), 4: ("spleen", "spleen")}


def volumes():
    yield "ct", ct_volume, CT_ORGANS
    for n in CHAOS_PATIENTS:
        yield f"P{n}", (lambda n=n: chaos_volume(n)), CHAOS_LABELS


def one_slice_template(volume, values, keep: float = 1.0) -> tuple[np.ndarray, list[int]]:
    """Every organ's middle slice, every organ visible there painted; ``keep`` < 1: only that
    fraction of each cross-section, deepest inside (templates.under_paint)."""
    array, _, slices = volume.template(values, 1)
    return (array if keep >= 1.0 else templates.under_paint(array, volume.axis, slices, keep)), slices


def as_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


class Bench:
    def __init__(self, args):
        self.args = args
        self.overrides = dict(args.set)
        self.runs_file = RESULTS / "one_volume.runs.jsonl"
        self.records = {}
        if self.runs_file.is_file() and not args.fresh:
            for line in self.runs_file.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record
        self.backbone = None
        self.cache: dict[str, object] = {}

    def config(self, **extra) -> PipelineConfig:
        return PipelineConfig.from_dict({"cache_dir": self.args.cache_dir, "device": "cpu", **self.overrides, **extra})

    def volume(self, name, make):
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    def run(self, experiment: str, name: str, image: sitk.Image, reference: np.ndarray, template: np.ndarray,
            labels: dict, axis: int, slices: list[int], extra: dict | None = None) -> dict:
        """Train on ``template`` (array on ``image``'s grid), segment ``image``, score."""
        extra = dict(extra or {})
        config = self.config(**extra)
        key = json.dumps([experiment, name, self.args.tag, config.to_dict(), LIBRARY], sort_keys=True)
        if key in self.records:
            return self.records[key]
        if self.backbone is None:
            self.backbone = pipeline.build_backbone_for(config)
        template_image = as_image(template, image)
        config = pipeline.resolved(config, image, template_image)
        start = time.perf_counter()
        prepared = pipeline.prepare_volume(image, config, self.backbone)
        encode_s = time.perf_counter() - start
        names = {v: {"name": labels[v][0]} for v in labels}
        start = time.perf_counter()
        model = pipeline.train(prepared, template_image, config, names, self.backbone.id)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        prediction = pipeline.segment(model, prepared, template_image, keep_stages=True)
        segment_s = time.perf_counter() - start
        spacing = image.GetSpacing()[::-1]
        record = {"key": key, "experiment": experiment, "volume": name, "tag": self.args.tag,
                  "overrides": {**self.overrides, **extra}, "library": LIBRARY,
                  "config": {k: v for k, v in model.config.to_dict().items() if k not in ("cache_dir", "device")},
                  "slices": slices, "axis": prediction.summary["axis"], "encode_s": encode_s, "train_s": train_s,
                  "segment_s": segment_s, "refinement": prediction.summary["refinement"], "dice": {}}
        for stage, label_image in prediction.stages.items():
            record["dice"][stage] = dice_row(sitk.GetArrayFromImage(label_image), reference, labels)
        final = sitk.GetArrayFromImage(prediction.labels)
        record["surface"] = {labels[v][1]: surface_distances(final == v, reference == v, spacing) for v in labels}
        painted = np.take(template, slices, axis=axis)
        record["painted_exact"] = bool((np.take(final, slices, axis=axis) == painted).all())
        self.records[key] = record
        RESULTS.mkdir(parents=True, exist_ok=True)
        with self.runs_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"  {experiment:12s} {name:4s} {self.args.tag or ''} {extra or ''}: "
              + " -> ".join(f"{s} {r['mean']:.3f}" for s, r in record["dice"].items())
              + f"  (train {train_s:.0f} s, segment {segment_s:.0f} s; painted exact {record['painted_exact']};"
              f" refinement {record['refinement']})", flush=True)
        return record


def dice_row(pred: np.ndarray, reference: np.ndarray, labels: dict) -> dict:
    scores = per_label_scores(pred, reference, list(labels))
    row = {short: scores[v]["dice"] for v, (_, short) in labels.items()}
    row["mean"] = float(np.nanmean([row[short] for _, short in labels.values()]))
    return row


# ----------------------------------------------------------------------------------------------
# experiments

UNDERPAINTED_VOLUMES = ("ct", "P1", "P2", "P3")   # the budget of this machine: 2 cores, ~3 min a run
OBLIQUE_VOLUMES = ("P1",)                          # the CT's oblique copy would be encoded again (~4 min)


def one_slice(bench: Bench, shrink: float = 1.0) -> list[dict]:
    experiment = "one_slice" if shrink == 1.0 else "underpainted"
    rows = []
    for name, make, labels in volumes():
        if shrink < 1.0 and name not in UNDERPAINTED_VOLUMES:
            continue
        volume = bench.volume(name, make)
        template, slices = one_slice_template(volume, list(labels), shrink)
        rows.append(bench.run(experiment, name, volume.image, volume.reference, template, labels, volume.axis, slices))
    return rows


RIM_PATIENTS = (1,)       # 3 runs each: the whole benchmark stays under an hour on this machine


def rim(bench: Bench) -> list[dict]:
    rows = []
    for n in RIM_PATIENTS:
        volume = bench.volume(f"P{n}", lambda n=n: chaos_volume(n))
        reference = templates.split_rim(volume.reference, CORE, RIM, volume.axis)
        full, slices = one_slice_template(volume, list(CHAOS_LABELS))
        template = np.where(full == CORE, reference, full)
        for variant, extra in (("checked", {}), ("off", {"refine": "none"}), ("forced", {"refine_min_dice": 0.0})):
            record = bench.run("rim", f"P{n}", volume.image, reference, template, RIM_LABELS, volume.axis, slices,
                               extra)
            rows.append({**record, "variant": variant})
    return rows


def oblique(bench: Bench) -> list[dict]:
    rows = []
    for name, make, labels in [v for v in volumes() if v[0] in OBLIQUE_VOLUMES]:
        volume = bench.volume(name, make)
        template, slices = one_slice_template(volume, list(labels))
        original = bench.run("one_slice", name, volume.image, volume.reference, template, labels, volume.axis, slices)
        tilted = bench.run("oblique", name, templates.oblique_copy(volume.image), volume.reference, template, labels, volume.axis,
                           slices)
        rows.append({"volume": name, "original": original["dice"]["final"]["mean"],
                     "oblique": tilted["dice"]["final"]["mean"], "axis": tilted["axis"],
                     "delta": tilted["dice"]["final"]["mean"] - original["dice"]["final"]["mean"]})
    return rows


def smoothing(bench: Bench) -> list[dict]:
    """What the 3D steps add on the CT (3 mm slices, where neighbours are close enough to matter):
    the default (probabilities smoothed across slices) against none, and with joint 3D smoothing of
    the final labels on top."""
    volume = bench.volume("ct", ct_volume)
    template, slices = one_slice_template(volume, list(CT_ORGANS))
    rows = []
    for variant, extra in (("default", {}), ("no smoothing", {"smooth_across_mm": 0.0}),
                           ("+ final 3D smoothing 2 mm", {"smooth_final_mm": 2.0})):
        experiment = "one_slice" if not extra else "smoothing"
        record = bench.run(experiment, "ct", volume.image, volume.reference, template, CT_ORGANS, volume.axis, slices,
                           extra)
        rows.append({**record, "variant": variant})
    return rows


# ----------------------------------------------------------------------------------------------
# report

def organ_table(rows: list[dict], stages=("adapter", "components", "refined", "final")) -> str:
    shorts = [k for k in rows[0]["dice"]["final"] if k != "mean"]
    table = []
    for record in rows:
        for stage in stages:
            if stage in record["dice"]:
                table.append({"volume": record["volume"], "step": stage, **record["dice"][stage]})
    return format_table(table, ["volume", "step"] + shorts + ["mean"])


def surface_table(rows: list[dict]) -> str:
    shorts = list(rows[0]["surface"])
    table = [{"volume": r["volume"], **{f"{s} hd95": r["surface"][s]["hd95"] for s in shorts},
              **{f"{s} assd": r["surface"][s]["assd"] for s in shorts}} for r in rows]
    return format_table(table, ["volume"] + [f"{s} hd95" for s in shorts] + [f"{s} assd" for s in shorts])


def mean_final(rows, volumes_wanted) -> float:
    return float(np.mean([r["dice"]["final"]["mean"] for r in rows if r["volume"] in volumes_wanted]))


def score_before(directory: str, commit: str):
    """Score label maps saved by the previous pipeline (same templates, one file per volume:
    ct.nrrd, P1.nrrd, ...) into results/one_volume_before.json, for the before/after table."""
    out = {"commit": commit, "volumes": {}}
    for name, make, labels in volumes():
        path = Path(directory) / f"{name}.nrrd"
        if not path.is_file():
            continue
        volume = make()
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        spacing = volume.image.GetSpacing()[::-1]
        out["volumes"][name] = {"dice": dice_row(pred, volume.reference, labels),
                                "surface": {labels[v][1]: surface_distances(pred == v, volume.reference == v, spacing)
                                            for v in labels}}
        print(name, out["volumes"][name]["dice"], flush=True)
    (RESULTS / "one_volume_before.json").write_text(json.dumps(out, indent=2))


EXPERIMENTS = {"one_slice": one_slice, "underpainted": lambda b: one_slice(b, 0.8), "oblique": oblique,
               "smoothing": smoothing, "rim": rim}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(EXPERIMENTS))
    parser.add_argument("--set", action="append", default=[], type=lambda s: (s.split("=")[0], json.loads(s.split("=", 1)[1])),
                        help="a PipelineConfig field, e.g. smooth_across_mm=0 (JSON value); repeat")
    parser.add_argument("--tag", default="", help="name of this settings variant in the runs file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: with other jobs on the 2 cores, 2 threads each thrash)")
    parser.add_argument("--cache-dir", default=CACHE)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no-report", action="store_true", help="only record runs (settings sweeps)")
    parser.add_argument("--score-before", nargs=2, metavar=("DIR", "COMMIT"),
                        help="score the previous pipeline's saved label maps (see score_before) and stop")
    args = parser.parse_args(argv)
    if args.score_before:
        return score_before(*args.score_before)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    wanted = {w.strip() for w in args.only.split(",")}
    start = time.perf_counter()
    results = {}
    for experiment, function in EXPERIMENTS.items():
        if experiment in wanted:
            print(f"\n[{experiment}]", flush=True)
            results[experiment] = function(bench)
    minutes = (time.perf_counter() - start) / 60
    if args.no_report or wanted != set(EXPERIMENTS):
        return
    write_report(results, args, minutes)


def write_report(results: dict, args, minutes: float):
    chaos = {f"P{n}" for n in CHAOS_PATIENTS}
    full, under = results["one_slice"], results["underpainted"]
    rim_rows = {(r["volume"], r["variant"]): r for r in results["rim"]}

    def rim_mean(variant, short="rim"):
        return float(np.mean([r["dice"]["final"][short] for (v, var), r in rim_rows.items() if var == variant]))

    summary = {
        "one_slice": {"chaos_mean": mean_final(full, chaos), "ct_mean": mean_final(full, {"ct"}),
                      "per_volume": {r["volume"]: r["dice"]["final"] for r in full},
                      "ct_hd95_mm": {k: v["hd95"] for k, v in next(r for r in full if r["volume"] == "ct")["surface"].items()},
                      "painted_exact": all(r["painted_exact"] for r in full)},
        "underpainted": {"chaos_mean": mean_final(under, chaos), "ct_mean": mean_final(under, {"ct"}),
                         "per_volume": {r["volume"]: r["dice"]["final"] for r in under}},
        # over the volumes painted both ways
        "underpainted_drop": float(np.mean([r["dice"]["final"]["mean"] for r in full if r["volume"] in UNDERPAINTED_VOLUMES])
                                   - np.mean([r["dice"]["final"]["mean"] for r in under])),
        "underpainted_volumes": list(UNDERPAINTED_VOLUMES),
        "rim": {"refined": rim_mean("checked"), "unrefined": rim_mean("off"), "forced": rim_mean("forced"),
                "solid_refined": float(np.mean([np.mean([r["dice"]["final"][s] for s in ("core", "kid_R", "kid_L", "spleen")])
                                                for (v, var), r in rim_rows.items() if var == "checked"])),
                "solid_unrefined": float(np.mean([np.mean([r["dice"]["final"][s] for s in ("core", "kid_R", "kid_L", "spleen")])
                                                  for (v, var), r in rim_rows.items() if var == "off"]))},
        "oblique_delta": float(max(abs(r["delta"]) for r in results["oblique"])),
        "smoothing_ct": {r["variant"]: {"mean": r["dice"]["final"]["mean"],
                                         "hd95_mm": {o: d["hd95"] for o, d in r["surface"].items()},
                                         "mean_assd_mm": float(np.mean([d["assd"] for d in r["surface"].values()]))}
                         for r in results["smoothing"]},
        "oblique": results["oblique"],
        "settings": {k: v for k, v in full[0]["config"].items()},
        "commit": git_commit(), "minutes": round(minutes, 1),
        "command": " ".join([".venv/bin/python", "benchmarks/one_volume.py"] + sys.argv[1:]),
    }
    before_file = RESULTS / "one_volume_before.json"
    comparison = []
    if before_file.is_file():
        before = json.loads(before_file.read_text())
        summary["before"] = {"commit": before["commit"]}
        for record in full:
            old = before["volumes"].get(record["volume"])
            if old is None:
                continue
            for short in record["surface"]:
                comparison.append({"volume": record["volume"], "organ": short,
                                   "Dice before": old["dice"][short], "Dice now": record["dice"]["final"][short],
                                   "HD95 before": old["surface"][short]["hd95"],
                                   "HD95 now": record["surface"][short]["hd95"],
                                   "ASSD before": old["surface"][short]["assd"],
                                   "ASSD now": record["surface"][short]["assd"]})
        summary["before"]["chaos_mean"] = float(np.mean([before["volumes"][v]["dice"]["mean"] for v in chaos
                                                          if v in before["volumes"]]))
        summary["before"]["ct_mean"] = before["volumes"].get("ct", {}).get("dice", {}).get("mean")
        summary["before"]["ct_hd95_mm"] = {k: v["hd95"] for k, v in before["volumes"].get("ct", {}).get("surface", {}).items()}
    (RESULTS / "one_volume.json").write_text(json.dumps(summary, indent=2))
    rim_table = format_table([{"volume": v, "refinement": var, **r["dice"]["final"],
                               "rim refined": r["refinement"].get("liver_rim", {}).get("refined")}
                              for (v, var), r in sorted(rim_rows.items())],
                             ["volume", "refinement", "core", "rim", "kid_R", "kid_L", "spleen", "mean", "rim refined"])
    text = "\n".join([
        "# One volume from one painted slice per organ\n",
        f"- commit: {summary['commit']}; command: `{summary['command']}`; {minutes:.1f} min on 2 CPU cores",
        f"- settings: {json.dumps(summary['settings'])}\n",
        "## Summary\n",
        "```",
        format_table([{"what": "CHAOS mean Dice (5 patients)", "value": summary["one_slice"]["chaos_mean"]},
                      {"what": "CT mean Dice (liver, spleen, kidneys)", "value": summary["one_slice"]["ct_mean"]},
                      {"what": f"under-painting (inner 80 %) drop, mean over {', '.join(UNDERPAINTED_VOLUMES)}",
                       "value": summary["underpainted_drop"]},
                      {"what": "rim Dice, refinement checked (default)", "value": summary["rim"]["refined"]},
                      {"what": "rim Dice, refinement off", "value": summary["rim"]["unrefined"]},
                      {"what": "rim Dice, refinement forced on every label", "value": summary["rim"]["forced"]},
                      {"what": "solid organs in the rim case, refinement checked", "value": summary["rim"]["solid_refined"]},
                      {"what": "solid organs in the rim case, refinement off", "value": summary["rim"]["solid_unrefined"]},
                      {"what": "oblique copy: largest |Dice change|", "value": summary["oblique_delta"]}],
                     ["what", "value"]),
        "```\n",
        "## One painted slice per organ: 3D Dice after each step\n", "```", organ_table(full), "```\n",
        "Surface distances of the final result (mm):\n", "```", surface_table(full), "```\n",
        *(["## Before and after (same templates; before = the pipeline at commit "
            f"{summary['before']['commit']}, final result)\n", "```",
            format_table(comparison, ["volume", "organ", "Dice before", "Dice now", "HD95 before", "HD95 now",
                                      "ASSD before", "ASSD now"]), "```\n"] if comparison else []),
        "## Under-painted (inner 80 % of each cross-section)\n", "```", organ_table(under, ("final",)), "```\n",
        "## Rim nested around a core (final result)\n", "```", rim_table, "```\n",
        "## Smoothing in 3D (CT, 3 mm slices): Dice and surface distances of the final result\n", "```",
        format_table([{"variant": r["variant"], **r["dice"]["final"],
                       **{f"{o} hd95": d["hd95"] for o, d in r["surface"].items()},
                       "mean assd": float(np.mean([d["assd"] for d in r["surface"].values()]))}
                      for r in results["smoothing"]],
                     ["variant"] + list(CT_ORGANS_SHORT) + ["mean"] + [f"{o} hd95" for o in CT_ORGANS_SHORT]
                     + ["mean assd"]), "```\n",
        "## Oblique copies (direction rotated 60 degrees; axis auto)\n", "```",
        format_table(results["oblique"], ["volume", "axis", "original", "oblique", "delta"]), "```\n",
    ])
    (RESULTS / "one_volume.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
