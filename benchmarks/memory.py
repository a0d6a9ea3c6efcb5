"""Memory benchmark (issue 9): where a large CT's job holds its memory, stage by stage, and what a
volume of any number of slices needs.

    .venv/bin/python benchmarks/memory.py                 # ~10 min on 2 cores; writes results/memory_cpu.md + .json

The demo CT resampled to 512x512 pixels and N slices (speed.py's ct300 grid, for N = 100 and 300)
runs as speed.py's default "run" job (worker.execute: read, encode, train, propagate with the
clean-up, refine, write), each in its own process, once with the feature cache off (the default
of a job) and once with it on (a fresh cache: the features are encoded into memory-mapped files,
page cache that the kernel can write back and drop, instead of anonymous memory). A thread samples the process's
resident memory every 50 ms (VmRSS, and its anonymous and file-backed parts) and files the
samples under the job's progress stage at that moment. Peak RSS is ru_maxrss. Memory at N slices
is fitted as a + b N through the two sizes and quoted for 1000 slices, every slice encoded
(encode_step 1; a thin-slice volume encoded every step-th slice needs less).
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the ct300 grid, the template and the job of the speed benchmark)

ROOT = speed.ROOT
SIZES = (100, 300)
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _status() -> dict:
    with open("/proc/self/status") as handle:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in handle) if k in FIELDS}


def measure(slices: int, cached: bool, scratch: Path) -> dict:
    """One job in this process; the peak of each memory figure per progress stage."""
    import SimpleITK as sitk

    from FewShotSegmentLib import worker

    image_path, image, reference = speed.resampled_ct(scratch, slices)
    template_path = scratch / "template.nrrd"
    sitk.WriteImage(speed._template_on(reference, image, False), str(template_path))
    del image, reference
    stage = {"name": "start"}
    peaks: dict[str, dict] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            now = _status()
            peak = peaks.setdefault(stage["name"], dict.fromkeys(FIELDS, 0))
            for k in FIELDS:
                peak[k] = max(peak[k], now.get(k, 0))
            time.sleep(0.05)

    def progress(fraction, name, message):
        stage["name"] = name

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # every slice encoded: the 300-slice grid's 1.1 mm slices would otherwise be encoded every
    # second one (features.encoding_step) and the 100-slice grid's 3.4 mm ones all, and a + b N
    # through the two would not be one volume's cost per slice. Thin slices need less than this.
    config = {"encode_step": 1, **({"cache_dir": str(scratch / "cache")} if cached else {})}
    start = time.perf_counter()
    worker.execute(speed._job(image_path, template_path, scratch / "out", "cpu", **config), progress=progress)
    seconds = time.perf_counter() - start
    stage["name"] = "written"
    time.sleep(0.2)
    done.set()
    sampler.join()
    return {"slices": slices, "cached": cached, "seconds": round(seconds, 1), "stages": peaks,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _child(slices: int, cached: bool, scratch: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--slices", str(slices), "--scratch", scratch] + \
        (["--cached"] if cached else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"memory job failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _fit(runs: list[dict], key) -> tuple[float, float]:
    """(a, b) of memory = a + b * slices through the runs' (slices, key(run))."""
    (n0, m0), (n1, m1) = sorted((r["slices"], key(r)) for r in runs)
    b = (m1 - m0) / (n1 - n0)
    return m0 - b * n0, b


def report(runs: list[dict]) -> tuple[str, dict]:
    stages = ["read", "encode", "train", "propagate", "refine", "done"]
    lines = ["job                    " + "  ".join(f"{s:>9}" for s in stages) + "  peak RSS  peak anon  seconds",
             "-" * 23 + ("  " + "-" * 9) * len(stages) + "  --------  ---------  -------"]
    for r in runs:
        name = f"{r['slices']} slices, cache {'on' if r['cached'] else 'off'}"
        anon = max(p["RssAnon"] for p in r["stages"].values())
        lines.append(f"{name:<23}" + "".join(f"  {r['stages'].get(s, {}).get('VmRSS', 0):>9}" for s in stages)
                     + f"  {r['peak_rss_mb']:>8}  {anon:>9}  {r['seconds']:>7}")
    summary = {"runs": runs, "per_1000_slices": {}}
    for cached in (False, True):
        chosen = [r for r in runs if r["cached"] == cached]
        if len(chosen) < 2:
            continue
        rss = _fit(chosen, lambda r: r["peak_rss_mb"])
        anon = _fit(chosen, lambda r: max(p["RssAnon"] for p in r["stages"].values()))
        key = "cache_on" if cached else "cache_off"
        summary["per_1000_slices"][key] = {
            "fixed_mb": round(rss[0]), "mb_per_slice": round(rss[1], 2), "peak_rss_mb": round(rss[0] + 1000 * rss[1]),
            "anon_fixed_mb": round(anon[0]), "anon_mb_per_slice": round(anon[1], 2),
            "peak_anon_mb": round(anon[0] + 1000 * anon[1])}
    lines.append("")
    lines.append("fitted through the two sizes (512x512 slices), MB:")
    for key, fit in summary["per_1000_slices"].items():
        lines.append(f"  {key}: peak RSS {fit['fixed_mb']} + {fit['mb_per_slice']}/slice -> 1000 slices "
                     f"{fit['peak_rss_mb']}; anonymous {fit['anon_fixed_mb']} + {fit['anon_mb_per_slice']}/slice "
                     f"-> {fit['peak_anon_mb']}")
    return "\n".join(lines), summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=0, help="(internal) one job of this many slices")
    parser.add_argument("--cached", action="store_true", help="(internal) with the feature cache")
    parser.add_argument("--scratch", default="", help="(internal) working folder")
    parser.add_argument("--out", default="", help="report path (default benchmarks/results/memory_cpu.md)")
    args = parser.parse_args(argv)
    if args.slices:
        print("RESULT " + json.dumps(measure(args.slices, args.cached, Path(args.scratch))), flush=True)
        return
    began = time.perf_counter()
    runs = []
    for slices in SIZES:
        for cached in (False, True):
            with tempfile.TemporaryDirectory(prefix="fewshot-memory-") as scratch:
                runs.append(_child(slices, cached, scratch))
            print(f"{slices} slices, cache {cached}: peak RSS {runs[-1]['peak_rss_mb']} MB", flush=True)
    text, summary = report(runs)
    print(text)
    minutes = (time.perf_counter() - began) / 60
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    summary.update(command="benchmarks/memory.py " + " ".join(sys.argv[1:]), minutes=round(minutes, 1), commit=commit,
                   date=datetime.datetime.now().isoformat(timespec="minutes"))
    out = Path(args.out or ROOT / "benchmarks" / "results" / "memory_cpu.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Memory benchmark (cpu)\n\n- date: {summary['date']}\n- machine: {platform.machine()}, "
                   f"{os.cpu_count()} CPU cores\n- commit: {commit}\n- command: `.venv/bin/python {summary['command']}` "
                   f"({minutes:.1f} min)\n- stage columns: peak VmRSS (MB) while the job's progress was in that stage "
                   f"(propagate includes the component clean-up; done: landmarks and writing)\n\n```\n{text}\n```\n")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
