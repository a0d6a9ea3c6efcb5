"""LiteMedSAM's mask decoder as refinement runs it (mask_decoder.py): the stock decoder's logits
for many prompts against one slice, with the image side shared or per prompt, and the box crops
exactly the logits of the whole grid there."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from FewShotSegmentLib import mask_decoder
from FewShotSegmentLib.backbones import load_litemedsam
from FewShotSegmentLib.refine import LiteMedSAMRefiner, box_token_crops


@pytest.fixture(scope="module")
def model():
    return load_litemedsam()


def _prompts(model, boxes):
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=gen) * 0.3
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor(boxes)[:, None], masks=None)
    return embedding, model.prompt_encoder.get_dense_pe(), sparse, dense


BOXES = [[40.0, 50, 150, 160], [10.0, 20, 60, 90], [120.0, 100, 250, 240], [0.0, 0, 255, 255]]


@pytest.mark.parametrize("dense_copies", ["one", "per prompt"])
def test_first_mask_logits_are_the_stock_decoders(model, dense_copies):
    """Whether the image side starts as one copy (refinement: no mask prompt) or one per prompt."""
    embedding, pe, sparse, dense = _prompts(model, BOXES)
    with torch.inference_mode():
        stock, _ = model.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
        ours = mask_decoder.first_mask_logits(model.mask_decoder, embedding, pe, sparse,
                                              dense[:1] if dense_copies == "one" else dense.contiguous())
    assert ours.shape == stock.shape == (len(BOXES), 1, 256, 256)
    assert (ours - stock).abs().max() < 1e-4 * stock.abs().max()


def test_folded_cross_attentions_equal_the_stock_attention(model):
    """The projections folded into the prompt tokens: the stock Attention's output."""
    layer = model.mask_decoder.transformer.layers[1]
    gen = torch.Generator().manual_seed(1)
    tokens, image = torch.randn(3, 7, 256, generator=gen), torch.randn(3, 4096, 256, generator=gen)
    with torch.inference_mode():
        for ours, stock in (
                (mask_decoder.token_to_image(layer.cross_attn_token_to_image, tokens, image, image),
                 layer.cross_attn_token_to_image(q=tokens, k=image, v=image)),
                (mask_decoder.token_to_image(layer.cross_attn_token_to_image, tokens, image[:1], image[:1]),
                 layer.cross_attn_token_to_image(q=tokens, k=image[:1].expand(3, -1, -1), v=image[:1].expand(3, -1, -1))),
                (mask_decoder.image_to_token(layer.cross_attn_image_to_token, image, tokens, tokens),
                 layer.cross_attn_image_to_token(q=image, k=tokens, v=tokens)),
                (mask_decoder.image_to_token(layer.cross_attn_image_to_token, image[:1], tokens, tokens),
                 layer.cross_attn_image_to_token(q=image[:1].expand(3, -1, -1), k=tokens, v=tokens))):
            assert ours.shape == stock.shape
            assert (ours - stock).abs().max() < 1e-4 * stock.abs().max()


def test_box_logits_drawn_on_the_box_crop_equal_the_whole_grids():
    """Upscaling only the tokens around each box changes no logit inside the box, at any box
    size or place (edges and corners, a 2-pixel box) on a slice that is not square."""
    refiner = LiteMedSAMRefiner(precision="fp32")
    h, w = 300, 420
    scale = 256 / max(h, w)
    gen = torch.Generator().manual_seed(2)
    embedding = torch.randn(256, 64, 64, generator=gen) * 0.3
    boxes = np.array([[0, 0, 419, 299], [0, 0, 1, 1], [418, 298, 419, 299], [37, 81, 39, 82],
                      [100, 5, 260, 140], [300, 150, 419, 299]], np.float32)
    cropped = refiner.box_logits(embedding, scale, (h, w), boxes)
    with torch.inference_mode():
        sparse, dense = refiner.model.prompt_encoder(
            points=None, boxes=torch.as_tensor((boxes + 0.5) * scale)[:, None], masks=None)
        low = mask_decoder.first_mask_logits(refiner.decoder, embedding[None], refiner.model.prompt_encoder.get_dense_pe(),
                                             sparse, dense[:1])
    nh, nw = round(h * scale), round(w * scale)
    whole = F.interpolate(low[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
    for got, expected, (c0, r0, c1, r1) in zip(cropped, whole, boxes.astype(int)):
        # (a convolution over fewer tokens may round differently: 1e-6)
        np.testing.assert_allclose(got[r0:r1 + 1, c0:c1 + 1], expected[r0:r1 + 1, c0:c1 + 1], rtol=1e-5, atol=1e-4)
    crops = box_token_crops(boxes, (h, w), (nh, nw), (64, 64))
    r0, r1, c0, c1 = crops[0].tolist()                         # the whole slice: every token it covers
    assert (r0, c0, c1) == (0, 0, 64) and np.ceil(nh / 4) <= r1 <= 64
    assert (crops[:, 1] > crops[:, 0]).all() and (crops[:, 3] > crops[:, 2]).all()
    assert crops[3].tolist()[1] - crops[3].tolist()[0] <= 4    # a 2-pixel box: a few tokens
