"""open_clip CoCa interop: checkpoint reading, state-dict mapping both ways, config translation.

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)`` only:
coca-edge never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .coca import CoCa
from .config import CoCaConfig, ConfigError, DecoderConfig, TextConfig, VisionConfig, get_preset

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "from_open_clip",
    "to_open_clip",
    "config_from_open_clip",
    "config_to_open_clip",
    "load_checkpoint",
    "save_open_clip",
    "check_finite",
]

StateDict = dict[str, torch.Tensor]

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
NATIVE_MARKER = "visual.patch_embed.weight"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the expected architecture."""


# -- reading ------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any] | None]:
    """Read tensors (and an open_clip config if the path is a hub snapshot directory).

    Accepts ``.safetensors``, ``.bin``/``.pt``/``.pth`` (plain state dicts or open_clip
    training checkpoints with ``state_dict`` and ``module.`` prefixes) and directories
    holding ``open_clip_config.json`` plus ``open_clip_model.safetensors`` or
    ``open_clip_pytorch_model.bin``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    config = None
    if path.is_dir():
        weights = next((path / name for name in HUB_WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"{path} is a directory without open_clip weights: expected one of {', '.join(HUB_WEIGHTS)}")
        cfg_path = path / HUB_CONFIG
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({err})") from None
        path = weights
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_torch(path)
    return _unwrap(state, path), config


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a plain state dict: it pickles Python objects that coca-edge refuses to "
            f"unpickle ({first_line}). Save the weights with torch.save(model.state_dict(), ...) or "
            "as .safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: expected a state dict of tensors; non-tensor entries: {', '.join(map(str, bad[:5]))}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# -- state-dict mapping -------------------------------------------------------------------

def _block_pairs(ours: str, theirs: str) -> Iterator[tuple[str, str]]:
    for a, b in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.qkv.weight", "attn.in_proj_weight"),
                 ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.out", "attn.out_proj"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        if a.endswith(("weight", "bias")):
            yield f"{ours}.{a}", f"{theirs}.{b}"
        else:
            for p in ("weight", "bias"):
                yield f"{ours}.{a}.{p}", f"{theirs}.{b}.{p}"


def _renames(config: CoCaConfig) -> list[tuple[str, str]]:
    """One-to-one (coca-edge name, open_clip name) pairs."""
    pairs = [
        ("visual.patch_embed.weight", "visual.conv1.weight"),
        ("visual.cls_token", "visual.class_embedding"),
        ("visual.pos_embed", "visual.positional_embedding"),
        ("visual.proj", "visual.proj"),
        ("visual.pool.query", "visual.attn_pool.query"),
        ("visual.pool.out.weight", "visual.attn_pool.attn.out_proj.weight"),
        ("visual.pool.out.bias", "visual.attn_pool.attn.out_proj.bias"),
        ("text.token_embedding.weight", "text.token_embedding.weight"),
        ("text.cls_emb", "text.cls_emb"),
        ("text.pos_embed", "text.positional_embedding"),
        ("text.proj", "text.text_projection"),
        ("decoder.head", "text_decoder.text_projection"),
        ("logit_scale", "logit_scale"),
    ]
    for ours, theirs in (("visual.ln_pre", "visual.ln_pre"), ("visual.ln_post", "visual.ln_post"),
                         ("visual.pool.ln_q", "visual.attn_pool.ln_q"), ("visual.pool.ln_k", "visual.attn_pool.ln_k"),
                         ("text.ln_final", "text.ln_final"), ("decoder.ln_final", "text_decoder.ln_final")):
        pairs += [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]
    for i in range(config.vision.layers):
        pairs += _block_pairs(f"visual.blocks.{i}", f"visual.transformer.resblocks.{i}")
    for i in range(config.text.layers):
        pairs += _block_pairs(f"text.blocks.{i}", f"text.transformer.resblocks.{i}")
    for i in range(config.decoder.layers):
        pairs += _block_pairs(f"decoder.blocks.{i}", f"text_decoder.resblocks.{i}")
        for part in ("ln_1", "ln_1_kv", "ln_2"):
            for p in ("weight", "bias"):
                pairs.append((f"decoder.cross.{i}.{part}.{p}", f"text_decoder.cross_attn.{i}.{part}.{p}"))
        for a, b in (("out", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                pairs.append((f"decoder.cross.{i}.{a}.{p}", f"text_decoder.cross_attn.{i}.{b}.{p}"))
    return pairs


def _pooler_packed(config: CoCaConfig) -> bool:
    # nn.MultiheadAttention packs q/k/v into in_proj_weight only when kdim == embed_dim.
    return config.vision.width == config.embed_dim


def to_open_clip(state: Mapping[str, torch.Tensor], config: CoCaConfig) -> StateDict:
    """coca-edge state dict -> open_clip CoCa state dict (same tensors, open_clip names)."""
    out = {theirs: state[ours] for ours, theirs in _renames(config)}
    pq, pk, pv = (state[f"visual.pool.{n}.weight"] for n in "qkv")
    if _pooler_packed(config):
        out["visual.attn_pool.attn.in_proj_weight"] = torch.cat([pq, pk, pv])
    else:
        out["visual.attn_pool.attn.q_proj_weight"] = pq
        out["visual.attn_pool.attn.k_proj_weight"] = pk
        out["visual.attn_pool.attn.v_proj_weight"] = pv
    out["visual.attn_pool.attn.in_proj_bias"] = torch.cat([state[f"visual.pool.{n}.bias"] for n in "qkv"])
    for i in range(config.decoder.layers):
        ours, theirs = f"decoder.cross.{i}", f"text_decoder.cross_attn.{i}.attn"
        out[f"{theirs}.in_proj_weight"] = torch.cat([state[f"{ours}.q.weight"], state[f"{ours}.kv.weight"]])
        out[f"{theirs}.in_proj_bias"] = torch.cat([state[f"{ours}.q.bias"], state[f"{ours}.kv.bias"]])
    return out


def from_open_clip(state: Mapping[str, torch.Tensor], config: CoCaConfig) -> StateDict:
    """open_clip CoCa state dict -> coca-edge state dict. Call :func:`check_keys` first."""
    out = {ours: state[theirs] for ours, theirs in _renames(config)}
    e = config.embed_dim
    if _pooler_packed(config):
        pq, pk, pv = state["visual.attn_pool.attn.in_proj_weight"].split(e)
    else:
        pq, pk, pv = (state[f"visual.attn_pool.attn.{n}_proj_weight"] for n in "qkv")
    out["visual.pool.q.weight"], out["visual.pool.k.weight"], out["visual.pool.v.weight"] = pq, pk, pv
    bq, bk, bv = state["visual.attn_pool.attn.in_proj_bias"].split(e)
    out["visual.pool.q.bias"], out["visual.pool.k.bias"], out["visual.pool.v.bias"] = bq, bk, bv
    w = config.decoder.width
    for i in range(config.decoder.layers):
        ours, theirs = f"decoder.cross.{i}", f"text_decoder.cross_attn.{i}.attn"
        weight, bias = state[f"{theirs}.in_proj_weight"], state[f"{theirs}.in_proj_bias"]
        out[f"{ours}.q.weight"], out[f"{ours}.kv.weight"] = weight[:w], weight[w:]
        out[f"{ours}.q.bias"], out[f"{ours}.kv.bias"] = bias[:w], bias[w:]
    return out


def _expected_shapes(config: CoCaConfig, open_clip_names: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        state = CoCa(config).state_dict()
    if open_clip_names:
        state = to_open_clip(state, config)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_keys(state: Mapping[str, torch.Tensor], config: CoCaConfig, *, open_clip_names: bool,
               source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    expected = _expected_shapes(config, open_clip_names)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [f"{k} (checkpoint {list(state[k].shape)}, expected {list(expected[k])})"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or shaped):
        return

    def few(items: list[str]) -> str:
        more = f", ... ({len(items) - 5} more)" if len(items) > 5 else ""
        return ", ".join(items[:5]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    if shaped:
        parts.append(f"{len(shaped)} mis-shaped key(s): {few(shaped)}")
    layout = "open_clip" if open_clip_names else "coca-edge"
    raise CheckpointError(
        f"{source} does not match preset '{config.name}' ({layout} layout): " + "; ".join(parts))


def check_finite(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{source}: NaN/Inf values in {', '.join(bad[:5])}{more}")


# -- config translation ------------------------------------------------------------------

_IGNORED = {"output_tokens", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "patch_dropout",
            "final_ln_after_pool", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
            "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
            "timm_drop_path", "custom_text", "attn_pooler_heads_decoder", "act_kwargs", "norm_kwargs"}
# Options that coca-edge does not implement; allowed only at these (open_clip default) values.
_REQUIRED_DEFAULTS = {
    "vision_cfg": {"ls_init_value": None, "no_ln_pre": False, "pos_embed_type": "learnable",
                   "pool_type": "tok", "timm_model_name": None, "block_type": None, "qk_norm": False,
                   "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                   "scale_attn": False, "scale_fc": False, "attentional_pool": True},
    "text_cfg": {"ls_init_value": None, "embed_cls": True, "no_causal_mask": False, "proj_bias": False,
                 "proj_type": "linear", "hf_model_name": None, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                 "scale_attn": False, "scale_fc": False},
    "multimodal_cfg": {"ls_init_value": None},
}
_TOP_REQUIRED = {"init_logit_bias": None, "nonscalar_logit_scale": False}


def config_from_open_clip(data: Mapping[str, Any], name: str = "open_clip") -> CoCaConfig:
    """Translate an open_clip model config (or a hub ``open_clip_config.json``) to :class:`CoCaConfig`."""
    preprocess = dict(data.get("preprocess_cfg") or {})
    model = dict(data.get("model_cfg", data))
    for key in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg"):
        if key not in model:
            raise ConfigError(f"open_clip config '{name}': missing '{key}' (is this a CoCa model config?)")
    v, t, m = dict(model["vision_cfg"]), dict(model["text_cfg"]), dict(model["multimodal_cfg"])
    for section, values in (("vision_cfg", v), ("text_cfg", t), ("multimodal_cfg", m)):
        for key, default in _REQUIRED_DEFAULTS[section].items():
            if key in values and values[key] != default:
                raise ConfigError(f"open_clip config '{name}': {section}.{key}={values[key]!r} is not supported "
                                  f"by coca-edge (only {default!r})")
    for key, default in _TOP_REQUIRED.items():
        if model.get(key, default) != default:
            raise ConfigError(f"open_clip config '{name}': {key}={model[key]!r} is not supported by coca-edge")
    if isinstance(v.get("layers"), (list, tuple)):
        raise ConfigError(f"open_clip config '{name}': ResNet image towers are not supported (ViT only)")
    if not v.get("attentional_pool", False):
        raise ConfigError(f"open_clip config '{name}': vision_cfg.attentional_pool must be true for CoCa")
    text_vocab = t.get("vocab_size", 49408)
    vision = VisionConfig(
        image_size=_single_size(v.get("image_size", 224), name), patch_size=v.get("patch_size", 16),
        width=v.get("width", 768), layers=v.get("layers", 12), head_width=v.get("head_width", 64),
        mlp_ratio=float(v.get("mlp_ratio", 4.0)), attn_pooler_queries=v.get("attn_pooler_queries", 256),
        attn_pooler_heads=v.get("attn_pooler_heads", 8))
    text = TextConfig(
        context_length=t.get("context_length", 77), vocab_size=text_vocab, width=t.get("width", 512),
        heads=t.get("heads", 8), layers=t.get("layers", 12), mlp_ratio=float(t.get("mlp_ratio", 4.0)))
    decoder = DecoderConfig(width=m.get("width", 512), heads=m.get("heads", 8), layers=m.get("layers", 12),
                            mlp_ratio=float(m.get("mlp_ratio", 4.0)))
    kwargs: dict[str, Any] = {}
    if "mean" in preprocess:
        kwargs["image_mean"] = tuple(_triple(preprocess["mean"]))
    if "std" in preprocess:
        kwargs["image_std"] = tuple(_triple(preprocess["std"]))
    return CoCaConfig(name=name, vision=vision, text=text, decoder=decoder, embed_dim=model["embed_dim"],
                      quick_gelu=bool(model.get("quick_gelu", False)), pad_token_id=t.get("pad_id", 0),
                      description=f"translated from open_clip config '{name}'", **kwargs)


def _single_size(size: Any, name: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"open_clip config '{name}': non-square image_size {size} is not supported")
        size = size[0]
    return int(size)


def _triple(value: Any) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(x) for x in value]


def config_to_open_clip(config: CoCaConfig) -> dict[str, Any]:
    """The ``open_clip_config.json`` content of a hub snapshot for this architecture."""
    if config.vocab_subset:
        raise CheckpointError(f"{config.name}: a vocabulary-pruned model ({len(config.vocab_subset)} tokens) has no "
                              "open_clip form (open_clip models hold the whole vocabulary); save it in coca-edge's "
                              "format (model.safetensors + config.json) instead")
    if config.vision.conv_stem:
        raise CheckpointError(f"{config.name}: a model with a convolutional stem (vision.conv_stem) has no open_clip "
                              "form; save it in coca-edge's format (model.safetensors + config.json) instead")
    vc, tc, dc = config.vision, config.text, config.decoder
    return {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "quick_gelu": config.quick_gelu,
            "vision_cfg": {"image_size": vc.image_size, "layers": vc.layers, "width": vc.width,
                           "head_width": vc.head_width, "mlp_ratio": vc.mlp_ratio, "patch_size": vc.patch_size,
                           "attentional_pool": True, "attn_pooler_queries": vc.attn_pooler_queries,
                           "attn_pooler_heads": vc.attn_pooler_heads, "output_tokens": True},
            "text_cfg": {"context_length": tc.context_length, "vocab_size": tc.vocab_size, "width": tc.width,
                         "heads": tc.heads, "layers": tc.layers, "mlp_ratio": tc.mlp_ratio, "embed_cls": True,
                         "pad_id": config.pad_token_id, "output_tokens": True},
            "multimodal_cfg": {"context_length": tc.context_length, "vocab_size": tc.vocab_size,
                               "width": dc.width, "heads": dc.heads, "layers": dc.layers,
                               "mlp_ratio": dc.mlp_ratio},
            "custom_text": True,
        },
        "preprocess_cfg": {"mean": list(config.image_mean), "std": list(config.image_std),
                           "size": vc.image_size, "interpolation": "bicubic", "resize_mode": "shortest"},
    }


# -- loading and saving ------------------------------------------------------------------

def _resolve_config(preset: str | CoCaConfig | None, hub_config: dict | None, path: Path) -> CoCaConfig:
    if isinstance(preset, CoCaConfig):
        return preset
    if preset is not None:
        return get_preset(preset)
    if hub_config is not None:
        return config_from_open_clip(hub_config, name=path.name)
    raise CheckpointError(
        f"{path}: no architecture given and none found next to the weights; pass a preset "
        f"(e.g. preset='coca_ViT-B-32' / --preset coca_ViT-B-32) or use a directory with {HUB_CONFIG}")


def load_checkpoint(path: str | os.PathLike, preset: str | CoCaConfig | None = None,
                    map_location: str | torch.device = "cpu") -> CoCa:
    """Load an open_clip CoCa checkpoint (or a coca-edge one) into a coca-edge :class:`CoCa`."""
    path = Path(path)
    state, hub_config = read_state_dict(path)
    native_cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if preset is None and hub_config is None and NATIVE_MARKER in state and native_cfg.is_file():
        preset = CoCaConfig.from_json(native_cfg)
    config = _resolve_config(preset, hub_config, path)
    native = NATIVE_MARKER in state
    check_keys(state, config, open_clip_names=not native, source=str(path))
    check_finite(state, source=str(path))
    if not native:
        state = from_open_clip(state, config)
    model = CoCa(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(map_location).eval()


def save_open_clip(model: CoCa, path: str | os.PathLike) -> Path:
    """Write ``model`` in open_clip's format.

    ``path`` ending in ``.safetensors`` / ``.bin`` / ``.pt`` writes one file; any other path is
    a hub snapshot directory (``open_clip_config.json`` + ``open_clip_model.safetensors``).
    """
    path = Path(path)
    config_to_open_clip(model.config)  # refuses a vocabulary-pruned model before anything is written
    state = {k: v.detach().cpu().contiguous() for k, v in to_open_clip(model.state_dict(), model.config).items()}
    if path.suffix in (".bin", ".pt", ".pth"):
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda tmp: torch.save(state, tmp))
        return path
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda tmp: save_file(state, str(tmp)))
        return path
    path.mkdir(parents=True, exist_ok=True)
    _atomic(path / HUB_WEIGHTS[0], lambda tmp: save_file(state, str(tmp)))
    _atomic(path / HUB_CONFIG, lambda tmp: tmp.write_text(json.dumps(config_to_open_clip(model.config), indent=2)))
    return path


def _atomic(target: Path, write: Callable[[Path], None]) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
