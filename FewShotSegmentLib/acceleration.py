"""The encoder made fast on the machine at hand, with the same features as fp32 eager.

Steps, each measured on the 2-core development machines (Sapphire Rapids class, AMX-BF16) with
LiteMedSAM, batch 4, after runtime.configure() (numbers in benchmarks/results/speed_cpu.md):
- BatchNorm folded into the preceding convolution (torch.nn.utils.fusion.fuse_conv_bn_eval):
  exact, and one op less per convolution.
- channels-last memory layout: every convolution, depthwise ones included, stays on oneDNN.
- bf16 weights and activations where the CPU has AMX-BF16 or AVX512-BF16 (oneDNN then runs the
  matmuls and convolutions on those units); fp32 elsewhere. Features keep a cosine of ~0.9986 to
  fp32 eager. autocast alone was slower than bf16 weights (it converts weights at every call).
- compiled ahead of time where a C++ compiler is present (AOTInductor, with freezing: weights
  become constants, prepacked for oneDNN, and GELU, adds and layer norms are fused into the
  matmuls' epilogues): bf16 0.34 -> 0.28 s a slice, fp32 0.58 -> 0.52 against torch.compile
  (inductor without freezing, which is what ran before). The compiled encoder is a package file
  in a per-user cache folder, keyed by the weights, the input shape, precision, device, thread
  count and torch version: building it costs 25-60 s once on a machine; a new process loads it
  in ~0.1 s and its first batch takes ~1.2 s, where torch.compile took 4-8 s (a warm cache) in
  every process, and freezing under torch.compile ~20 s (its graph is not cached). Any failure
  (no compiler, as in Slicer on Windows; a model that does not export; a package that does not
  load or run) falls back to eager, and the reason is kept in ``Accelerated.notes``.
"""
from __future__ import annotations

import copy
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import COMPILE_MODES, PRECISIONS


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 (what oneDNN needs for bf16 to beat fp32 on a CPU)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"                                   # mps: bf16 support varies by OS version


def c_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU, or None (then compile cannot work)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def default_cache_root() -> Path:
    """The per-user cache folder of compiled encoders and inductor's kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if sys.platform == "win32" else "")
    return Path(base or Path.home() / ".cache") / "fewshotsegment"


def default_inductor_cache() -> Path:
    """Inductor's own kernel cache, so that building a package reuses earlier kernels."""
    return default_cache_root() / "inductor"


def default_package_cache() -> Path:
    """Compiled encoders (AOTInductor packages), one file per model, input shape and machine."""
    return Path(os.environ.get("FEWSHOT_COMPILED_CACHE") or default_cache_root() / "compiled")


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every (Conv2d, BatchNorm2d) pair held as a Sequential (TinyViT's Conv2d_BN and the
    like) by one Conv2d with the normalization folded in. Eval mode only; works in place."""
    for name, child in module.named_children():
        parts = list(child.children()) if isinstance(child, torch.nn.Sequential) else []
        if (len(parts) == 2 and isinstance(parts[0], torch.nn.Conv2d)
                and isinstance(parts[1], torch.nn.BatchNorm2d) and not parts[1].training):
            setattr(module, name, fuse_conv_bn_eval(parts[0], parts[1]))
        else:
            fold_batchnorm(child)
    return module


def _inductor():
    """torch's compiler package, imported only where compiling is asked for (~1 s)."""
    import torch._inductor
    return torch._inductor


def _settings(module: torch.nn.Module) -> list:
    """Every submodule's plain attributes (numbers, strings, flags): what a forward may branch on
    that neither repr() nor the weights show (LiteMedSAM's features: which layer is returned)."""
    plain = (bool, int, float, str, tuple, type(None))
    return [(name, type(m).__qualname__, sorted((k, repr(v)) for k, v in vars(m).items()
                                                if not k.startswith("_") and isinstance(v, plain)))
            for name, m in module.named_modules()]


