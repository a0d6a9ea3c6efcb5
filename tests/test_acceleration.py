"""The fast encoder path: BatchNorm folding is exact, the optimized LiteMedSAM features match fp32
eager, compiled packages are built once and reused, failures fall back to eager, and the feature cache is memory-mapped and safe."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from FewShotSegmentLib import acceleration, backbones, runtime
from FewShotSegmentLib.adapters.base import Plateau
from FewShotSegmentLib.backbones import build_backbone
from FewShotSegmentLib.features import encode_volume


def _conv_bn_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)),
        torch.nn.GELU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.BatchNorm2d(8)))
    for module in net.modules():               # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_batchnorm_folding_is_exact_and_removes_every_batchnorm():
    net = _conv_bn_net()
    x = torch.rand(2, 3, 16, 16)
    expected = net(x)
    folded = acceleration.fold_batchnorm(_conv_bn_net())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_no_compiler_means_eager_with_a_reason(monkeypatch):
    monkeypatch.setattr(acceleration, "c_compiler", lambda: None)
    fast = acceleration.accelerate(_conv_bn_net(), torch.device("cpu"), precision="fp32", compile="auto")
    assert not fast.compile and "no C++ compiler" in fast.notes[0]
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(fast(x), _conv_bn_net()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(acceleration.c_compiler() is None, reason="building a package needs a C++ compiler")
def test_compiled_package_is_built_once_then_loaded_and_matches_eager(tmp_path, monkeypatch):
    """The real AOTInductor path: the first call builds a package in the cache folder, a new
    wrapper (a new process) loads it without exporting again."""
    x = torch.rand(2, 3, 16, 16)
    expected = _conv_bn_net()(x)
    fast = acceleration.accelerate(_conv_bn_net(), torch.device("cpu"), "fp32", "on", package_folder=tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), expected, atol=1e-4, rtol=1e-4)
    assert fast.compile and not fast.notes
    (package,) = tmp_path.glob("*.pt2")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the package is in the cache")

    monkeypatch.setattr(torch.export, "export", no_export)
    again = acceleration.accelerate(_conv_bn_net(), torch.device("cpu"), "fp32", "on", package_folder=tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), expected, atol=1e-4, rtol=1e-4)
    assert again.compile and list(tmp_path.glob("*.pt2")) == [package]
    # the folder keeps the most recently used packages
    for age, name in enumerate(("old", "older", "oldest"), start=1):
        stale = tmp_path / f"{name}.pt2"
        stale.write_bytes(b"")
        os.utime(stale, (1e9 - age, 1e9 - age))
    acceleration.prune_packages(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt2")) == sorted([package.name, "old.pt2"])


def test_package_key_follows_weights_shape_and_settings():
    """A package is reused only for the same weights, input and forward: other weights, another
    batch shape or a setting the forward branches on (LiteMedSAM: which layer) get their own."""
    example = torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    folded = acceleration.fold_batchnorm(_conv_bn_net())
    key = acceleration.package_key(folded, example)
    assert acceleration.package_key(acceleration.fold_batchnorm(_conv_bn_net()), example) == key
    other = _conv_bn_net()
    other[0][0].weight.data += 1
    assert acceleration.package_key(acceleration.fold_batchnorm(other), example) != key
    assert acceleration.package_key(folded, example[:1]) != key
    from FewShotSegmentLib.backbones import _TinyViTFeatures, load_litemedsam
    encoder = load_litemedsam("").image_encoder
    frames = torch.rand(1, 3, 256, 256)
    keys = {acceleration.package_key(_TinyViTFeatures(encoder, layer), frames) for layer in ("preneck", "neck", "stages")}
    assert len(keys) == 3


def test_a_package_that_cannot_be_built_or_run_falls_back_to_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(acceleration, "c_compiler", lambda: "/usr/bin/g++")
    x = torch.rand(1, 3, 8, 8)
    expected = _conv_bn_net()(x)

    def no_build(module, example, folder):
        raise RuntimeError("simulated export failure")

    monkeypatch.setattr(acceleration, "compiled_package", no_build)
    fast = acceleration.accelerate(_conv_bn_net(), torch.device("cpu"), "fp32", "on", package_folder=tmp_path)
    with pytest.warns(UserWarning, match="could not be built, eager fallback"):
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    assert not fast.compile and "simulated export failure" in fast.notes[-1]

    # a damaged package file: removed (the next process builds it anew), eager now
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(b"not a package")
    monkeypatch.setattr(acceleration, "compiled_package", lambda module, example, folder: damaged)
    fast = acceleration.accelerate(_conv_bn_net(), torch.device("cpu"), "fp32", "on", package_folder=tmp_path)
    with pytest.warns(UserWarning, match="could not be loaded"):
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    assert not damaged.exists()

    # a package that loads but fails when it runs
    class Broken:
        def aoti_load_package(self, path):
            def run(x):
                raise RuntimeError("simulated kernel failure")
            return run

    monkeypatch.setattr(acceleration, "compiled_package", lambda module, example, folder: tmp_path / "any.pt2")
    monkeypatch.setattr(acceleration, "_inductor", lambda: Broken())
    fast = acceleration.accelerate(_conv_bn_net(), torch.device("cpu"), "fp32", "on", package_folder=tmp_path)
    with pytest.warns(UserWarning, match="failed, eager fallback"):
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    assert not fast.compile and "simulated kernel failure" in fast.notes[-1]
    torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)   # eager from then on


def test_precision_follows_the_cpu():
    cpu = torch.device("cpu")
    assert acceleration.resolve_precision("fp32", cpu) == "fp32"
    assert acceleration.resolve_precision("auto", cpu) == ("bf16" if acceleration.cpu_has_fast_bf16() else "fp32")
    with pytest.raises(ValueError):
        acceleration.resolve_precision("fp8", cpu)


def test_runtime_configure_keeps_freed_memory_on_linux():
    settings = runtime.configure()
    assert settings["threads"] == runtime.available_cores()
    if runtime.sys.platform.startswith("linux"):
        assert settings["allocator_keeps_memory"] is True


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not runtime.sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_is_kept_while_encoding_and_given_back_afterwards():
    """The encoder reuses its freed blocks (runtime.encoder_memory); after it, 200 MB freed must
    leave the process, or every later stage's temporaries stay resident (6.9 GB on a 300-slice CT)."""
    with runtime.encoder_memory():
        before = _rss_mb()
        block = np.ones(200 << 20, np.uint8)
        del block
        kept = _rss_mb() - before
    assert kept > 150                                     # inside: kept for the next batch
    after = _rss_mb()
    assert after < before + 50                            # on leaving: given back
    block = np.ones(200 << 20, np.uint8)                  # after: a large block is mapped...
    del block
    assert _rss_mb() < after + 50                         # ...and unmapped when freed


