"""Build TensorRT engines from a bundle's ONNX graphs, on the device that will run them.

NOT YET RUN ON HARDWARE: written against the public TensorRT 10.x Python API (Builder,
OnnxParser, IOptimizationProfile, IBuilderConfig, ITimingCache); ``tensorrt`` is imported
only inside :func:`build_engines`, so this module imports on any machine.

Decisions (docs/deployment.md says the same for users):

- One engine per graph, one optimization profile per engine, derived from the manifest's
  symbolic axes (:func:`derive_profiles`): ``batch`` 1..max (the decoder's batch is images x
  beams), ``text_len`` 1..context (opt: context, the tokenizer pads to it), ``seq``
  1..context (opt 1: a decode step), ``past`` 0..context-1.
- The decoder's first step is past length 0 in the same profile (min 0), not a second
  prefill profile: TensorRT supports empty tensors, the runtime's first step is exactly
  that (start token, empty caches), and a second profile would double the decoder's
  activation memory and make the runner switch profiles inside the decode loop. Prefills of
  several tokens are covered too (``seq`` up to the context length).
- INT8 only from explicit Q/DQ (a ``tensorrt``-preset bundle); there is no implicit
  calibrator. Nodes the quantizer's fallback kept in higher precision are pinned to FP32
  with per-layer precision constraints (``OBEY_PRECISION_CONSTRAINTS``).
- Engines go to a folder beside the bundle with ``engines.json`` (see
  ``coca_edge.runtime.trt``): the bundle stays unchanged and shareable across devices.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from coca_edge import __version__
from coca_edge.runtime.bundle import Bundle, sha256_file
from coca_edge.runtime.trt import (ENGINES_FILE, ENGINES_FORMAT, ENGINES_FORMAT_VERSION, DeviceInfo, EngineError,
                                   Profile, ProfileConfig, derive_profiles, device_info, import_tensorrt)

__all__ = ["ProfileConfig", "BuildConfig", "derive_profiles", "excluded_nodes", "trtexec_commands", "build_engines",
           "PRECISIONS", "default_engines_dir"]

PRECISIONS = ("fp32", "fp16", "int8", "best")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class BuildConfig:
    """What ``build_engines`` builds: precision, builder workspace, profiles, timing cache file."""

    precision: str = "fp16"
    workspace_mib: int = 2048
    profiles: ProfileConfig = ProfileConfig()
    timing_cache: str | None = None  # default: <out>/../timing.cache, shared by every build on the device

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_mib < 64:
            raise ValueError(f"workspace_mib must be >= 64, got {self.workspace_mib}")


def excluded_nodes(graph_entry: Mapping[str, Any]) -> list[str]:
    """ONNX node names a quantized bundle's manifest lists as kept in higher precision (fallback)."""
    quant = graph_entry.get("quantization") or {}
    names = quant.get("excluded_nodes", graph_entry.get("excluded_nodes", []))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"manifest excluded_nodes must be a list of node names, got {names!r}")
    return names


def _has_qdq(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in _QDQ for n in model.graph.node)


def default_engines_dir(bundle: str | os.PathLike, precision: str) -> Path:
    bundle = Path(bundle)
    return bundle.parent / f"{bundle.name}.trt-{precision}"


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_commands(bundle: Bundle, out: str | os.PathLike, config: BuildConfig = BuildConfig(),
                     profiles: Mapping[str, list[Profile]] | None = None) -> dict[str, str]:
    """The ``trtexec`` command line equivalent to each engine build (for users who prefer it)."""
    profiles = profiles or derive_profiles(bundle, config.profiles)
    out = Path(out)
    cache = config.timing_cache or str(out.parent / "timing.cache")
    commands = {}
    for name, graph in bundle.manifest["graphs"].items():
        profile = profiles[name][0]
        args = ["trtexec", f"--onnx={bundle.graph_path(name)}", f"--saveEngine={out / (name + '.plan')}"]
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{n}:{_dims(s[k])}" for n, s in profile.items()))
        args += [f"--memPoolSize=workspace:{config.workspace_mib}M", f"--timingCacheFile={cache}"]
        args += {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"], "best": ["--fp16", "--int8"]}[config.precision]
        keep = excluded_nodes(graph)
        if keep and config.precision != "fp32":
            args += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in keep)]
        commands[name] = " ".join(shlex.quote(a) for a in args)
    return commands


def _pin_fp32(trt, network, nodes: Sequence[str]) -> list[str]:
    """Pin the TensorRT layers built from ``nodes`` to FP32. The ONNX parser names a layer after its
    node (with a suffix when one node becomes several layers), so match the name or a prefix."""
    pinned = []
    wanted = set(nodes)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        base = next((n for n in wanted if layer.name == n or layer.name.startswith(n + "_")), None)
        if base is None:
            continue
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            if layer.get_output_type(k) in (trt.float16, trt.float32):
                layer.set_output_type(k, trt.float32)
        pinned.append(layer.name)
    return pinned