def package_key(module: torch.nn.Module, example: torch.Tensor) -> str:
    """What a compiled package depends on: the module (its structure, settings and every weight), the input
    (shape, dtype, layout), the device, torch's version and thread count (inductor's CPU kernels
    are compiled for a number of threads) and the CPU's vector instructions."""
    digest = hashlib.blake2b(digest_size=16)
    device = example.device
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.machine()}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()}")
    digest.update(repr((torch.__version__, hardware, tuple(example.shape), tuple(example.stride()),
                        str(example.dtype), repr(module), _settings(module))).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compiled_package(module: torch.nn.Module, example: torch.Tensor, folder: Path) -> Path:
    """The AOTInductor package of ``module`` for inputs like ``example``: from ``folder`` when it
    is there, else exported, compiled (freezing: weights as prepacked constants) and written there
    atomically (two processes building it at once both end with a whole file)."""
    path = Path(folder) / f"{package_key(module, example)}.pt2"
    if path.is_file():
        os.utime(path)          # recently used: pruning keeps it
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_inductor_cache()))
    with torch.no_grad():       # freezing needs grad off, or inductor compiles for training
        program = torch.export.export(module, (example,))
        handle, partial = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(handle)
        try:
            _inductor().aoti_compile_and_package(program, package_path=partial, inductor_configs={"freezing": True})
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    prune_packages(path.parent)
    return path


KEEP_PACKAGES = 8       # compiled packages a cache folder keeps: the most recently used


def prune_packages(folder: Path, keep: int = KEEP_PACKAGES) -> None:
    """Remove all but the ``keep`` most recently used packages (15-50 MB each for LiteMedSAM and
    ViT-S; every new checkpoint, shape or torch version makes another)."""
    packages = sorted(Path(folder).glob("*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[keep:]:
        old.unlink(missing_ok=True)


@dataclass
class Accelerated:
    """A module wrapped for fast inference, and what was chosen for it. With ``compile`` on, each
    input shape gets a compiled package on its first call (``compiled_package``); once a package
    cannot be built, loaded or run, every call runs the eager module."""
    module: torch.nn.Module
    precision: str                      # "fp32" or "bf16"
    compile: bool                       # compiled packages are used (False once one failed)
    notes: list[str] = field(default_factory=list)
    package_folder: Path | None = None
    _runners: dict = field(default_factory=dict)       # input shape -> loaded package

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _fall_back(self, what: str, exc: Exception) -> None:
        self.compile = False
        self.notes.append(f"compiled encoder {what}, eager fallback: {type(exc).__name__}: {str(exc)[:200]}")
        warnings.warn(self.notes[-1])

    def _runner(self, x: torch.Tensor):
        if not self.compile:
            return None
        key = (tuple(x.shape), x.device)
        if key not in self._runners:
            try:
                path = compiled_package(self.module, x, self.package_folder or default_package_cache())
            except Exception as exc:      # no export for this model, a compiler error, a full disk
                self._fall_back("could not be built", exc)
                return None
            try:
                self._runners[key] = _inductor().aoti_load_package(str(path))
            except Exception as exc:      # a damaged file: the next process builds it anew
                path.unlink(missing_ok=True)
                self._fall_back("could not be loaded", exc)
                return None
        return self._runners[key]

    def __call__(self, x: torch.Tensor):
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        runner = self._runner(x)
        if runner is not None:
            try:
                return runner(x)
            except Exception as exc:      # a runtime failure: eager gives the same answer
                self._fall_back("failed", exc)
        return self.module(x)


def accelerate(module: torch.nn.Module, device: torch.device, precision: str = "auto",
               compile: str = "auto", package_folder: Path | None = None) -> Accelerated:
    """A copy of ``module`` (eval) with BatchNorm folded, channels-last, in the chosen precision,
    compiled ahead of time when asked or (``auto``) when a compiler is available. Inputs are
    converted by the wrapper; outputs are in the module's precision."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    chosen = resolve_precision(precision, device)
    notes = []
    fast = fold_batchnorm(copy.deepcopy(module).eval())
    fast = fast.to(device=device, dtype=torch.bfloat16 if chosen == "bf16" else torch.float32)
    fast = fast.to(memory_format=torch.channels_last)
    compiled = False
    if compile != "off":
        reason = None
        if device.type == "cpu" and c_compiler() is None:
            reason = "no C++ compiler found (set CXX), eager used"
        elif device.type == "mps":
            reason = "compiling is not used on mps"
        elif not hasattr(_inductor(), "aoti_load_package"):
            reason = "this torch has no AOTInductor, eager used"
        compiled = reason is None
        if reason:
            notes.append(reason)
            if compile == "on":
                warnings.warn(reason)
    return Accelerated(fast, chosen, compiled, notes, package_folder)
