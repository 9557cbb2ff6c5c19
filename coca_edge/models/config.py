"""Architecture configuration for CoCa models.

Architectures are data: every preset is a JSON file in ``presets/`` that round-trips
through :class:`CoCaConfig`. open_clip's ``coca_ViT-B-32`` / ``coca_ViT-L-14`` are presets
like any other.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "VisionConfig",
    "TextConfig",
    "DecoderConfig",
    "CoCaConfig",
    "list_presets",
    "get_preset",
    "CONFIG_VERSION",
]

CONFIG_VERSION = 1
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A model configuration is invalid or cannot be found."""


def _positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _divisible(owner: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{owner}.width ({width}) must be divisible by {owner}.heads ({heads})")


@dataclass(frozen=True)
class VisionConfig:
    """ViT image tower with an attentional pooler (query 0 -> contrastive latent)."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    # Channels of a small convolutional branch added to the patch embedding (0: none; a
    # multiple of 4). Two 3x3 stride-2 convolutions with GELU (conv_stem / 4, then conv_stem
    # channels), then a patch_size/4 convolution whose output is
    # added to the linear patch embedding; that last convolution starts at zero, so a model
    # with the branch computes exactly what it computes without it until training moves it.
    conv_stem: int = 0

    def __post_init__(self) -> None:
        if (not isinstance(self.conv_stem, int) or isinstance(self.conv_stem, bool) or self.conv_stem < 0
                or self.conv_stem % 4):
            raise ConfigError(f"vision.conv_stem must be 0 (no convolutional stem) or a positive multiple of 4 "
                              f"(channels; the first convolution has a quarter of them), got {self.conv_stem!r}")
        if self.conv_stem and self.patch_size % 4:
            raise ConfigError(f"vision.conv_stem needs vision.patch_size divisible by 4 (two stride-2 "
                              f"convolutions come first), got patch_size {self.patch_size}")
        _positive("vision", image_size=self.image_size, patch_size=self.patch_size, width=self.width,
                  layers=self.layers, head_width=self.head_width,
                  attn_pooler_queries=self.attn_pooler_queries,
                  attn_pooler_heads=self.attn_pooler_heads)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size ({self.image_size}) must be divisible by vision.patch_size ({self.patch_size})")
        if self.width % self.head_width:
            raise ConfigError(
                f"vision.width ({self.width}) must be divisible by vision.head_width ({self.head_width})")
        if self.attn_pooler_queries < 2:
            raise ConfigError("vision.attn_pooler_queries must be >= 2 (query 0 is the contrastive latent, "
                              "the rest feed the decoder's cross-attention)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"vision.mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens handed to the decoder's cross-attention (pooler queries minus the latent)."""
        return self.attn_pooler_queries - 1


@dataclass(frozen=True)
class TextConfig:
    """Causal text tower; a learned CLS embedding is appended (CoCa) and pooled."""

    context_length: int = 76
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # open_clip's CoCa masks keys with a one-position shift (its "legacy" CLS mask);
    # released CoCa weights were trained with it, so it is the default.
    correct_cls_mask: bool = False

    def __post_init__(self) -> None:
        _positive("text", context_length=self.context_length, vocab_size=self.vocab_size,
                  width=self.width, heads=self.heads, layers=self.layers)
        _divisible("text", self.width, self.heads)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class DecoderConfig:
    """Multimodal decoder: per layer a causal self-attention block and a cross-attention block."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _positive("decoder", width=self.width, heads=self.heads, layers=self.layers)
        _divisible("decoder", self.width, self.heads)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class CoCaConfig:
    name: str
    vision: VisionConfig
    text: TextConfig
    decoder: DecoderConfig
    embed_dim: int = 512
    quick_gelu: bool = False
    sot_token_id: int = 49406
    eot_token_id: int = 49407
    pad_token_id: int = 0
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    description: str = ""
    # Vocabulary pruning: the tokenizer ids this model has embedding rows and head columns
    # for (sorted; must hold the start, end and pad ids). Empty = the whole vocabulary.
    # Token ids everywhere outside the model stay the tokenizer's: the model maps them to
    # rows on input (an id outside the subset embeds as the pad token) and returns logits
    # over the whole vocabulary, PRUNED_LOGIT outside the subset (see ``coca.py``).
    vocab_subset: tuple[int, ...] = ()
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _positive("config", embed_dim=self.embed_dim)
        # The decoder consumes the text tower's token states and the pooled image tokens
        # (embed_dim wide) directly, without projections, exactly as open_clip does.
        if self.text.width != self.decoder.width:
            raise ConfigError(
                f"text.width ({self.text.width}) must equal decoder.width ({self.decoder.width}): "
                "the decoder reads the text tower's token states directly")
        if self.embed_dim != self.decoder.width:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) must equal decoder.width ({self.decoder.width}): "
                "the attentional pooler's image tokens feed the decoder's cross-attention")
        if self.embed_dim % self.vision.attn_pooler_heads:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) must be divisible by vision.attn_pooler_heads "
                f"({self.vision.attn_pooler_heads})")
        for key in ("sot_token_id", "eot_token_id", "pad_token_id"):
            value = getattr(self, key)
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{key} ({value}) must lie in [0, text.vocab_size={self.text.vocab_size})")
        subset = tuple(self.vocab_subset)
        if subset:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in subset):
                raise ConfigError("vocab_subset must be a list of integer token ids")
            if any(b <= a for a, b in zip(subset, subset[1:])):
                raise ConfigError("vocab_subset must be sorted and without repeats")
            if subset[0] < 0 or subset[-1] >= self.text.vocab_size:
                raise ConfigError(f"vocab_subset ids must lie in [0, text.vocab_size={self.text.vocab_size})")
            missing = [key for key in ("sot_token_id", "eot_token_id", "pad_token_id")
                       if getattr(self, key) not in set(subset)]
            if missing:
                raise ConfigError(f"vocab_subset must contain the {', '.join(missing)}")
        object.__setattr__(self, "vocab_subset", subset)
        for key in ("image_mean", "image_std"):
            value = tuple(getattr(self, key))
            if len(value) != 3:
                raise ConfigError(f"{key} must have 3 values (RGB), got {value!r}")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"image_std must be > 0, got {self.image_std}")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"unsupported config version {self.version} (this coca-edge reads {CONFIG_VERSION})")

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def vocab_size(self) -> int:
        """Size of the token id space (the tokenizer's), pruned or not."""
        return self.text.vocab_size

    @property
    def vocab_rows(self) -> int:
        """Embedding rows / head columns the model holds: the subset's size, or the vocabulary."""
        return len(self.vocab_subset) or self.text.vocab_size

    def with_vocabulary(self, token_ids) -> "CoCaConfig":
        """This architecture keeping only ``token_ids`` plus the start, end and pad tokens."""
        keep = {int(i) for i in token_ids} | {self.sot_token_id, self.eot_token_id, self.pad_token_id}
        return self.replace(vocab_subset=tuple(sorted(keep)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.vocab_subset:  # unpruned configs (and every hash of them) read as before pruning existed
            del out["vocab_subset"]
        if not self.vision.conv_stem:  # likewise for models without the convolutional stem
            del out["vision"]["conv_stem"]
        else:
            out["vocab_subset"] = list(self.vocab_subset)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "CoCaConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        sections = {"vision": VisionConfig, "text": TextConfig, "decoder": DecoderConfig}
        kwargs: dict[str, Any] = {}
        for key, section_cls in sections.items():
            if key not in data:
                raise ConfigError(f"{source}: missing section '{key}'")
            kwargs[key] = _build(section_cls, data.pop(key), f"{source}.{key}")
        top = _build(cls, data, source, partial=kwargs)
        return top

    @classmethod
    def from_json(cls, path: str | Path) -> "CoCaConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> "CoCaConfig":
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: Any, source: str, partial: dict[str, Any] | None = None) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = dict(data)
    kwargs.update(partial or {})
    for key in ("image_mean", "image_std", "vocab_subset"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _preset_dir():
    return resources.files("coca_edge.models") / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def get_preset(name: str) -> CoCaConfig:
    """Load a preset by name (``coca_ViT-B-32``, ``test-tiny``, ...)."""
    path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return CoCaConfig.from_dict(json.loads(path.read_text()), source=f"preset {name}")