def _parser_error(error) -> str:
    """``IParserError`` as "node (op): description"; falls back to str() across TensorRT versions."""
    try:
        return f"node {error.node_name()} ({error.node_operator()}): {error.desc()}"
    except AttributeError:
        return str(error)


def _build_one(trt, logger, onnx_path: Path, profile: Profile, config: BuildConfig, keep_fp32: Sequence[str],
               cache_bytes: bytes) -> tuple[bytes, bytes, list[str]]:
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: the TensorRT ONNX parser rejected this graph: {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile):
        raise EngineError(f"{onnx_path}: network inputs {sorted(names)} differ from the manifest's {sorted(profile)}")
    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.precision in ("fp16", "best"):
        build.set_flag(trt.BuilderFlag.FP16)
    if config.precision in ("int8", "best"):
        build.set_flag(trt.BuilderFlag.INT8)  # with Q/DQ in the graph this is explicit quantization
    pinned = _pin_fp32(trt, network, keep_fp32) if keep_fp32 and config.precision != "fp32" else []
    if pinned:
        build.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    build.add_optimization_profile(opt)
    cache = build.create_timing_cache(cache_bytes)
    build.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, build)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    return bytes(plan), bytes(build.get_timing_cache().serialize()), pinned


def build_engines(bundle: str | os.PathLike | Bundle, config: BuildConfig = BuildConfig(),
                  out: str | os.PathLike | None = None, graphs: Sequence[str] | None = None,
                  overwrite: bool = False, progress: bool = True, device: DeviceInfo | None = None) -> Path:
    """Build one engine per graph into ``out`` (default ``<bundle>.trt-<precision>``) with ``engines.json``.

    The folder appears only when every engine is built; the timing cache is updated after each
    engine so an interrupted build still speeds up the next one.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    out = Path(out) if out else default_engines_dir(bundle.root, config.precision)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    names = list(graphs or bundle.manifest["graphs"])
    unknown = [g for g in names if g not in bundle.manifest["graphs"]]
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; the bundle has {sorted(bundle.manifest['graphs'])}")
    if config.precision == "int8":
        plain = [g for g in names if not _has_qdq(bundle.graph_path(g))]
        if len(plain) == len(names):
            raise ValueError(f"{bundle.root}: --precision int8 needs explicit Q/DQ (a bundle quantized with the "
                             "`tensorrt` preset); this bundle has none. There is no implicit INT8 calibration: "
                             "quantize first, or build with --precision fp16")
    trt = import_tensorrt()
    device = device or device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    profiles = derive_profiles(bundle, config.profiles)
    cache_path = Path(config.timing_cache) if config.timing_cache else out.parent / "timing.cache"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        entries = {}
        iterator = names
        if progress:
            from tqdm import tqdm

            iterator = tqdm(names, desc="build-engine", unit="engine")
        for name in iterator:
            graph = bundle.manifest["graphs"][name]
            keep = excluded_nodes(graph)
            started = time.perf_counter()
            cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
            plan, cache, pinned = _build_one(trt, logger, bundle.graph_path(name), profiles[name][0], config, keep,
                                             cache_bytes)
            _write_atomic(cache_path, cache)
            plan_file = staging / f"{name}.plan"
            plan_file.write_bytes(plan)
            entries[name] = {
                "file": plan_file.name, "sha256": sha256_file(plan_file), "bytes": plan_file.stat().st_size,
                "onnx_file": graph["file"], "bundle_precision": graph.get("precision"),
                "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles[name]],
                "fp32_nodes": keep, "fp32_layers": pinned,
                "build_seconds": round(time.perf_counter() - started, 2),
            }
        manifest = {
            "format": ENGINES_FORMAT, "format_version": ENGINES_FORMAT_VERSION, "coca_edge_version": __version__,
            "bundle": str(bundle.root.resolve()), "bundle_manifest_sha256": sha256_file(bundle.root / "manifest.json"),
            "tensorrt_version": trt.__version__, "compute_capability": device.compute_capability,
            "device_name": device.name, "precision": config.precision, "workspace_mib": config.workspace_mib,
            "profile_config": {"max_batch": config.profiles.max_batch, "opt_batch": config.profiles.opt_batch,
                               "num_beams": config.profiles.num_beams},
            "graphs": entries,
            "trtexec": trtexec_commands(bundle, out, config, profiles),
        }
        (staging / ENGINES_FILE).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
