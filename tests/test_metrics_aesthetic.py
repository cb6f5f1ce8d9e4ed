"""Aesthetic Score: the head's layout, safetensors-only loading, and the score formula."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harmonpaint_recipe.metrics.aesthetic import AestheticHead, AestheticScore, load_aesthetic_head
from harmonpaint_recipe.metrics.base import Sample
from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder
from harmonpaint_recipe.metrics.testing import save_tiny_clip


def test_head_layout_matches_public_predictor():
    head = AestheticHead()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }
    drops = [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.2, 0.2, 0.1]
    # no activations: in eval mode the head is one affine map
    head.eval()
    x = torch.randn(3, 768)
    w = head.layers[7].weight @ head.layers[6].weight @ head.layers[4].weight @ head.layers[2].weight @ head.layers[0].weight
    b = head(torch.zeros(1, 768))
    torch.testing.assert_close(head(x), (x @ w.T).squeeze(-1) + b, atol=1e-5, rtol=1e-5)


def test_score_is_head_of_normalized_embedding(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    torch.manual_seed(0)
    head = AestheticHead(input_size=16)
    path = tmp_path / "head.safetensors"
    save_file(head.state_dict(), str(path))
    emb = ClipEmbedder(str(clip), local_files_only=True)
    metric = AestheticScore(emb, head_path=str(path))
    image = Image.new("RGB", (32, 32), (200, 30, 90))
    value = metric.safe_score(Sample(image=image)).values["as"]
    e = emb.image_embeds([image])[0]
    e = e / e.norm()
    with torch.no_grad():
        expected = float(head.eval()(e[None]))
    assert value == pytest.approx(expected, abs=1e-5)
    assert load_aesthetic_head(path).layers[0].weight.shape == (1024, 16)


def test_pickles_and_missing_heads_are_refused(tmp_path):
    emb = ClipEmbedder("unused")
    pth = tmp_path / "head.pth"
    pth.write_bytes(b"not read")
    for head_path, needle in [(None, "--aesthetic-head"), (str(pth), ".safetensors"), (str(tmp_path / "x.safetensors"), "does not exist")]:
        result = AestheticScore(emb, head_path=head_path).safe_score(Sample(image=Image.new("RGB", (4, 4))))
        assert result.values == {"as": None}
        assert needle in result.unavailable["as"]
