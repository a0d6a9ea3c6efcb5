"""Adapters on synthetic feature maps whose labels are known: each adapter must recover two
labelled regions (multi-label, one model), be deterministic for a seed, and survive state round trips."""
import numpy as np
import pytest
import torch

from FewShotSegmentLib.adapters import adapter_from_state, create_adapter, sample_training_pixels
from FewShotSegmentLib.backbones import Encoded
from FewShotSegmentLib.features import VolumeFeatures
from FewShotSegmentLib.metrics import dice

OPTIONS = {"basic": dict(center_features=True), "classification": dict(epochs=20),
           "contrastive": dict(steps=200)}


@pytest.fixture(scope="module")
def synthetic():
    """4 slices of 64x64 px with a 16x16 feature grid (scale 1, frame 64): label 1 is a square,
    label 2 a bar; features are noisy class-dependent vectors."""
    rng = np.random.default_rng(0)
    truth = np.zeros((4, 64, 64), np.uint8)
    truth[:, 8:32, 8:32] = 1
    truth[:, 40:56, 16:60] = 2
    centres = rng.normal(size=(3, 32)).astype(np.float32)
    cell = truth[:, 2::4, 2::4]                                   # label at each feature cell
    grid = centres[cell] + 0.3 * rng.normal(size=cell.shape + (32,)).astype(np.float32)
    features = torch.from_numpy(grid).permute(0, 3, 1, 2).half()
    return VolumeFeatures(Encoded(features=features, scale=1.0, frame=(64, 64)), (64, 64)), truth


def predict(adapter, vf):
    return np.stack([adapter.score_slice(vf, i).argmax(0).numpy() for i in range(len(vf))])


@pytest.mark.parametrize("kind", ["basic", "classification", "contrastive"])
def test_adapter_recovers_both_labels_from_one_slice(kind, synthetic):
    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[1] = truth[1]
    pixels = sample_training_pixels(vf, template, [1], 300, rng=np.random.default_rng(0))
    adapter = create_adapter(kind, seed=0, **OPTIONS[kind])
    adapter.fit(pixels)
    predicted = predict(adapter, vf)
    for label in (1, 2):
        assert dice(predicted == label, truth == label) > 0.85, (kind, label)
    restored = adapter_from_state(adapter.state())
    np.testing.assert_array_equal(predict(restored, vf), predicted)


