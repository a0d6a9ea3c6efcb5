"""The persistent worker (python -m FewShotSegmentLib.server) as a client drives it: a real process,
JSON commands on stdin, JSON events on stdout. One server serves the jobs of this module in order:
the second job on a volume reuses the backbone and the features, a cancel during training returns
within 2 s, a bad or crashing job reports an error and the server goes on serving."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
QUICK = {"steps": 100, "refine": "none", "cache_dir": "", "device": "cpu"}


class Server:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "FewShotSegmentLib.server"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.events = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.events.put(json.loads(line))   # every stdout line is a JSON event
        self.events.put(None)

    def send(self, **command):
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def next(self, timeout=300):
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s; stderr: {''.join(self.stderr[-20:])}") from None
        assert event is not None, f"the server exited; stderr: {''.join(self.stderr[-20:])}"
        return event

    def until_final(self, job_id, timeout=300):
        """Events of job_id up to its done/error/cancelled."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            event = self.next(max(1.0, deadline - time.monotonic()))
            assert event.get("id") == job_id, event
            seen.append(event)
            if event["event"] in ("done", "error", "cancelled"):
                return seen

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def synthetic_volume(folder: Path):
    """8 CT-like slices of 48 x 48 with a bright ellipsoid and a darker ball, painted on slice 4."""
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:8, :48, :48]
    blob = ((k - 4) / 5.0) ** 2 + ((j - 22) / 11.0) ** 2 + ((i - 16) / 9.0) ** 2 <= 1
    ball = ((k - 4) / 4.0) ** 2 + ((j - 24) / 7.0) ** 2 + ((i - 35) / 7.0) ** 2 <= 1
    body = ((j - 24) / 22.0) ** 2 + ((i - 24) / 23.0) ** 2 <= 1
    array = np.where(body, 0.0, -1000.0) + rng.normal(0, 10, blob.shape)
    array[blob], array[ball] = 120 + rng.normal(0, 10, blob.sum()), 60 + rng.normal(0, 10, ball.sum())
    painted = np.zeros(blob.shape, np.uint8)
    painted[4][blob[4]], painted[4][ball[4]] = 1, 2
    for name, values in (("image.nrrd", array.astype(np.int16)), ("template.nrrd", painted)):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((1.5, 1.5, 2.5))
        sitk.WriteImage(image, str(folder / name))
    return folder / "image.nrrd", folder / "template.nrrd"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    return synthetic_volume(tmp_path_factory.mktemp("volume"))


@pytest.fixture(scope="module")
def server():
    started = time.monotonic()
    server = Server()
    server.ready = server.next(timeout=120)
    server.ready_s = time.monotonic() - started   # start-up: python, torch and the library imported
    yield server
    server.close()


def run_job(folder, volume, **config):
    image, template = volume
    return {"task": "run", "image": str(image), "template": str(template), "output_dir": str(folder),
            "labels": {"1": {"name": "blob"}, "2": {"name": "ball"}}, "config": {**QUICK, **config}}


def test_ready_then_a_second_job_on_the_same_volume_reuses_backbone_and_features(server, volume, tmp_path):
    assert server.ready["event"] == "ready" and server.ready["pid"] == server.process.pid
    results, seconds = [], []
    for job_id in ("1", "2"):
        started = time.monotonic()
        server.send(command="run", id=job_id, job=run_job(tmp_path / job_id, volume))
        events = server.until_final(job_id)
        seconds.append(time.monotonic() - started)
        assert events[0]["event"] == "started" and events[0]["pid"] == server.process.pid
        assert events[-1]["event"] == "done", events[-1]
        results.append(events[-1])
    print(f"server ready after {server.ready_s:.1f} s; first job {seconds[0]:.1f} s, second job {seconds[1]:.1f} s (server: "
          f"{results[0]['seconds']:.1f} s, {results[1]['seconds']:.1f} s)")
    assert results[0]["reused"] == {"backbone": False, "features": False}
    assert results[1]["reused"] == {"backbone": True, "features": True}
    summary = json.loads(Path(results[1]["outputs"]["summary"]).read_text())
    assert summary["reused"] == {"backbone": True, "features": True}
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(r["outputs"]["labels"])) for r in results]
    for found in labels:
        assert (found == 1).sum() > 100 and (found == 2).sum() > 50
        assert (found[[1, 7]] > 0).any()        # propagated beyond the painted slice 4
    assert np.array_equal(labels[0], labels[1])  # same features, same seed: the same result
    assert seconds[1] < seconds[0]


