"""Vocabulary pruning of a trained checkpoint: keep only the tokens its captions use.

A CoCa holding the whole CLIP vocabulary spends ``49408 x width`` parameters on the token
embedding and as many on the decoder head; on a narrow domain almost all of those rows are
tokens the data never uses (the demo teacher: 9.5M of its 11.4M parameters). Pruning keeps
the rows of the tokens that occur in the training captions (``data_vocabulary``) plus the
start, end and pad tokens; the tokenizer, the token ids and every graph interface stay the
same (``CoCaConfig.vocab_subset``). For text made of kept tokens the pruned model computes
what the original does; it can no longer predict any other token.

    coca-edge prune-vocab recipes/demo_teacher/model.safetensors --out runs/teacher-pruned
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DataConfig

__all__ = ["prune_checkpoint"]


def prune_checkpoint(checkpoint: str | Path, out: str | Path, data: DataConfig, preset: str | None = None,
                     dtype: str = "float32", scan: int = 50_000) -> dict[str, Any]:
    """Write ``checkpoint`` pruned to the vocabulary of ``data``'s first ``scan`` captions to
    ``out`` (``model.safetensors`` + ``config.json``); returns a summary."""
    from ..models.inherit import prune_vocabulary
    from ..models.openclip import load_checkpoint
    from ..tokenizer import Tokenizer
    from .data import open_train_data
    from .trainer import _export, data_vocabulary, resolve_model_config

    model = load_checkpoint(checkpoint, preset=resolve_model_config(preset) if preset else None)
    cfg = model.config
    train_data = open_train_data(data, cfg)
    ids = data_vocabulary(train_data, Tokenizer(context_length=cfg.context_length), cfg, data.max_text_len, scan=scan)
    if cfg.vocab_subset:
        missing = sorted(set(ids.tolist()) - set(cfg.vocab_subset))
        if missing:
            raise ValueError(f"{checkpoint}: already pruned, and the data uses {len(missing)} token(s) it does not "
                             f"have (first ids: {missing[:5]})")
    pruned = prune_vocabulary(model, ids.tolist())
    final = _export(pruned.eval(), Path(out), dtype)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"out": str(final), "tokens": pruned.config.vocab_rows, "vocab_size": cfg.vocab_size,
            "params_before": count(model), "params_after": count(pruned),
            "ratio": round(count(pruned) / count(model), 4),
            "bytes": (final / "model.safetensors").stat().st_size}