@pytest.fixture(scope="module")
def ct_slices():
    from FewShotSegmentLib import io, pipeline
    from FewShotSegmentLib.features import slices_along
    from FewShotSegmentLib.preprocessing import normalize_volume
    import SimpleITK as sitk

    image = io.read_image("FewShotSegment/Resources/SampleData/example_ct.nii.gz")
    volume = normalize_volume(sitk.GetArrayFromImage(pipeline._to_canonical(image)), "ct", "abdomen")
    return np.ascontiguousarray(slices_along(volume, "axial")[50:55], dtype=np.float32)


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1)).min().item()


def test_optimized_litemedsam_features_match_fp32_eager(ct_slices):
    """Measured: bf16 features keep a cosine of ~0.9986 to fp32 eager, folded fp32 ~1.0."""
    eager = build_backbone("litemedsam", device="cpu", precision="fp32", compile="off")
    reference = encode_volume(ct_slices, eager, batch_size=4)
    # the default (auto: bf16 where the CPU has it, compiled where a compiler is) as the pipeline runs it
    tags = {}
    for precision, compile, floor in (("fp32", "off", 0.9999), ("bf16", "off", 0.995), ("auto", "auto", 0.995)):
        fast = build_backbone("litemedsam", device="cpu", precision=precision, compile=compile)
        tags[precision] = fast.cache_tag
        got = encode_volume(ct_slices, fast, batch_size=4)       # 5 slices: the last batch is padded
        assert got.features.shape == reference.features.shape
        assert _cosine(got.features, reference.features) >= floor
        # the SAM embedding, made from the stored features when refinement asks (the neck)
        assert got.sam_embeddings[3].shape == (256, 64, 64)
        assert _cosine(torch.stack([got.sam_embeddings[i] for i in range(len(got))]),
                       eager.model.image_encoder.neck(reference.features.float())) >= floor
    assert tags["fp32"] == eager.cache_tag != tags["bf16"] and eager.id == fast.id   # one model, two caches
    assert eager.cache_tag.endswith(backbones.ENCODER_ARITHMETIC)     # an earlier encoder's cache is not read


def test_feature_cache_is_memory_mapped_and_an_interrupted_entry_is_recomputed(ct_slices, tmp_path):
    backbone = build_backbone("litemedsam", device="cpu", precision="fp32", compile="off")
    first = encode_volume(ct_slices[:2], backbone, batch_size=2, cache_dir=tmp_path).features.clone()
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((entry / "meta.json").read_text())["arrays"]["features"][0] == 2
    again = encode_volume(ct_slices[:2], backbone, batch_size=2, cache_dir=tmp_path)
    assert torch.equal(again.features, first)
    maps = Path("/proc/self/maps")
    if maps.exists():                                     # Linux: the file is mapped, not read into memory
        assert str(entry / "features.f16") in maps.read_text()
    del again                                  # nothing may touch a mapping of a file truncated below it
    # a truncated file (an encoding killed half-way, a full disk) is never trusted
    with open(entry / "features.f16", "r+b") as handle:
        handle.truncate(100)
    rebuilt = encode_volume(ct_slices[:2], backbone, batch_size=2, cache_dir=tmp_path)
    assert torch.equal(rebuilt.features, first)


