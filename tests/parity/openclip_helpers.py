"""Build open_clip CoCa models with every parameter initialised (the parity oracle)."""
from __future__ import annotations

import torch

from coca_edge.models.config import CoCaConfig
from coca_edge.models.openclip import config_to_open_clip


def make_open_clip_coca(config: CoCaConfig, seed: int = 0):
    import open_clip

    cfg = dict(config_to_open_clip(config)["model_cfg"])
    cfg.pop("custom_text")
    torch.manual_seed(seed)
    model = open_clip.CoCa(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # open_clip leaves text_decoder.text_projection as torch.empty (see FACTS.md), and
        # zero biases / unit LayerNorms would hide a swapped mapping: perturb everything.
        model.text_decoder.text_projection.copy_(
            torch.randn(model.text_decoder.text_projection.shape, generator=g) * config.decoder.width ** -0.5)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.02)
    return model.eval()
