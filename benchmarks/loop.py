"""The correction loop simulated (issue 8): which slices to paint next, against Slicer's
Fill between slices given the same slices.

    .venv/bin/python benchmarks/loop.py                       # CHAOS P1..P8, all strategies, report
    .venv/bin/python benchmarks/loop.py --volumes P1 --seeds 0 --no-report

Each volume starts from one painted axial slice per organ (the middle of its extent), and each
round adds one slice per organ, up to 4 per organ, chosen by
- suggested: the run's own `suggested_slices` (guidance.py): for each organ, the best-ranked
  suggestion that lists it (an organ no suggestion lists gets no slice that round);
- even: the organ's slices at (i + 1/2) / n of its extent (n = 3 is the standard CHAOS protocol's
  1/6, 1/2, 5/6; not incremental);
- random: a random slice of the organ's extent, per seed (incremental).
"Painting" a slice copies every organ of the reference onto it (a clinician paints what is
there, and a painted slice is the truth for every label). Each painting is run as the product
runs it (`pipeline.train` then `pipeline.segment` with the painting: component clean-up seeded
by it, SAM refinement where SAM redraws the painting), trained from scratch so that a painting
gives one result whatever path led to it. Fill between slices (benchmarks/accuracy.py: Slicer's
vtkITKMorphologicalContourInterpolator) gets the same painted slices. 3D Dice per organ on the
whole volume.

Finished runs are appended to results/loop.runs.jsonl keyed by volume, painted slices,
settings and a digest of the library source, and reused on a rerun. The report also measures
the re-propagation time on the demo CT (benchmarks/speed.py --job repropagate).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CHAOS_LABELS, CHAOS_PATIENTS, ROOT, chaos_volume, fill_between_slices, git_commit  # noqa: E402
from cross_patient import LIBRARY  # noqa: E402

from FewShotSegmentLib import pipeline, templates  # noqa: E402
from FewShotSegmentLib.config import PipelineConfig  # noqa: E402
from FewShotSegmentLib.metrics import dice, format_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = str(ROOT / ".cache" / "features")
ORGANS = list(CHAOS_LABELS)
SHORT = {v: short for v, (_, short) in CHAOS_LABELS.items()}
NAMES = {name: v for v, (name, _) in CHAOS_LABELS.items()}
LABELS = {v: {"name": name} for v, (name, _) in CHAOS_LABELS.items()}
BUDGETS = (1, 2, 3, 4)
SUGGESTIONS = 40        # enough ranked slices for every organ to find one


def extent(reference: np.ndarray, value: int, axis: int) -> np.ndarray:
    return np.nonzero((reference == value).any(axis=tuple(a for a in range(3) if a != axis)))[0]


def even_slices(present: np.ndarray, count: int) -> list[int]:
    return sorted({int(present[min(len(present) - 1, int(len(present) * (i + 0.5) / count))]) for i in range(count)})


class Loop:
    def __init__(self, args):
        self.args = args
        self.records_path = Path(args.out).with_suffix(".runs.jsonl")
        self.records = {}
        if self.records_path.exists() and not args.fresh:
            for line in self.records_path.read_text().splitlines():
                record = json.loads(line)
                self.records[record["key"]] = record
        self.config = PipelineConfig(cache_dir=CACHE, axis="axial")
        self.settings = self.config.to_dict()
        self.library = args.library or LIBRARY
        if args.library:      # the settings of that library's runs: as stored
            stored = [json.loads(k)[2] for k in self.records if json.loads(k)[3] == args.library]
            if not stored:
                raise SystemExit(f"--library {args.library}: no stored runs")
            self.settings = stored[0]
        self._backbone = None
        self.volumes, self.prepared = {}, {}

    def volume(self, name):
        if name not in self.volumes:
            self.volumes[name] = chaos_volume(int(name[1:]))
        return self.volumes[name]

    def run(self, name: str, painted: list[int]) -> dict:
        """Train on the reference copied onto ``painted`` slices, segment, score; cached."""
        painted = sorted(set(int(i) for i in painted))
        key = json.dumps([name, painted, self.settings, self.library])
        if key in self.records:
            return self.records[key]
        if self.library != LIBRARY:
            raise SystemExit(f"--library {self.library}: no stored run of {name} painted on {painted}")
        volume = self.volume(name)
        if self._backbone is None:
            self._backbone = pipeline.build_backbone_for(self.config)
        if name not in self.prepared:
            self.prepared[name] = pipeline.prepare_volume(volume.image, self.config, self._backbone)
        prepared = self.prepared[name]
        array = templates.make_template(volume.reference, ORGANS, volume.axis, painted)
        template = sitk.GetImageFromArray(array)
        template.CopyInformation(volume.reference_image)
        start = time.perf_counter()
        model = pipeline.train(prepared, template, self.config, LABELS)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        prediction = pipeline.segment(model, prepared, template, suggestion_count=SUGGESTIONS)
        segment_s = time.perf_counter() - start
        labels = sitk.GetArrayFromImage(prediction.labels)
        filled = fill_between_slices(array)
        suggestions = []
        for pick in prediction.suggestions:
            index = volume.image.TransformPhysicalPointToIndex(pick["position_lps"])[2 - volume.axis]
            suggestions.append({"slice": int(index), "labels": [NAMES[n] for n in pick["labels"]]})
        record = {"key": key, "volume": name, "painted": painted,
                  "dice": {SHORT[v]: round(dice(labels == v, volume.reference == v), 4) for v in ORGANS},
                  "fill": {SHORT[v]: round(dice(filled == v, volume.reference == v), 4) for v in ORGANS},
                  "suggestions": suggestions, "train_s": round(train_s, 1), "segment_s": round(segment_s, 1)}
        self.records[key] = record
        with self.records_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"  {name} {painted}: adapter {mean(record['dice'])} fill {mean(record['fill'])} "
              f"({train_s + segment_s:.0f} s)", flush=True)
        return record

    # --- strategies: {organ: slices} per budget ------------------------------------------------

    def start(self, name) -> dict[int, list[int]]:
        volume = self.volume(name)
        return {v: templates.template_slices(volume.reference, v, volume.axis, 1) for v in ORGANS}

    def even(self, name, budget) -> dict[int, list[int]]:
        volume = self.volume(name)
        return {v: even_slices(extent(volume.reference, v, volume.axis), budget) for v in ORGANS}

    def random_next(self, name, chosen, rng) -> dict[int, list[int]]:
        volume = self.volume(name)
        painted = {s for slices in chosen.values() for s in slices}
        out = {}
        for v in ORGANS:
            free = [int(s) for s in extent(volume.reference, v, volume.axis) if s not in painted]
            pick = [int(rng.choice(free))] if free else []
            painted.update(pick)
            out[v] = chosen[v] + pick
        return out

    @staticmethod
    def suggested_next(chosen, record) -> dict[int, list[int]]:
        painted = {s for slices in chosen.values() for s in slices}
        out = {v: list(slices) for v, slices in chosen.items()}
        for v in ORGANS:
            for pick in record["suggestions"]:
                if v in pick["labels"] and pick["slice"] not in painted:
                    out[v].append(pick["slice"])
                    painted.add(pick["slice"])
                    break
        return out

    def simulate(self, name, seeds, strategies=("suggested", "even", "random")) -> list[dict]:
        """Rows {volume, strategy, seed, budget, painted, dice, fill}."""
        rows = []

        def add(strategy, seed, budget, chosen):
            painted = sorted({s for slices in chosen.values() for s in slices})
            record = self.run(name, painted)
            rows.append({"volume": name, "strategy": strategy, "seed": seed, "budget": budget,
                         "painted": painted, "dice": record["dice"], "fill": record["fill"]})
            return record

        first = self.start(name)
        record = add("start", None, 1, first)
        chosen = first
        for budget in BUDGETS[1:] if "suggested" in strategies else ():
            chosen = self.suggested_next(chosen, record)
            record = add("suggested", None, budget, chosen)
        for budget in BUDGETS[1:] if "even" in strategies else ():
            add("even", None, budget, self.even(name, budget))
        for seed in seeds if "random" in strategies else ():
            rng = np.random.default_rng([seed, int(name[1:])])
            chosen = first
            for budget in BUDGETS[1:]:
                chosen = self.random_next(name, chosen, rng)
                add("random", seed, budget, chosen)
        return rows


def mean(scores: dict) -> float:
    return round(float(np.mean(list(scores.values()))), 4)


def summarize(rows: list[dict]) -> dict:
    """{strategy: {budget: {adapter, fill, slices, per_organ...}}}: means over volumes (and seeds)."""
    out = {}
    for strategy in ("suggested", "even", "random"):
        out[strategy] = {}
        for budget in BUDGETS:
            chosen = [r for r in rows if r["budget"] == budget and
                      (r["strategy"] == strategy or (budget == 1 and r["strategy"] == "start"))]
            if budget == 1:      # one start per volume, shared by every strategy
                chosen = [r for r in chosen if r["strategy"] == "start"]
            if not chosen:
                continue
            out[strategy][budget] = {
                "adapter": round(float(np.mean([mean(r["dice"]) for r in chosen])), 4),
                "fill": round(float(np.mean([mean(r["fill"]) for r in chosen])), 4),
                "painted_slices": round(float(np.mean([len(r["painted"]) for r in chosen])), 2),
                "adapter_per_organ": {o: round(float(np.mean([r["dice"][o] for r in chosen])), 4) for o in SHORT.values()},
                "fill_per_organ": {o: round(float(np.mean([r["fill"][o] for r in chosen])), 4) for o in SHORT.values()},
                "runs": len(chosen)}
    return out


def budget_table(summary) -> str:
    rows = []
    for strategy, budgets in summary.items():
        for budget, s in budgets.items():
            rows.append({"strategy": strategy, "slices/organ": budget, "painted slices": s["painted_slices"],
                         "adapter": s["adapter"], "fill between slices": s["fill"],
                         "adapter - fill": round(s["adapter"] - s["fill"], 4), "runs": s["runs"]})
    return format_table(rows, list(rows[0]))


def organ_table(summary) -> str:
    rows = []
    for strategy, budgets in summary.items():
        for budget, s in budgets.items():
            row = {"strategy": strategy, "slices/organ": budget}
            for o in SHORT.values():
                row[o] = s["adapter_per_organ"][o]
            for o in SHORT.values():
                row[f"fill {o}"] = s["fill_per_organ"][o]
            rows.append(row)
    return format_table(rows, list(rows[0]))


def volume_table(rows) -> str:
    table = []
    for r in rows:
        if r["budget"] in (1, 3, 4):
            table.append({"volume": r["volume"], "strategy": r["strategy"] + ("" if r["seed"] is None else f" {r['seed']}"),
                          "slices/organ": r["budget"], "painted": ",".join(map(str, r["painted"])),
                          "adapter": mean(r["dice"]), "fill": mean(r["fill"]),
                          **{o: r["dice"][o] for o in SHORT.values()}})
    return format_table(table, list(table[0]))


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = {"suggested": "tab:red", "even": "tab:blue", "random": "tab:grey"}
    for strategy, budgets in summary.items():
        x = sorted(budgets)
        axes.plot(x, [budgets[b]["adapter"] for b in x], "-o", color=colours[strategy], label=f"adapter, {strategy}")
        axes.plot(x, [budgets[b]["fill"] for b in x], "--s", color=colours[strategy], alpha=0.7,
                  label=f"fill between slices, {strategy}")
    axes.set_xlabel("painted slices per organ")
    axes.set_ylabel("mean 3D Dice (CHAOS, 4 organs)")
    axes.set_xticks(list(BUDGETS))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    axes.set_title("The correction loop: adapter vs Fill between slices")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def measure_repropagate() -> dict:
    """benchmarks/speed.py's session job: the demo CT, then one more painted slice."""
    with tempfile.TemporaryDirectory(prefix="fewshot-loop-") as scratch:
        done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "speed.py"), "--job",
                               "repropagate", "--device", "cpu", "--scratch", scratch],
                              capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"re-propagation job failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", default=",".join(f"P{n}" for n in CHAOS_PATIENTS))
    parser.add_argument("--seeds", default="0,1", help="random-strategy seeds")
    parser.add_argument("--strategies", default="suggested,even,random")
    parser.add_argument("--out", default=str(RESULTS / "loop"))
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--no-repropagate", action="store_true", help="report without timing a re-propagation")
    parser.add_argument("--library", default="",
                        help="report the stored runs of the library with this digest (an earlier commit) without running")
    parser.add_argument("--library-commit", default="", help="with --library: the commit that library is from")
    parser.add_argument("--repropagate-from", default="",
                        help="take the re-propagation figure from this speed.py JSON instead of measuring it")
    args = parser.parse_args(argv)
    commit = git_commit() if not args.library else f"{args.library_commit or 'an earlier commit'} (stored runs)"
    loop = Loop(args)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    rows = []
    for name in args.volumes.split(","):
        print(name, flush=True)
        rows += loop.simulate(name, seeds, args.strategies.split(","))
    summary = summarize(rows)
    print(budget_table(summary))
    if args.no_report:
        return
    if args.repropagate_from:
        speed = json.loads(Path(args.repropagate_from).read_text())
        raw = speed["raw"]["repropagate"]
        repropagate = {"repropagate_s": raw["repropagate_s"], "first_s": raw["first_s"], "timings": raw["timings"],
                       "source": args.repropagate_from, "commit": speed.get("commit")}
    else:
        repropagate = None if args.no_repropagate else {**measure_repropagate(), "commit": git_commit()}
    minutes = (time.perf_counter() - started) / 60
    out = Path(args.out)
    payload = {
        "suggested_3": {"chaos_mean": summary["suggested"][4]["adapter"], "fill_same_slices": summary["suggested"][4]["fill"],
                        "painted_slices": summary["suggested"][4]["painted_slices"]},
        "three_even": {"chaos_mean": summary["even"][3]["adapter"], "fill_same_slices": summary["even"][3]["fill"],
                       "painted_slices": summary["even"][3]["painted_slices"]},
        "even_4": {"chaos_mean": summary["even"][4]["adapter"], "fill_same_slices": summary["even"][4]["fill"]},
        "random_4": {"chaos_mean": summary["random"][4]["adapter"], "fill_same_slices": summary["random"][4]["fill"]},
        "repropagate_s": None if repropagate is None else repropagate["repropagate_s"],
        "repropagate": repropagate, "by_budget": summary, "volumes": args.volumes.split(","), "seeds": seeds,
        "commit": commit, "library_digest": loop.library, "minutes": round(minutes, 1),
        "command": "python benchmarks/loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": loop.settings}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    plot(summary, out.with_suffix(".png"))
    lines = ["# The correction loop: suggested slices against evenly spaced and random ones, and against Fill between slices", "",
             f"- commit: {payload['commit']} (library digest {loop.library}); command: `{payload['command']}`; "
             + (f"{payload['minutes']} min on 2 CPU cores" if not args.library else "a report of stored runs"), f"- volumes: {', '.join(payload['volumes'])}; random seeds: {seeds}",
             "- 'slices/organ' n: the start (each organ's middle slice) and n - 1 added per organ; 'painted slices': "
             "how many distinct slices that is (a slice serves every organ on it). 3D Dice on the whole volume, "
             "mean of liver, right and left kidney, spleen, then over volumes (and seeds).",
             "", "## Mean Dice by strategy and budget", "", "```", budget_table(summary), "```", "",
             "![Dice against painted slices](loop.png)", "", "## Per organ", "", "```", organ_table(summary), "```", "",
             "## Per volume (1, 3 and 4 slices per organ)", "", "```", volume_table(rows), "```", ""]
    if repropagate:
        lines += ["## Re-propagation on the demo CT", "",
                  f"One more painted slice, same session (features in memory, warm start): **{repropagate['repropagate_s']} s** "
                  f"(first job {repropagate['first_s']} s; stages {json.dumps(repropagate['timings'])}; "
                  f"commit {repropagate.get('commit')}).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}, .json, .png ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
