"""TensorRT engines at run time: the engine manifest and a ``Runner`` over one engine (torch-free).

NOT YET RUN ON HARDWARE: written against the public TensorRT 10.x Python API and cuda-python;
``scripts/gpu-check.sh`` is the check a user runs on a device.

Engines are built on the device that runs them (``coca-edge build-engine``) into a folder
beside the bundle, with ``engines.json``: the bundle manifest's sha256, the TensorRT version
and GPU compute capability the engines were built with, and per graph the plan file, its
sha256 and its optimization profiles. The bundle itself stays unchanged (it is hashed and
shared across devices); an engine is valid only for one TensorRT version on one GPU
architecture, so :func:`verify_engines` refuses any mismatch and says to rebuild.

Device memory, copies and streams go through cuda-python (``cuda.bindings.runtime``), the
NVIDIA-maintained binding TensorRT's own samples use; both are imported only when an
engine is opened (the ``gpu`` extra).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .bundle import Bundle, BundleError, sha256_file

__all__ = ["EngineError", "TensorRTUnavailableError", "ENGINES_FILE", "ENGINES_FORMAT", "ENGINES_FORMAT_VERSION",
           "DeviceInfo", "device_info", "read_engines", "verify_engines", "TrtRunner", "load_trt_runners",
           "INSTALL_HINT", "import_tensorrt", "ProfileConfig", "derive_profiles", "tensorrt_providers"]

ENGINES_FILE = "engines.json"
ENGINES_FORMAT = "coca-edge-engines"
ENGINES_FORMAT_VERSION = 1
INSTALL_HINT = ("TensorRT is not installed. On a Jetson it ships with JetPack (`sudo apt install "
                "python3-libnvinfer`); on an x86 GPU machine: `pip install 'coca-edge[gpu]'` (pulls `tensorrt` "
                "from NVIDIA's index: add `--extra-index-url https://pypi.nvidia.com` if pip cannot find it) "
                "and `pip install cuda-python`. See docs/deployment.md.")


class EngineError(BundleError):
    """Engines are missing, corrupted, or were built for another bundle, TensorRT version or GPU."""


class TensorRTUnavailableError(ImportError):
    """``tensorrt`` or ``cuda-python`` cannot be imported; the message says what to install."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailableError(f"{INSTALL_HINT} ({err})") from None
    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python < 12.6 layout
            from cuda import cudart
        except ImportError as err:
            raise TensorRTUnavailableError(f"cuda-python is not installed: `pip install cuda-python` ({err})") from None
    return cudart


def _check(result):
    """cuda-python calls return ``(err, *values)``; raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        cudart = _cudart()
        name = cudart.cudaGetErrorString(err)[1]
        raise EngineError(f"CUDA error {int(err)}: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.7" (Orin), "8.9" (Ada), ...


def device_info(device: int = 0) -> DeviceInfo:
    props = _check(_cudart().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name, f"{props.major}.{props.minor}")


# -- optimization profiles (also used for ORT's TensorRT execution provider) --------------
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class ProfileConfig:
    """Shape ranges the engines accept. The decoder's batch maximum is ``max_batch * num_beams``."""

    max_batch: int = 8
    opt_batch: int = 1
    num_beams: int = 3

    def __post_init__(self) -> None:
        if self.max_batch < 1 or not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= opt_batch <= max_batch, got opt_batch={self.opt_batch}, "
                             f"max_batch={self.max_batch}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")


