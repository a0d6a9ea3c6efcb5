"""Across patients on the standard CHAOS-MRI few-shot protocol (issue 6).

    .venv/bin/python benchmarks/cross_patient.py                          # default config, all parts
    .venv/bin/python benchmarks/cross_patient.py --variant location=off --variant location=3d
    .venv/bin/python benchmarks/cross_patient.py --parts one --variant location=3d --no-report

Parts (the five development patients of ../shared/data/chaos_mri):
- one: every ordered support -> query pair (20). Support template: for each organ, the slices at
  1/6, 1/2 and 5/6 of the list of its axial slices (templates.protocol_slices), each painted with
  every organ visible on it (a multi-label adapter must not learn a visible organ as background).
  One adapter per support patient, applied to each other patient as `pipeline.predict` does (no
  painting on the query: component choice by evidence). 3D Dice per organ on the whole volume and
  within the organ's reference slice range (the protocol's convention: false positives on other
  slices are not counted).
- four: leave one out: one adapter from the templates of the four other patients
  (`pipeline.train_many`), applied to the fifth.
- landmarks: on each support patient a disc of 5 px radius at each organ's centroid on its middle
  slice (templates.disc_template); on each other patient the pipeline's Markups landmark (a
  label painted this small is a landmark: placed by landmarks.match_point) is compared with that
  patient's reference point: in-plane distance in pixels and 3D distance in mm; "within 10 px"
  is the paper's criterion (Table I). The labelled region's centroid on its middle slice
  (`mid_`, the adapter's region) is reported beside it.
- slab: the one-support adapters applied to a short scan: SLAB_SLICES (5, 38 mm) of each other
  patient centred on its spleen's middle slice, as a slab through the upper abdomen would be;
  Dice on the slab for the organs in it, and whether an organ in it was lost ("not found") or
  one not in it was given voxels.

Each variant is a set of PipelineConfig overrides (`--variant key=value,key=value`; the first
variant is the reported one). Finished runs are appended to <out>.runs.jsonl keyed by part, patients,
settings and a digest of the library source, and reused on a rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CHAOS_LABELS, CHAOS_PATIENTS, ROOT, chaos_volume, git_commit  # noqa: E402

from FewShotSegmentLib import pipeline, templates  # noqa: E402
from FewShotSegmentLib.config import PipelineConfig, resolve_feature_layer  # noqa: E402
from FewShotSegmentLib.metrics import dice, format_table  # noqa: E402
from FewShotSegmentLib.session import BACKBONE_FIELDS, VOLUME_FIELDS  # noqa: E402

# keys of cross_patient.json kept by hand, not computed here
HISTORY_KEYS = ("development_variants", "earlier_default", "landmarks_development")

RESULTS = ROOT / "benchmarks" / "results"
CACHE = str(ROOT / ".cache" / "features")
LIBRARY = hashlib.sha1(b"".join(p.read_bytes() for p in sorted((ROOT / "FewShotSegmentLib").rglob("*.py")))).hexdigest()[:12]
ORGANS = list(CHAOS_LABELS)                      # 1 liver, 2 right kidney, 3 left kidney, 4 spleen
SHORT = {v: short for v, (_, short) in CHAOS_LABELS.items()}
LABELS = {v: {"name": name} for v, (name, _) in CHAOS_LABELS.items()}


SLAB_SLICES = 5


class Patients:
    """The five volumes, each read and encoded once per process (features cached on disk)."""

    def __init__(self, config: PipelineConfig):
        # the features of an adapter trained for other volumes (what train_many resolves "auto" to)
        config = PipelineConfig.from_dict({**config.to_dict(),
                                           "feature_layer": resolve_feature_layer(config.feature_layer, True)})
        self.config = config
        self.backbone = pipeline.build_backbone_for(config)
        self.volumes = {n: chaos_volume(n) for n in CHAOS_PATIENTS}
        self._prepared = {}

    def prepared(self, n):
        if n not in self._prepared:
            self._prepared[n] = pipeline.prepare_volume(self.volumes[n].image, self.config, self.backbone)
        return self._prepared[n]

    def slab(self, n, count: int = SLAB_SLICES):
        """(prepared, reference) of ``count`` slices of patient ``n`` around its spleen's middle slice."""
        key = ("slab", n, count)
        if key not in self._prepared:
            volume = self.volumes[n]
            along = np.flatnonzero((volume.reference == ORGANS[-1]).any(axis=tuple(a for a in range(3) if a != volume.axis)))
            low = int(along.mean()) - count // 2
            window = [slice(None)] * 3
            window[volume.axis] = slice(low, low + count)
            image_window = [slice(None)] * 3
            image_window[2 - volume.axis] = slice(low, low + count)      # SimpleITK indexes (x, y, z)
            image = volume.image[tuple(image_window)]
            self._prepared[key] = (pipeline.prepare_volume(image, self.config, self.backbone),
                                   volume.reference[tuple(window)])
        return self._prepared[key]

    def image_of(self, n, array):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(self.volumes[n].reference_image)
        return image

    def protocol_template(self, n):
        volume = self.volumes[n]
        slices = sorted({s for v in ORGANS for s in templates.protocol_slices(volume.reference, v, volume.axis)})
        return self.image_of(n, templates.make_template(volume.reference, ORGANS, volume.axis, slices)), slices