def test_plateau_stops_a_flat_loss_and_not_a_falling_one():
    flat = Plateau(window=10)
    stopped = next(step for step in range(1000) if flat.update(torch.tensor(0.01)))
    assert stopped == 29                       # best window, then two without a 5 % gain
    falling = Plateau(window=10)
    assert not any(falling.update(torch.tensor(0.9 ** (step / 10))) for step in range(300))
    assert not any(Plateau(window=0).update(torch.tensor(0.0)) for _ in range(50))


def test_small_ops_use_more_threads_only_on_idle_cores(monkeypatch):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv("FEWSHOT_SMALL_OP_THREADS", raising=False)
        for idle, expected in ((2.0, 2), (1.0, 1), (None, 1)):
            monkeypatch.setattr(runtime, "idle_cores", lambda window_s=0.05, idle=idle: idle)
            monkeypatch.setitem(runtime._small_ops, "at", float("-inf"))
            assert runtime.small_op_threads() == expected, idle
            with runtime.small_ops():
                assert torch.get_num_threads() == expected
            assert torch.get_num_threads() == 2
        monkeypatch.setenv("FEWSHOT_SMALL_OP_THREADS", "1")
        monkeypatch.setattr(runtime, "idle_cores", lambda window_s=0.05: 2.0)
        assert runtime.small_op_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_idle_cores_reads_this_machine():
    import os

    idle = runtime.idle_cores(0.1)
    assert idle is not None and 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6


def test_bf16_box_decoding_draws_the_masks_of_fp32(ct_slices):
    """Refinement decodes with a bf16 copy of the mask decoder where precision resolves to bf16
    (measured: Dice 0.985-1.0 to fp32's masks); the logits come back float32 on the slice grid."""
    from FewShotSegmentLib.metrics import dice
    from FewShotSegmentLib.refine import LiteMedSAMRefiner

    encoded = encode_volume(ct_slices[2:3], build_backbone("litemedsam", device="cpu", precision="fp32",
                                                           compile="off"), batch_size=1)
    h, w = ct_slices.shape[1:]
    boxes = np.array([[w * 0.15, h * 0.3, w * 0.5, h * 0.7], [w * 0.55, h * 0.35, w * 0.8, h * 0.6]], np.float32)
    fp32 = LiteMedSAMRefiner(precision="fp32").box_logits(encoded.sam_embeddings[0], encoded.scale, (h, w), boxes)
    refiner = LiteMedSAMRefiner(precision="bf16")
    assert refiner.precision == "bf16"
    bf16 = refiner.box_logits(encoded.sam_embeddings[0], encoded.scale, (h, w), boxes)
    assert bf16.shape == fp32.shape == (2, h, w) and bf16.dtype == np.float32
    for got, expected in zip(bf16 > 0, fp32 > 0):
        assert expected.sum() > 100 and dice(got, expected) > 0.97


def test_map_on_idle_cores_keeps_order_and_stops_at_an_error(monkeypatch):
    import threading
    import time

    previous = torch.get_num_threads()
    monkeypatch.setenv("FEWSHOT_SMALL_OP_THREADS", "2")
    seen, threads, calls = [], set(), []

    def square(x):
        threads.add(threading.get_ident())
        calls.append(x)
        time.sleep(0.005)       # long enough that the next call starts before this one ends
        assert torch.get_num_threads() == 1          # one torch thread per call
        return x * x

    runtime.map_on_idle_cores(square, range(20), lambda item, result: seen.append((item, result)))
    assert seen == [(x, x * x) for x in range(20)]
    assert len(threads) == 2 and threading.get_ident() not in threads
    assert torch.get_num_threads() == previous

    def stop_at_3(item, result):                     # a cancel seen in the calling thread
        if item == 3:
            raise RuntimeError("stop")
    calls.clear()
    with pytest.raises(RuntimeError, match="stop"):
        runtime.map_on_idle_cores(square, range(100), stop_at_3)
    assert len(calls) <= 3 + 3                       # the few calls ahead of it, not the other 94
    assert torch.get_num_threads() == previous

    def fails_at_5(x):
        if x == 5:
            raise ValueError("bad slice 5")
        return x
    with pytest.raises(ValueError, match="bad slice 5"):
        runtime.map_on_idle_cores(fails_at_5, range(50))
    monkeypatch.setenv("FEWSHOT_SMALL_OP_THREADS", "1")      # busy cores: one after another, here
    threads.clear()
    runtime.map_on_idle_cores(square, range(4))
    assert threads == {threading.get_ident()}
