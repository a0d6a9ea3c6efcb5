"""The encoder made fast on the machine at hand, with the same features as fp32 eager.

Steps, each measured on the 2-core development machines (Sapphire Rapids class, AMX-BF16) with
LiteMedSAM, batch 4, after runtime.configure() (numbers in benchmarks/results/speed_cpu.md):
- BatchNorm folded into the preceding convolution (torch.nn.utils.fusion.fuse_conv_bn_eval):
  exact, and one op less per convolution.
- channels-last memory layout: every convolution, depthwise ones included, stays on oneDNN.
- bf16 weights and activations where the CPU has AMX-BF16 or AVX512-BF16 (oneDNN then runs the
  matmuls and convolutions on those units); fp32 elsewhere. Features keep a cosine of ~0.9986 to
  fp32 eager. autocast alone was slower than bf16 weights (it converts weights at every call).
- torch.compile (inductor) where a C++ compiler is present: it fuses GELU, adds and layer
  norms into the matmuls' epilogues. Compilation costs ~45 s the first time on a machine and
  ~8 s once inductor's on-disk cache is warm (kept in a per-user cache folder); any failure
  (no compiler, as in Slicer on Windows; an unsupported op) falls back to eager, and the reason
  is kept in ``Accelerated.notes``.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
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


def default_inductor_cache() -> Path:
    """A per-user folder for inductor's compiled kernels, so a new process reuses them."""
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if sys.platform == "win32" else "")
    return Path(base or Path.home() / ".cache") / "fewshotsegment" / "inductor"


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


@dataclass
class Accelerated:
    """A module wrapped for fast inference, and what was chosen for it."""
    module: torch.nn.Module
    precision: str                      # "fp32" or "bf16"
    compile: bool                       # compiled, and the compiled graph ran
    notes: list[str] = field(default_factory=list)
    _compiled: object = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def __call__(self, x: torch.Tensor):
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as exc:     # a compiler or op failure: eager gives the same answer
                self._compiled, self.compile = None, False
                self.notes.append(f"torch.compile failed, eager fallback: {type(exc).__name__}: {str(exc)[:200]}")
                warnings.warn(self.notes[-1])
        return self.module(x)


def accelerate(module: torch.nn.Module, device: torch.device, precision: str = "auto",
               compile: str = "auto") -> Accelerated:
    """A copy of ``module`` (eval) with BatchNorm folded, channels-last, in the chosen precision,
    compiled when asked or (``auto``) when a compiler is available. Inputs are converted by the
    wrapper; outputs are in the module's precision."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    chosen = resolve_precision(precision, device)
    notes = []
    fast = fold_batchnorm(copy.deepcopy(module).eval())
    fast = fast.to(device=device, dtype=torch.bfloat16 if chosen == "bf16" else torch.float32)
    fast = fast.to(memory_format=torch.channels_last)
    compiled = None
    if compile != "off":
        reason = None
        if device.type == "cpu" and c_compiler() is None:
            reason = "no C++ compiler found (set CXX), eager used"
        elif device.type == "mps":
            reason = "torch.compile is not used on mps"
        elif not hasattr(torch, "compile"):
            reason = "this torch has no torch.compile"
        if reason is None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_inductor_cache()))
            try:
                compiled = torch.compile(fast, dynamic=False)
            except Exception as exc:
                reason = f"torch.compile unavailable: {type(exc).__name__}: {str(exc)[:200]}"
        if reason:
            notes.append(reason)
            if compile == "on":
                warnings.warn(reason)
    return Accelerated(fast, chosen, compiled is not None, notes, compiled)