def scores(prediction: np.ndarray, reference: np.ndarray, axis: int) -> dict:
    """Per organ: Dice on the whole volume, and within the reference's slice range along ``axis``."""
    out = {}
    for v in ORGANS:
        ref = reference == v
        pred = prediction == v
        present = np.nonzero(ref.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        window = [slice(None)] * 3
        window[axis] = slice(present[0], present[-1] + 1)
        out[SHORT[v]] = {"volume": dice(pred, ref), "range": dice(pred[tuple(window)], ref[tuple(window)])}
    return out


def reference_point(reference: np.ndarray, value: int, axis: int) -> tuple:
    return templates.disc_template(reference, [value], axis, 0.5)[1][value]


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.records_path = self.out.with_suffix(".runs.jsonl")
        self.records = {}
        if self.records_path.exists() and not args.fresh:
            for line in self.records_path.read_text().splitlines():
                record = json.loads(line)
                self.records[record["key"]] = record
        self.patients = None
        self.patients_settings = None

    def key(self, part, supports, query, settings):
        return json.dumps([part, supports, query, settings, LIBRARY])

    def config(self, overrides: dict) -> PipelineConfig:
        return PipelineConfig.from_dict({**PipelineConfig(cache_dir=CACHE, axis="axial").to_dict(), **overrides})

    def store(self, record):
        self.records[record["key"]] = record
        with self.records_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def ensure_patients(self, config):
        # a variant that changes the backbone or how volumes are prepared (flip_features,
        # feature_layer, ...) gets its own encoder and features, not the first variant's
        wanted = {k: getattr(config, k) for k in BACKBONE_FIELDS + VOLUME_FIELDS}
        if self.patients is None or self.patients_settings != wanted:
            self.patients, self.patients_settings = Patients(config), wanted
        return self.patients

    def run_part(self, part, variant: dict) -> list[dict]:
        config = self.config(variant)
        settings = config.to_dict()
        plans = []
        if part == "one":
            plans = [([s], [q for q in CHAOS_PATIENTS if q != s]) for s in CHAOS_PATIENTS]
        elif part == "four":
            plans = [([s for s in CHAOS_PATIENTS if s != q], [q]) for q in CHAOS_PATIENTS]
        elif part in ("landmarks", "slab"):
            plans = [([s], [q for q in CHAOS_PATIENTS if q != s]) for s in CHAOS_PATIENTS]
        results = []
        for supports, queries in plans:
            missing = [q for q in queries if self.key(part, supports, q, settings) not in self.records]
            if missing:
                self.train_and_predict(part, supports, missing, config, settings)
            results += [self.records[self.key(part, supports, q, settings)] for q in queries]
        return results

    def train_and_predict(self, part, supports, queries, config, settings):
        patients = self.ensure_patients(config)
        start = time.perf_counter()
        examples = []
        for s in supports:
            if part == "landmarks":
                volume = patients.volumes[s]
                array, _ = templates.disc_template(volume.reference, ORGANS, volume.axis, 5.0)
                examples.append((patients.prepared(s), patients.image_of(s, array), LABELS))
            else:
                examples.append((patients.prepared(s), patients.protocol_template(s)[0], LABELS))
        model = pipeline.train_many(examples, config, patients.backbone.id, for_other_volumes=True)
        train_s = time.perf_counter() - start
        for q in queries:
            start = time.perf_counter()
            query, reference = patients.slab(q) if part == "slab" else (patients.prepared(q), None)
            prediction = pipeline.segment(model, query)
            segment_s = time.perf_counter() - start
            volume = patients.volumes[q]
            labels = sitk.GetArrayFromImage(prediction.labels)
            record = {"key": self.key(part, supports, q, settings), "part": part, "supports": supports, "query": q,
                      "train_s": round(train_s, 1), "segment_s": round(segment_s, 1),
                      "not_found": prediction.summary["not_found"],
                      "components": prediction.summary.get("components", {})}
            if part == "landmarks":
                record["landmarks"] = self.landmark_errors(prediction, volume)
            elif part == "slab":
                record["dice"] = {SHORT[v]: dice(labels == v, reference == v) if (reference == v).any() else None
                                  for v in ORGANS}
                record["false"] = [SHORT[v] for v in ORGANS if not (reference == v).any() and (labels == v).any()]
            else:
                record["dice"] = scores(labels, volume.reference, volume.axis)
            print(f"  {part} {supports}->{q}: " + json.dumps(record.get("dice") or record["landmarks"]), flush=True)
            self.store(record)

    @staticmethod
    def landmark_errors(prediction, volume) -> dict:
        spacing = np.array(volume.spacing_zyx)
        found = {p["label_value"]: p["index"][::-1] for p in prediction.landmarks}       # (z, y, x)
        labels = sitk.GetArrayFromImage(prediction.labels)
        in_plane = [a for a in range(3) if a != volume.axis]
        out = {}
        for v in ORGANS:
            ref = np.array(reference_point(volume.reference, v, volume.axis))
            if v not in found:
                out[SHORT[v]] = {"px": None, "mm": None, "mid_px": None, "mid_mm": None}
                continue
            entry = {}
            # "px"/"mm": the pipeline's Markups landmark (matched, for a label painted this small);
            # "mid_px"/"mid_mm": the region's point defined as the reference's (its centroid on its
            # middle slice), so both sides of the comparison are the same kind of point
            points = {"": np.array(found[v])}
            if (labels == v).any():
                points["mid_"] = np.array(reference_point(labels, v, volume.axis))
            for prefix, point in points.items():
                entry[prefix + "px"] = round(float(np.linalg.norm((point - ref)[in_plane])), 2)
                entry[prefix + "mm"] = round(float(np.linalg.norm((point - ref) * spacing)), 2)
            out[SHORT[v]] = entry
        return out


def mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def dice_summary(records) -> dict:
    organs = [SHORT[v] for v in ORGANS]
    per_organ = {o: {"range": mean([r["dice"][o]["range"] for r in records]),
                     "volume": mean([r["dice"][o]["volume"] for r in records])} for o in organs}
    return {"mean_range": round(mean([per_organ[o]["range"] for o in organs]), 4),
            "mean_volume": round(mean([per_organ[o]["volume"] for o in organs]), 4),
            "min_organ": round(min(r["dice"][o]["range"] for r in records for o in organs), 4),
            "min_organ_volume": round(min(r["dice"][o]["volume"] for r in records for o in organs), 4),
            "per_organ": {o: {k: round(v, 4) for k, v in d.items()} for o, d in per_organ.items()},
            "not_found": sum(len(r["not_found"]) for r in records), "runs": len(records)}


def slab_summary(records) -> dict:
    """Dice on the slab over the organs in it; ``lost``: organs in it reported not found;
    ``false``: organs not in it that were given voxels."""
    organs = [SHORT[v] for v in ORGANS]
    scored = [r["dice"][o] for r in records for o in organs if r["dice"][o] is not None]
    return {"mean": round(mean(scored), 4), "min_organ": round(min(scored), 4),
            "lost": sum(1 for r in records for v in ORGANS
                        if r["dice"][SHORT[v]] is not None and LABELS[v]["name"] in r["not_found"]),
            "false": sum(len(r["false"]) for r in records),
            "per_organ": {o: round(mean([r["dice"][o] for r in records]), 4) for o in organs}, "runs": len(records)}


def slab_table(records) -> str:
    rows = []
    for r in records:
        row = {"support": f"P{r['supports'][0]}", "query": f"P{r['query']}"}
        for o in (SHORT[v] for v in ORGANS):
            row[o] = "-" if r["dice"][o] is None else round(r["dice"][o], 3)
        row["not found"] = ",".join(r["not_found"]) or "-"
        row["false"] = ",".join(r["false"]) or "-"
        rows.append(row)
    return format_table(rows, list(rows[0]))


def landmark_summary(records) -> dict:
    organs = [SHORT[v] for v in ORGANS]
    out = {}
    for prefix, name in (("", "landmark"), ("mid_", "region_middle_slice")):
        per = {}
        for o in organs:
            px = [r["landmarks"][o].get(prefix + "px") for r in records]
            mm = [r["landmarks"][o].get(prefix + "mm") for r in records]
            per[o] = {"within_10px": round(float(np.mean([p is not None and p <= 10 for p in px])), 4),
                      "median_mm": round(float(np.median([m if m is not None else np.inf for m in mm])), 2)}
        out[name] = {"within_10px": round(float(np.mean([per[o]["within_10px"] for o in organs])), 4),
                     "per_organ": per}
    return {**out["landmark"], "region_middle_slice": out["region_middle_slice"]}


def pair_table(records) -> str:
    rows = []
    for r in records:
        row = {"support": "+".join(f"P{s}" for s in r["supports"]), "query": f"P{r['query']}"}
        for o in (SHORT[v] for v in ORGANS):
            row[f"{o} range"] = round(r["dice"][o]["range"], 3)
        for o in (SHORT[v] for v in ORGANS):
            row[f"{o} vol"] = round(r["dice"][o]["volume"], 3)
        row["mean range"] = round(mean([r["dice"][SHORT[v]]["range"] for v in ORGANS]), 3)
        row["mean vol"] = round(mean([r["dice"][SHORT[v]]["volume"] for v in ORGANS]), 3)
        row["not found"] = ",".join(r["not_found"]) or "-"
        row["train_s"], row["segment_s"] = r["train_s"], r["segment_s"]
        rows.append(row)
    return format_table(rows, list(rows[0]))


def landmark_table(records) -> str:
    rows = []
    for r in records:
        row = {"support": f"P{r['supports'][0]}", "query": f"P{r['query']}"}
        for o in (SHORT[v] for v in ORGANS):
            e = r["landmarks"][o]
            for key in ("px", "mm", "mid_px"):
                row[f"{o} {key}"] = "miss" if e.get(key) is None else e[key]
        rows.append(row)
    return format_table(rows, list(rows[0]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=None,
                        help="config overrides key=value[,key=value]; repeat; the first is reported")
    parser.add_argument("--parts", default="one,four,landmarks,slab")
    parser.add_argument("--out", default=str(RESULTS / "cross_patient"))
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    variants = []
    for text in args.variant or [""]:
        overrides = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            default = getattr(PipelineConfig(), key)
            overrides[key] = type(default)(value) if not isinstance(default, bool) else value in ("1", "true", "on")
        variants.append(overrides)
    runner = Runner(args)
    started = time.perf_counter()
    results = {}
    for overrides in variants:
        name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"
        for part in args.parts.split(","):
            print(f"{name}: {part}", flush=True)
            results[(name, part)] = runner.run_part(part, overrides)
    minutes = (time.perf_counter() - started) / 60
    summary = {}
    for (name, part), records in results.items():
        summary.setdefault(name, {})[PART_KEYS[part]] = SUMMARIES.get(part, dice_summary)(records)
    for name, parts in summary.items():
        print(name, json.dumps(parts, indent=1))
    if args.no_report:
        return
    first = next(iter(summary))
    default_config = {**PipelineConfig().to_dict(), **variants[0]}
    command = "python benchmarks/cross_patient.py " + " ".join(sys.argv[1:])
    payload = {**summary[first], "variant": first, "variants": summary, "commit": git_commit(),
               "command": command, "minutes": round(minutes, 1), "config": default_config}
    out_json = Path(args.out).with_suffix(".json")
    # the history written by hand (earlier defaults, development variants) survives a rerun
    if out_json.exists():
        previous = json.loads(out_json.read_text())
        payload.update({key: value for key, value in previous.items() if key in HISTORY_KEYS})
    out_json.write_text(json.dumps(payload, indent=2))
    lines = ["# Across patients: the standard CHAOS-MRI few-shot protocol", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; commit: {git_commit()}; command: `{command}`; "
             f"{minutes:.1f} min on this machine (runs reused from {Path(args.out).name}.runs.jsonl cost nothing)",
             "- support slices: each organ's axial slices at 1/6, 1/2, 5/6 of its list, every organ visible "
             "on them painted; the query is segmented without painting (component choice by evidence)",
             "- Dice `range`: within the organ's reference slice range (the protocol's convention); `vol`: whole volume",
             "", "## Summary per variant", ""]
    rows = []
    for name, parts in summary.items():
        row = {"variant": name}
        for key in ("one_support", "four_support"):
            if key in parts:
                row[f"{key} range"] = parts[key]["mean_range"]
                row[f"{key} vol"] = parts[key]["mean_volume"]
                row[f"{key} min organ"] = parts[key]["min_organ"]
                row[f"{key} not found"] = parts[key]["not_found"]
        if "landmarks" in parts:
            row["landmarks within 10 px"] = parts["landmarks"]["within_10px"]
        if "slab" in parts:
            row["slab mean"], row["slab lost"] = parts["slab"]["mean"], parts["slab"]["lost"]
        rows.append(row)
    lines += ["```", format_table(rows, list(rows[0])), "```", ""]
    for (name, part), records in results.items():
        lines += [f"## {name}: {part}", "", "```", TABLES.get(part, pair_table)(records), "```", ""]
        s = summary[name][PART_KEYS[part]]
        lines += ["per organ: `" + json.dumps(s["per_organ"]) + "`", ""]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))


PART_KEYS = {"one": "one_support", "four": "four_support", "landmarks": "landmarks", "slab": "slab"}
SUMMARIES = {"landmarks": landmark_summary, "slab": slab_summary}
TABLES = {"landmarks": landmark_table, "slab": slab_table}


if __name__ == "__main__":
    main()
