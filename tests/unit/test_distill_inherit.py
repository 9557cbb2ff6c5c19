"""Weight inheritance (coca_edge.models.inherit)."""
from __future__ import annotations

import pytest
import torch

from coca_edge.models import CoCa, CoCaConfig
from coca_edge.models.inherit import InheritError, inherit_weights


def _smaller(config: CoCaConfig) -> CoCaConfig:
    d = config.to_dict()
    d["vision"].update(width=32, layers=1, attn_pooler_queries=8, attn_pooler_heads=1)
    d["text"].update(width=32, heads=1, layers=1)
    d["decoder"].update(width=32, heads=1, layers=1)
    d["embed_dim"] = 32
    return CoCaConfig.from_dict(d)


def test_same_shape_student_is_the_teacher(tiny_config, tiny_model, tiny_pixels):
    student = inherit_weights(tiny_model, tiny_config).eval()
    ids = torch.randint(1, 1000, (3, 8))
    a, b = tiny_model(tiny_pixels, ids), student(tiny_pixels, ids)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_smaller_student_slices_consistently(tiny_config, tiny_model, tiny_pixels):
    student = inherit_weights(tiny_model, _smaller(tiny_config)).eval()
    t, s = tiny_model.state_dict(), student.state_dict()
    # layer picking keeps the last block; every kept value comes from the teacher
    for name in ("visual.blocks.0.ln_1.weight", "text.blocks.0.mlp.fc1.bias", "decoder.head"):
        teacher_name = name.replace("blocks.0", "blocks.1")
        assert torch.isin(s[name].flatten(), t[teacher_name].flatten()).all(), name
    assert torch.equal(s["visual.pool.query"][0], t["visual.pool.query"][0][
        torch.isin(t["visual.pool.query"][0], s["visual.pool.query"][0])])
    out = student(tiny_pixels, torch.randint(1, 1000, (3, 8)))
    assert out["logits"].shape == (3, 7, tiny_config.vocab_size)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_inherited_student_beats_random_init(tiny_config, tiny_model, tiny_pixels):
    """Closer to the teacher's image-text similarities than a random student of that shape."""
    torch.manual_seed(0)
    small = _smaller(tiny_config)
    ids = torch.randint(1, 1000, (3, 8))

    def sims(model):
        with torch.no_grad():
            out = model(tiny_pixels, ids)
        return out["image_features"] @ out["text_features"].T

    target = sims(tiny_model)
    inherited = (sims(inherit_weights(tiny_model, small)) - target).abs().mean()
    random = (sims(CoCa(small)) - target).abs().mean()
    assert inherited < random


def test_larger_or_incompatible_student_is_a_clear_error(tiny_config, tiny_model):
    d = tiny_config.to_dict()
    d["vision"]["layers"] = 3
    d["vision"]["patch_size"] = 16
    with pytest.raises(InheritError, match=r"vision.patch_size: student 16 != teacher 8.*vision.layers: student 3 > teacher 2"):
        inherit_weights(tiny_model, CoCaConfig.from_dict(d))
