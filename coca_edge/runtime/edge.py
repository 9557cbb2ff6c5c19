"""``EdgeCoCa``: classify, retrieve and caption with a bundle through ONNX Runtime (no torch)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..data.preprocess import ImageLoadError, PreprocessConfig, load_image, preprocess
from ..tokenizer import Tokenizer
from .bundle import Bundle, BundleError, _version_tuple, required_onnxruntime
from .generation import DecoderLayout, GenerationConfig, GenerationOutput, generate
from .runners import MEMORY_PRESETS, MemoryConfig, OrtRunner, Runner, onnxruntime_version

__all__ = ["EdgeCoCa", "Classification", "InputError", "UnknownTokenWarning", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class InputError(ValueError):
    """Images or texts handed to EdgeCoCa are not usable (names the item and what was expected)."""


class UnknownTokenWarning(UserWarning):
    """Text for a vocabulary-pruned model holds tokens outside its vocabulary."""


@dataclass
class Classification:
    label: str
    index: int
    probs: np.ndarray  # [num_labels], softmax over labels
    labels: Sequence[str]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(self.labels[i], float(self.probs[i])) for i in order]


class LazyRunners(Mapping[str, Runner]):
    """The bundle's graphs, each session opened the first time it is asked for.

    Captioning needs the image encoder and the decoder, classification the two encoders: a
    process that only captions never pays for opening the text encoder, nor holds its copy of the
    text tower. ``EdgeCoCa.load(..., lazy_sessions=False)`` opens every graph up front.
    """

    def __init__(self, factories: Mapping[str, Callable[[], Runner]]):
        self._factories = dict(factories)
        self._open: dict[str, Runner] = {}

    def __getitem__(self, name: str) -> Runner:
        runner = self._open.get(name)
        if runner is None:
            if name not in self._factories:
                raise KeyError(name)
            runner = self._open[name] = self._factories[name]()
        return runner

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)

    def opened(self) -> list[str]:
        """Names of the graphs whose sessions are open."""
        return list(self._open)

    def open_all(self) -> "LazyRunners":
        for name in self._factories:
            self[name]
        return self


class EdgeCoCa:
    """A CoCa bundle loaded into ONNX Runtime sessions."""

    def __init__(self, bundle: Bundle, runners: Mapping[str, Runner], tokenizer: Tokenizer):
        self.bundle = bundle
        self.runners = runners
        self.tokenizer = tokenizer
        model = bundle.config["model"]
        self.model_config = model
        self.preprocess_config = PreprocessConfig.from_dict(bundle.config["preprocess"])
        self.logit_scale = float(bundle.config["logit_scale"])
        # the decoder's cache layout (per-layer or stacked) from its input names: the manifest's,
        # or the runner's where there is none (a PyTorch model under validation)
        graph = bundle.manifest.get("graphs", {}).get("decoder", {})
        decoder_inputs = ([t["name"] for t in graph["inputs"]] if "inputs" in graph
                          else list(runners["decoder"].input_names))
        self.layout = DecoderLayout.from_model_config(model).for_inputs(decoder_inputs)
        self.image_size = int(model["vision"]["image_size"])
        self.io_generator = None  # use_io_binding(): decode with the caches kept on the device

    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | Mapping[str, Sequence] | None = None,
             threads: int | None = None, verify_hashes: bool = True, memory: str | MemoryConfig = "default",
             engines: str | os.PathLike | None = None, io_binding: bool = False,
             optimized_cache: bool | str | os.PathLike = True, lazy_sessions: bool = True) -> "EdgeCoCa":
        """Verify a bundle directory and prepare one session per graph.

        ``providers`` defaults to TensorRT, CUDA, CPU - those this onnxruntime build has; a mapping
        gives each graph its own list (``runtime.trt.tensorrt_providers``: ORT's TensorRT EP).
        ``engines``: a folder from ``coca-edge build-engine``; the graphs then run as TensorRT
        engines (``TrtRunner``, not yet run on hardware) instead of ORT sessions.
        ``io_binding``: decode with the K/V caches kept on the device (``use_io_binding``).
        ``memory``: ``"default"`` (fastest), ``"low"`` (each weight once in memory, for small
        devices; see docs/edge.md for what it costs) or a ``MemoryConfig``.
        ``optimized_cache``: keep ORT's optimised graphs per machine and open sessions from them
        next time (``runtime.optimized``; True: ``$XDG_CACHE_HOME/coca-edge/optimized-graphs``, a
        folder, or False). Costs one more copy of the weights on disk, saves most of the session
        opening time.
        ``lazy_sessions``: open each graph's session the first time a task needs it (captioning
        never opens the text encoder); False opens them all now, so a graph ORT cannot load fails
        here rather than at its first use. The bundle's hashes and ORT version are checked now
        either way.
        """
        if isinstance(memory, str):
            if memory not in MEMORY_PRESETS:
                raise ValueError(f"memory must be one of {sorted(MEMORY_PRESETS)} or a MemoryConfig, got {memory!r}")
            memory = MEMORY_PRESETS[memory]
        bundle = Bundle.load(path, verify_hashes=verify_hashes)
        if engines is not None:
            from .trt import load_trt_runners

            return cls(bundle, dict(load_trt_runners(bundle, engines, verify_hashes)), Tokenizer.load(bundle.root))
        requirements = _check_onnxruntime(bundle)
        fp16 = any(bundle.precision(g) == "fp16" for g in bundle.manifest["graphs"])
        # ORT >= 1.23 crashes creating CPU sessions for FP16 graphs at ORT_ENABLE_ALL (FACTS.md).
        level = "extended" if fp16 else "all"
        shared = {}
        if memory.share_weights:
            from .weights import share_initializers

            shared = share_initializers({name: bundle.graph_path(name) for name in bundle.manifest["graphs"]})
        cache_dir = None
        if optimized_cache:
            from .optimized import default_cache_dir

            cache_dir = default_cache_dir() if optimized_cache is True else Path(optimized_cache)
        def factory(name: str) -> Callable[[], Runner]:
            return lambda: OrtRunner(bundle.graph_path(name), threads=threads, optimization=level,
                                     providers=providers.get(name) if isinstance(providers, Mapping) else providers,
                                     expected_io=bundle.graph_io(name), name=name, memory=memory,
                                     initializers=shared.get(name, ()), requirement=requirements.get(name),
                                     optimized_cache=cache_dir, identity=bundle.graph_digest(name))

        runners = LazyRunners({name: factory(name) for name in bundle.manifest["graphs"]})
        if not lazy_sessions:
            runners.open_all()
        edge = cls(bundle, runners, Tokenizer.load(bundle.root))
        if edge.layout.stacked_cache:
            warnings.warn(f"{bundle.root}: its decoder takes the stacked K/V cache (past_text / past_decoder) of "
                          "bundles exported before 2026-12-04. It runs unchanged; re-exporting the checkpoint "
                          "(coca-edge export, then coca-edge quantize again for a quantized bundle) gives the per-layer "
                          "cache, a 1.09-1.13x faster batch-8 decode step on CPU (docs/export.md).", stacklevel=2)
        return edge.use_io_binding() if io_binding else edge

    # -- inputs --------------------------------------------------------------------------
    def _pixels(self, images: Any) -> np.ndarray:
        """Paths, PIL images, uint8 HWC arrays, or preprocessed float32 ``[B, 3, S, S]`` -> float32 batch."""
        s = self.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype != np.float32:
                raise InputError(f"a 4-D image array must be preprocessed float32 [B, 3, {s}, {s}], "
                                 f"got dtype {images.dtype}")
            if images.shape[1:] != (3, s, s):
                raise InputError(f"preprocessed images must have shape [B, 3, {s}, {s}], got {list(images.shape)}")
            if images.shape[0] == 0:
                raise InputError("empty batch: no images given")
            return np.ascontiguousarray(images)
        items = [images] if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "convert") \
            else list(images)
        if not items:
            raise InputError("empty batch: no images given")
        out = np.empty((len(items), 3, s, s), dtype=np.float32)
        for i, item in enumerate(items):
            out[i] = self._one_image(item, i)
        return out

    def _one_image(self, item: Any, index: int) -> np.ndarray:
        s = self.image_size
        if isinstance(item, (str, os.PathLike)):
            try:
                item = load_image(item)
            except ImageLoadError as err:
                raise InputError(f"image {index}: {err}") from None
        elif isinstance(item, np.ndarray):
            if item.ndim == 3 and item.shape == (3, s, s) and item.dtype == np.float32:
                return item
            if item.dtype != np.uint8:
                raise InputError(f"image {index}: arrays must be uint8 [H, W, 3] (raw) or float32 [3, {s}, {s}] "
                                 f"(preprocessed), got dtype {item.dtype} shape {list(item.shape)}")
            if item.ndim != 3 or item.shape[2] != 3:
                raise InputError(f"image {index}: uint8 arrays must be [H, W, 3] RGB, got shape {list(item.shape)} "
                                 "(convert grayscale/RGBA to RGB first)")
        elif not hasattr(item, "convert"):
            raise InputError(f"image {index}: expected a path, PIL image or numpy array, got {type(item).__name__}")
        return preprocess(item, self.preprocess_config)

    def _ids(self, texts: str | Sequence[str], truncate: bool) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("empty batch: no texts given")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i}: expected str, got {type(text).__name__}")
        ctx = self.layout.context_length
        if not truncate:
            for i, text in enumerate(texts):
                n = len(self.tokenizer.encode(text)) + 2
                if n > ctx:
                    raise InputError(f"text {i} has {n} tokens (with start/end), the model's context length is "
                                     f"{ctx}; shorten it or pass truncate=True")
        ids = self.tokenizer(texts, context_length=ctx)
        subset = self.model_config.get("vocab_subset")
        if subset:
            unknown = ~np.isin(ids, subset)
            if unknown.any():
                rows = sorted({int(r) for r in np.nonzero(unknown.any(axis=1))[0]})
                words = self.tokenizer.decode([int(i) for i in np.unique(ids[unknown])][:5])
                warnings.warn(f"{len(rows)} text(s) (first: {rows[0]}, {texts[rows[0]]!r}) use tokens this "
                              f"vocabulary-pruned model does not have ({words!r}...); they embed as padding",
                              UnknownTokenWarning, stacklevel=3)
        return ids

    # -- embeddings ----------------------------------------------------------------------
    def _image_outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self.runners["image_encoder"].run({"pixel_values": pixels})

    def encode_image(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings ``[B, E]``."""
        pixels = self._pixels(images)
        return np.concatenate([self._image_outputs(pixels[i:i + batch_size])["image_embed"]
                               for i in range(0, len(pixels), batch_size)])

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 64, truncate: bool = False) -> np.ndarray:
        """L2-normalised text embeddings ``[B, E]``."""
        ids = self._ids(texts, truncate)
        runner = self.runners["text_encoder"]
        return np.concatenate([runner.run({"input_ids": ids[i:i + batch_size]})["text_embed"]
                               for i in range(0, len(ids), batch_size)])

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """Zero-shot classifier weights: per label the normalised mean of its prompt embeddings."""
        if not labels:
            raise InputError("no labels given")
        for t in templates:
            if "{}" not in t:
                raise InputError(f"template {t!r} has no '{{}}' placeholder for the label")
        prompts = [t.format(label) for label in labels for t in templates]
        emb = self.encode_text(prompts, truncate=True).reshape(len(labels), len(templates), -1).mean(axis=1)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

    def classify(self, images: Any, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 batch_size: int = 32) -> list[Classification]:
        weights = self.class_embeddings(labels, templates)
        logits = self.logit_scale * self.encode_image(images, batch_size) @ weights.T
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return [Classification(labels[int(p.argmax())], int(p.argmax()), p, list(labels)) for p in probs]

    def retrieve(self, images: Any, texts: Sequence[str], k: int = 5) -> dict[str, np.ndarray]:
        """Cosine similarities and top-k indices both ways: ``image_to_text`` ``[I, k]``, ``text_to_image`` ``[T, k]``."""
        sim = self.encode_image(images) @ self.encode_text(texts, truncate=True).T
        kt, ki = min(k, sim.shape[1]), min(k, sim.shape[0])
        return {"similarity": sim,
                "image_to_text": np.argsort(-sim, axis=1, kind="stable")[:, :kt],
                "text_to_image": np.argsort(-sim.T, axis=1, kind="stable")[:, :ki]}

    # -- captioning ----------------------------------------------------------------------
    def cross_kv(self, pixels: np.ndarray) -> np.ndarray:
        out = self._image_outputs(pixels)
        if self.bundle.fused_cross_kv:
            return out["cross_kv"]
        return self.runners["cross_kv"].run({"image_tokens": out["image_tokens"]})["cross_kv"]

    def use_io_binding(self, device: str | None = None) -> "EdgeCoCa":
        """Decode with ONNX Runtime IO binding: K/V caches and cross K/V stay on the session's device
        between steps (``coca_edge.runtime.iobinding``); same tokens as the numpy loop."""
        from .iobinding import IoBindingGenerator

        decoder = self.runners["decoder"]
        if not isinstance(decoder, OrtRunner):
            raise ValueError(f"IO binding needs an ONNX Runtime decoder, this bundle runs {type(decoder).__name__}")
        self.io_generator = IoBindingGenerator(decoder, device)
        return self

    def caption_ids(self, images: Any, batch_size: int = 8, **generation: Any) -> GenerationOutput:
        config = GenerationConfig(**generation)
        pixels = self._pixels(images)
        result = GenerationOutput([], [])
        for i in range(0, len(pixels), batch_size):
            cross = self.cross_kv(pixels[i:i + batch_size])
            out = (self.io_generator.generate(cross, self.layout, config) if self.io_generator is not None
                   else generate(self.runners["decoder"], cross, self.layout, config))
            result.sequences += out.sequences
            result.scores += out.scores
        return result

    def caption(self, images: Any, strategy: str = "greedy", max_new_tokens: int = 20, batch_size: int = 8,
                **generation: Any) -> list[str]:
        """Captions, one per image. Strategies: greedy, beam (num_beams), top_k, top_p (temperature, seed)."""
        out = self.caption_ids(images, batch_size=batch_size, strategy=strategy, max_new_tokens=max_new_tokens,
                               **generation)
        return [self.tokenizer.decode(seq) for seq in out.sequences]


def _check_onnxruntime(bundle: Bundle) -> dict[str, str]:
    """Refuse, before any session exists, a bundle that needs a newer ORT than the installed one.

    Returns per graph what it needs ("onnxruntime >= X"), for the error ORT's own failure gets.
    """
    installed = onnxruntime_version()
    validated = (bundle.manifest.get("validated_with") or {}).get("onnxruntime")
    requirements = {}
    for name, graph in bundle.manifest["graphs"].items():
        needed, why = required_onnxruntime(graph)
        if needed is None and why:
            requirements[name] = f"onnxruntime {validated} or newer (this bundle was validated with it)" if validated \
                else "a newer onnxruntime"
            continue
        if needed is None:
            continue
        requirements[name] = f"onnxruntime >= {needed}"
        if _version_tuple(installed) < _version_tuple(needed):
            checked = f"; the bundle was validated with onnxruntime {validated}" if validated else ""
            raise BundleError(f"{bundle.root}: graph {name} needs onnxruntime >= {needed} ({', '.join(why)}); this is "
                              f"onnxruntime {installed}{checked}: pip install -U \"onnxruntime>={needed}\" (or "
                              "onnxruntime-gpu)")
    return requirements