def test_cancel_during_training_returns_within_2_s_and_the_server_goes_on(server, volume, tmp_path):
    server.send(command="run", id="long", job=run_job(tmp_path / "long", volume, steps=20000))
    while True:
        event = server.next()
        assert event["event"] not in ("done", "error", "cancelled"), event
        if event.get("stage") == "train":
            break
    started = time.monotonic()
    server.send(command="cancel", id="long")
    rest = server.until_final("long", timeout=30)
    print(f"cancel during training took {time.monotonic() - started:.2f} s")
    assert rest[-1]["event"] == "cancelled"
    assert time.monotonic() - started < 2.0
    assert not (tmp_path / "long").exists() or not any((tmp_path / "long").iterdir())

    # a cancel for a job not yet started drops it; the next one runs (features still in memory)
    server.send(command="cancel", id="dropped")
    server.send(command="run", id="dropped", job=run_job(tmp_path / "dropped", volume))
    server.send(command="run", id="after", job=run_job(tmp_path / "after", volume))
    assert [e["event"] for e in server.until_final("dropped")] == ["cancelled"]
    done = server.until_final("after")[-1]
    assert done["event"] == "done" and done["reused"]["features"]


def test_cancel_while_an_ensembles_adapters_train_side_by_side(server, volume, tmp_path):
    """An ensemble of 3 trains two adapters at once on 2 cores (EnsembleAdapter.fit): a cancel
    reaches both running members and the waiting one, as fast as with one adapter."""
    from FewShotSegmentLib.runtime import available_cores

    if available_cores() < 2:          # the server takes a torch thread per core it may run on
        pytest.skip("members train side by side only with two torch threads")
    server.send(command="run", id="ensemble",
                job=run_job(tmp_path / "ensemble", volume, steps=20000, plateau_steps=0, ensemble=3))
    running = set()
    while running != {"adapter 1/3", "adapter 2/3"}:        # both report before either could finish
        event = server.next(timeout=120)
        assert event["event"] not in ("done", "error", "cancelled"), event
        if event.get("stage") == "train":
            running.add(event["message"].split(":")[0])
    started = time.monotonic()
    server.send(command="cancel", id="ensemble")
    rest = server.until_final("ensemble", timeout=30)
    assert rest[-1]["event"] == "cancelled"
    assert time.monotonic() - started < 2.0
    assert not (tmp_path / "ensemble").exists() or not any((tmp_path / "ensemble").iterdir())


def test_a_bad_or_crashing_job_is_an_error_and_the_server_survives(server, volume, tmp_path):
    server.send(command="run", id="bad", job={"task": "run", "image": str(volume[0])})
    error = server.until_final("bad")[-1]
    assert error["event"] == "error" and "template" in error["message"]
    # a type the config does not check fails inside training: a bug, reported with its traceback
    server.send(command="run", id="crash", job=run_job(tmp_path / "crash", volume, steps="many"))
    error = server.until_final("crash")[-1]
    assert error["event"] == "error" and "TypeError" in error["message"] and "Traceback" in error["traceback"]
    server.send(command="run", id="ok", job=run_job(tmp_path / "ok", volume))
    assert server.until_final("ok")[-1]["event"] == "done"


def test_shutdown_cancels_the_running_job_and_exits_0(server, volume, tmp_path):
    server.send(command="run", id="last", job=run_job(tmp_path / "last", volume, steps=20000))
    while server.next().get("stage") != "train":
        pass
    started = time.monotonic()
    server.send(command="shutdown")
    assert server.until_final("last", timeout=30)[-1]["event"] == "cancelled"
    assert server.process.wait(timeout=10) == 0
    print(f"shutdown during training: exit after {time.monotonic() - started:.2f} s")
    assert time.monotonic() - started < 5.0


def test_end_of_stdin_exits_0_and_sigterm_exits_143_promptly():
    closed, terminated = Server(), Server()
    try:
        for server in (closed, terminated):
            assert server.next(timeout=120)["event"] == "ready"
        started = time.monotonic()
        closed.process.stdin.close()                 # the client died or closed the pipe
        terminated.process.send_signal(signal.SIGTERM)
        assert closed.process.wait(timeout=10) == 0
        assert terminated.process.wait(timeout=10) == 143
        assert time.monotonic() - started < 5.0
    finally:
        closed.close()
        terminated.close()