def derive_profiles(bundle: Bundle, config: ProfileConfig = ProfileConfig()) -> dict[str, list[Profile]]:
    """Per graph, one profile ``{input: (min, opt, max)}`` from the manifest's symbolic axes."""
    ctx = int(bundle.config["model"]["text"]["context_length"])
    out = {}
    for name, graph in bundle.manifest["graphs"].items():
        batch_max = config.max_batch * (config.num_beams if name == "decoder" else 1)
        ranges = {"batch": (1, min(config.opt_batch, batch_max), batch_max), "text_len": (1, ctx, ctx),
                  "seq": (1, 1, ctx), "past": (0, ctx // 2, ctx - 1)}
        profile: Profile = {}
        for spec in graph["inputs"]:
            lo, opt, hi = [], [], []
            for dim in spec["shape"]:
                if isinstance(dim, int):
                    triple = (dim, dim, dim)
                elif dim in ranges:
                    triple = ranges[dim]
                else:
                    raise ValueError(f"{bundle.root}/manifest.json: graph {name} input {spec['name']} has symbolic "
                                     f"axis {dim!r}; build-engine knows {sorted(ranges)}")
                lo.append(triple[0])
                opt.append(triple[1])
                hi.append(triple[2])
            profile[spec["name"]] = (tuple(lo), tuple(opt), tuple(hi))
        out[name] = [profile]
    return out


def tensorrt_providers(bundle: Bundle, cache_dir: str | os.PathLike, fp16: bool = True, int8: bool = False,
                       profiles: ProfileConfig = ProfileConfig(), workspace_mib: int = 2048,
                       device_id: int = 0) -> dict[str, list]:
    """ONNX Runtime providers per graph for the TensorRT execution provider (the alternative to
    ``build-engine``): ``EdgeCoCa.load(path, providers=tensorrt_providers(bundle, "trt-cache"))``.

    Each graph gets the same explicit profile ``build-engine`` would use. Without it the EP
    builds an engine for the shapes it has seen and rebuilds whenever a shape leaves that
    range - every decode step, as the past grows. Engines and the timing cache are cached in
    ``cache_dir``. ``int8`` needs a Q/DQ (``tensorrt`` preset) bundle. NOT YET RUN ON HARDWARE.
    """
    cache = str(Path(cache_dir))
    out = {}
    for name, (profile,) in derive_profiles(bundle, profiles).items():
        shapes = [",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in profile.items()) for k in range(3)]
        options = {"device_id": device_id, "trt_max_workspace_size": workspace_mib << 20,
                   "trt_fp16_enable": fp16, "trt_int8_enable": int8,
                   "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                   "trt_profile_min_shapes": shapes[0], "trt_profile_opt_shapes": shapes[1],
                   "trt_profile_max_shapes": shapes[2]}
        out[name] = [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    return out


# -- engine manifest ---------------------------------------------------------------------
def read_engines(engines_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(engines_dir) / ENGINES_FILE
    if not path.is_file():
        raise EngineError(f"{engines_dir}: no {ENGINES_FILE}; build engines with `coca-edge build-engine BUNDLE "
                          f"--out {engines_dir}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineError(f"{path}: not valid JSON ({err})") from None
    if data.get("format") != ENGINES_FORMAT or data.get("format_version") != ENGINES_FORMAT_VERSION:
        raise EngineError(f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}; this "
                          f"coca-edge reads {ENGINES_FORMAT!r} version {ENGINES_FORMAT_VERSION}: rebuild the engines")
    return data


def verify_engines(engines_dir: str | os.PathLike, bundle: Bundle, tensorrt_version: str,
                   compute_capability: str, verify_hashes: bool = True) -> dict[str, Any]:
    """Check that the engines in ``engines_dir`` belong to ``bundle`` and to this TensorRT and GPU.

    Raises :class:`EngineError` naming what differs and the command that rebuilds them.
    """
    engines_dir = Path(engines_dir)
    data = read_engines(engines_dir)
    rebuild = (f"rebuild them on this device: `coca-edge build-engine {bundle.root} --out {engines_dir} "
               f"--precision {data.get('precision', 'fp16')} --overwrite`")
    bundle_sha = sha256_file(bundle.root / "manifest.json")
    if data.get("bundle_manifest_sha256") != bundle_sha:
        raise EngineError(f"{engines_dir}: engines were built from a different bundle (manifest sha256 "
                          f"{str(data.get('bundle_manifest_sha256'))[:12]}..., {bundle.root} has {bundle_sha[:12]}...); "
                          f"{rebuild}")
    built_trt, built_cc = data.get("tensorrt_version"), data.get("compute_capability")
    if built_trt != tensorrt_version or built_cc != compute_capability:
        raise EngineError(f"{engines_dir}: engines were built with TensorRT {built_trt} for GPU compute capability "
                          f"{built_cc} ({data.get('device_name', 'unknown GPU')}); this machine has TensorRT "
                          f"{tensorrt_version} and compute capability {compute_capability}. TensorRT engines only "
                          f"run on the TensorRT version and GPU architecture that built them: {rebuild}")
    graphs = data.get("graphs", {})
    missing = [g for g in bundle.manifest["graphs"] if g not in graphs]
    if missing:
        raise EngineError(f"{engines_dir}: no engine for graph(s) {missing}; {rebuild}")
    for name, entry in graphs.items():
        path = engines_dir / entry["file"]
        if not path.is_file():
            raise EngineError(f"{engines_dir}: missing engine file {entry['file']} ({name}); {rebuild}")
        if verify_hashes and sha256_file(path) != entry.get("sha256"):
            raise EngineError(f"{engines_dir}: sha256 mismatch for {entry['file']} (corrupted or replaced); {rebuild}")
    return data


# -- runner ------------------------------------------------------------------------------
def _batch_axes(specs: list[dict]) -> dict[str, int | None]:
    return {t["name"]: (list(t["shape"]).index("batch") if "batch" in t["shape"] else None) for t in specs}


class TrtRunner:
    """One TensorRT engine behind the ``Runner`` contract: ``run(feed) -> dict[str, np.ndarray]``.

    Inputs are copied to the device, the engine runs on its own CUDA stream, outputs come back
    to the host. Device buffers grow to the largest shape seen and are reused. A feed whose
    batch exceeds the engine profile's maximum is run in chunks along the manifest's ``batch``
    axis, so callers need not know the profile. NOT YET RUN ON HARDWARE.
    """

    def __init__(self, engine_path: str | os.PathLike, inputs: list[dict], outputs: list[dict],
                 name: str | None = None):
        trt = import_tensorrt()
        self._cudart = _cudart()
        self.path = Path(engine_path)
        self.name = name or self.path.stem
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.path}: TensorRT could not deserialize this engine (built by another TensorRT "
                              "version or for another GPU?); rebuild it with `coca-edge build-engine`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [t["name"] for t in inputs]
        self.output_names = [t["name"] for t in outputs]
        engine_inputs = sorted(n for n in names if is_input[n])
        engine_outputs = sorted(n for n in names if not is_input[n])
        if engine_inputs != sorted(self.input_names) or engine_outputs != sorted(self.output_names):
            raise EngineError(f"{self.path}: engine IO {engine_inputs} -> {engine_outputs} does not match the bundle "
                              f"manifest {self.input_names} -> {self.output_names}; rebuild the engine")
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._batch_axes = {**_batch_axes(inputs), **_batch_axes(outputs)}
        first = next((n for n in self.input_names if self._batch_axes[n] is not None), None)
        self.max_batch = (self.engine.get_tensor_profile_shape(first, 0)[2][self._batch_axes[first]]
                          if first else None)
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[Any, int]] = {}  # name -> (device pointer, capacity in bytes)

    def _buffer(self, name: str, nbytes: int):
        ptr, capacity = self._buffers.get(name, (None, 0))
        if nbytes > capacity:
            if ptr is not None:
                _check(self._cudart.cudaFree(ptr))
            # empty tensors (past length 0) still get a valid address
            capacity = max(nbytes, 256)
            ptr = _check(self._cudart.cudaMalloc(capacity))
            self._buffers[name] = (ptr, capacity)
        return ptr

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"graph {self.name}: missing input(s) {missing}")
        first = next((n for n in self.input_names if self._batch_axes[n] is not None), None)
        batch = feed[first].shape[self._batch_axes[first]] if first else 0
        if self.max_batch is None or batch <= self.max_batch:
            return self._run_once(feed)
        parts = [self._run_once({n: self._slice(n, feed[n], s, s + self.max_batch) for n in self.input_names})
                 for s in range(0, batch, self.max_batch)]
        return {n: np.concatenate([p[n] for p in parts], axis=self._batch_axes[n] or 0) for n in self.output_names}

    def _slice(self, name: str, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        axis = self._batch_axes[name]
        if axis is None:
            return array
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, stop)
        return array[tuple(index)]

    def _run_once(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, stream = self._cudart, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = []  # keep host arrays alive until the stream is synchronised
        for name in self.input_names:
            array = np.ascontiguousarray(feed[name], dtype=self._dtypes[name])
            hosts.append(array)
            if not self.context.set_input_shape(name, array.shape):
                raise EngineError(f"graph {self.name}: input {name} shape {list(array.shape)} is outside the engine's "
                                  "optimization profile; rebuild with a larger profile (build-engine --max-batch)")
            ptr = self._buffer(name, array.nbytes)
            if array.nbytes:
                _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, stream))
            self.context.set_tensor_address(name, int(ptr))
        results = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self._dtypes[name])
            self.context.set_tensor_address(name, int(self._buffer(name, results[name].nbytes)))
        if not self.context.execute_async_v3(int(stream)):
            raise EngineError(f"graph {self.name}: TensorRT execution failed (see the TensorRT log above)")
        for name, array in results.items():
            if array.nbytes:
                _check(cudart.cudaMemcpyAsync(array.ctypes.data, self._buffers[name][0], array.nbytes, d2h, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        return results

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self.close()


def load_trt_runners(bundle: Bundle, engines_dir: str | os.PathLike,
                     verify_hashes: bool = True) -> Mapping[str, TrtRunner]:
    """One :class:`TrtRunner` per bundle graph, after :func:`verify_engines` accepted the engines."""
    trt = import_tensorrt()
    info = device_info()
    data = verify_engines(engines_dir, bundle, trt.__version__, info.compute_capability, verify_hashes)
    return {name: TrtRunner(Path(engines_dir) / data["graphs"][name]["file"], *bundle.graph_io(name), name=name)
            for name in bundle.manifest["graphs"]}