def test_contrastive_training_is_deterministic_for_a_seed(synthetic):
    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[0] = truth[0]
    states = []
    for _ in range(2):
        pixels = sample_training_pixels(vf, template, [0], 200, rng=np.random.default_rng(3))
        adapter = create_adapter("contrastive", seed=3, steps=50)
        adapter.fit(pixels)
        states.append(adapter.state()["net"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_negative_margin_keeps_background_samples_away_from_the_roi(synthetic):
    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[0] = truth[0] == 1
    near = sample_training_pixels(vf, template, [0], 200, negative_margin_px=0, rng=np.random.default_rng(0))
    assert (near.labels == 0).sum() > 0 and (near.labels == 1).sum() == 200
    # every pixel of the 64x64 slice is within 60 px of the square at rows/cols 8..31
    far = sample_training_pixels(vf, template, [0], 200, negative_margin_px=60, rng=np.random.default_rng(0))
    assert (far.labels == 0).sum() == 0


@pytest.mark.parametrize("kind", ["classification", "contrastive"])
def test_chunked_scoring_gives_the_scores_of_all_pixels_at_once(kind, synthetic, monkeypatch):
    """score_pixels runs fixed-size chunks, the last padded with copies of its last pixel (so
    oneDNN sees few matmul shapes): the padding must never leak into the scores."""
    from FewShotSegmentLib.adapters import base

    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[1] = truth[1]
    adapter = create_adapter(kind, seed=0, **OPTIONS[kind])
    adapter.fit(sample_training_pixels(vf, template, [1], 300, rng=np.random.default_rng(0)))
    rows, cols = np.meshgrid(np.arange(0, 64, 3), np.arange(0, 64, 3), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()                      # 484 pixels: 3 chunks of 200, last padded
    with torch.inference_mode():
        whole = adapter._score(vf.sample(2, rows, cols), vf)
    monkeypatch.setattr(base, "SCORE_CHUNK", 200)
    monkeypatch.setattr(base, "MIN_CHUNK", 128)
    chunked = adapter.score_pixels(vf, 2, rows, cols)
    assert chunked.shape == whole.shape == (3, len(rows))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert adapter.score_pixels(vf, 2, rows[:0], cols[:0]).shape == (3, 0)


@pytest.mark.parametrize("kind", ["classification", "contrastive"])
def test_bf16_training_learns_as_float32_does(kind, synthetic):
    """fit(bf16=True) runs the matmuls in bfloat16 with float32 weights; autocast's weight cache
    once kept the first step's bf16 copy for the whole fit, and nothing was learnt."""
    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[1] = truth[1]
    pixels = sample_training_pixels(vf, template, [1], 300, rng=np.random.default_rng(0))
    adapter = create_adapter(kind, seed=0, **OPTIONS[kind])
    adapter.fit(pixels, bf16=True)
    predicted = predict(adapter, vf)
    for label in (1, 2):
        assert dice(predicted == label, truth == label) > 0.85, (kind, label)
    assert all(v.dtype == torch.float32 for v in adapter.state()["net"].values())


def test_same_probability_equals_the_pair_heads_softmax():
    """same_probability folds the head's first layer into two GEMMs (the hot loop of propagation):
    it must give softmax(pair_logits) for every (pixel, reference) pair, in float32 exactly and
    under bf16 autocast within bf16's precision."""
    from FewShotSegmentLib.adapters.contrastive import SiamesePairNet

    torch.manual_seed(0)
    net = SiamesePairNet(32, hidden=64, embed=16).eval()
    refs, others = torch.randn(12, 16), torch.randn(40, 16)
    with torch.inference_mode():
        expected = net.pair_logits(refs[None], others[:, None]).softmax(-1)[..., 1]     # (P, R)
        fused = net.same_probability(refs, others)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_bf16 = net.same_probability(refs, others)
    assert fused.shape == fused_bf16.shape == (40, 12)
    assert fused.dtype == fused_bf16.dtype == torch.float32
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_bf16, expected, atol=2e-2, rtol=0)
    assert not torch.allclose(fused_bf16, expected, atol=1e-6, rtol=0)   # bf16 did run


def _shifted(synthetic, shift):
    """The synthetic volume with label 1's features moved by ``shift`` (another patient's organ)."""
    vf, truth = synthetic
    cell = truth[:, 2::4, 2::4]
    features = vf.features.float().permute(0, 2, 3, 1).clone()
    features[torch.from_numpy(cell == 1)] += torch.from_numpy(shift)
    return VolumeFeatures(Encoded(features=features.permute(0, 3, 1, 2).half(), scale=1.0, frame=(64, 64)), (64, 64))


def test_support_from_the_target_volume_finds_an_organ_that_looks_other_than_the_templates(synthetic):
    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[1] = truth[1]
    pixels = sample_training_pixels(vf, template, [1], 300, rng=np.random.default_rng(0))
    other = _shifted(synthetic, 1.5 * np.random.default_rng(0).normal(size=32).astype(np.float32))
    rows, cols = np.nonzero(truth[2] == 1)
    pick = np.random.default_rng(1).choice(len(rows), 16, replace=False)
    target = {1: other.sample(2, rows[pick], cols[pick]).float()}

    basic = create_adapter("basic", seed=0, center_features=True)
    basic.fit(pixels)
    assert dice(predict(basic, other) == 1, truth == 1) < 0.5          # the template's prototype misses it
    supported = basic.supported_by(target, 1.0)
    assert dice(predict(supported, other) == 1, truth == 1) > 0.9
    assert dice(predict(supported, other) == 2, truth == 2) > 0.9
    torch.testing.assert_close(basic.supported_by(target, 0.0).prototypes, basic.prototypes)

    contrastive = create_adapter("contrastive", seed=0, steps=100)
    contrastive.fit(pixels)
    half = contrastive.supported_by(target, 0.5)
    m = contrastive.options["n_references"]
    # label 1: the template's first half of references stays, the target's pixels take the rest
    torch.testing.assert_close(half.references[0, :m // 2], contrastive.references[0, :m // 2])
    torch.testing.assert_close(half.references[0, m // 2:], contrastive._standardize(target[1][:m // 2]))
    torch.testing.assert_close(half.references[1], contrastive.references[1])    # no support given
    assert contrastive.references is not half.references
    np.testing.assert_array_equal(predict(contrastive.supported_by(target, 0.0), other), predict(contrastive, other))


def test_ensemble_averages_its_members_and_survives_a_saved_file(synthetic, tmp_path):
    """config.ensemble: adapters of seeds 0, 1, 2 trained on the same pixels; the scores are their
    mean, the file (weights_only) brings back the same scores, and a cancel reaches every member."""
    from FewShotSegmentLib.adapters import EnsembleAdapter
    from FewShotSegmentLib.errors import Cancelled

    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[1] = truth[1]
    pixels = sample_training_pixels(vf, template, [1], 300, rng=np.random.default_rng(0))
    ensemble = EnsembleAdapter.of(lambda seed: create_adapter("contrastive", seed=seed, steps=100), 3, seed=0)
    seen = []
    ensemble.fit(pixels, progress=lambda f, m: seen.append((f, m)))
    assert [m.seed for m in ensemble.members] == [0, 1, 2] and ensemble.n_labels == 2
    assert seen[-1][0] > 2 / 3 and "adapter 3/3" in seen[-1][1]
    members = [m.score_slice(vf, 2) for m in ensemble.members]
    assert not torch.equal(members[0], members[1])                  # the seeds differ
    torch.testing.assert_close(ensemble.score_slice(vf, 2), sum(members) / 3)
    predicted = predict(ensemble, vf)
    for label in (1, 2):
        assert dice(predicted == label, truth == label) > 0.85, label
    torch.save(ensemble.state(), tmp_path / "ensemble.pt")
    restored = adapter_from_state(torch.load(tmp_path / "ensemble.pt", weights_only=True))
    torch.testing.assert_close(restored.score_slice(vf, 2), ensemble.score_slice(vf, 2))

    messages = []
    again = EnsembleAdapter.of(lambda seed: create_adapter("contrastive", seed=seed, steps=100), 3, seed=0)
    with pytest.raises(Cancelled):      # cancelled once the second member has begun
        again.fit(pixels, progress=lambda f, m: messages.append(m),
                  cancel=lambda: any(m.startswith("adapter 2/3") for m in messages))
    assert again.members[2].n_labels == 0                            # never trained


@pytest.mark.parametrize("bf16", [False, True])
def test_ensemble_members_trained_side_by_side_are_those_trained_alone(synthetic, bf16):
    """EnsembleAdapter.fit trains its members in threads, one torch thread each: every member's
    weights and references are bit for bit those of the same adapter trained alone, and a member
    that fails stops the others, which then are not trained at all or raise at their next report."""
    from FewShotSegmentLib.adapters import EnsembleAdapter

    vf, truth = synthetic
    template = np.zeros_like(truth)
    template[1] = truth[1]
    draws = [sample_training_pixels(vf, template, [1], 300, rng=np.random.default_rng(i)) for i in range(3)]

    def make(seed):
        return create_adapter("contrastive", seed=seed, steps=60)

    previous = torch.get_num_threads()
    torch.set_num_threads(2)            # two members at once, whatever the machine
    try:
        alone = [make(seed) for seed in range(3)]
        for adapter, draw in zip(alone, draws):
            adapter.fit(draw, bf16=bf16)
        ensemble = EnsembleAdapter.of(make, 3, seed=0).fit(draws, bf16=bf16)
        assert torch.get_num_threads() == 2                          # restored
        for mine, theirs in zip(ensemble.members, alone):
            a, b = mine.state(), theirs.state()
            assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
            assert torch.equal(a["references"], b["references"])

        for failing in (0, 1):      # the failure is what is raised, not the others' Cancelled
            broken = EnsembleAdapter.of(make, 3, seed=0)
            broken.members[failing].fit = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("failed"))
            with pytest.raises(RuntimeError, match="failed"):
                broken.fit(draws)
            assert broken.members[2].n_labels == 0                   # never started
            assert broken.members[1 - failing].steps_run < 60        # stopped at a report
    finally:
        torch.set_num_threads(previous)


def test_auto_ensemble_is_three_adapters_only_for_other_volumes():
    from FewShotSegmentLib.config import PipelineConfig, resolve_ensemble
    from FewShotSegmentLib.errors import InputError

    assert PipelineConfig().ensemble == 0
    assert resolve_ensemble(0, for_other_volumes=True) == 3
    assert resolve_ensemble(0, for_other_volumes=False) == 1
    assert resolve_ensemble(2, True) == resolve_ensemble(2, False) == 2     # chosen: kept either way
    with pytest.raises(InputError, match="ensemble must be 0"):
        PipelineConfig(ensemble=-1).validate()
