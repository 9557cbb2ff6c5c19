"""build_engines / engines.json / TrtRunner / build-engine CLI, without TensorRT.

TensorRT cannot be installed here (FACTS.md). A fake ``tensorrt`` module records what
coca-edge asks of it (profiles, flags, per-layer precisions, timing cache); the fake network is
made from the real ONNX graph (one layer per node, named like the ONNX parser names them), so
these tests check OUR logic against the public API's shape, not TensorRT itself.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest

from coca_edge.exporters.tensorrt import BuildConfig, build_engines, trtexec_commands
from coca_edge.runtime.bundle import Bundle
from coca_edge.runtime.trt import (DeviceInfo, EngineError, ProfileConfig, TensorRTUnavailableError, TrtRunner,
                                   derive_profiles, verify_engines)

DEVICE = DeviceInfo("Fake Orin", "8.7")


class _Layer:
    def __init__(self, name):
        self.name, self.precision, self.num_outputs, self.types = name, None, 1, {0: "float16"}

    def get_output_type(self, k):
        return self.types[k]

    def set_output_type(self, k, t):
        self.types[k] = t


class _Network:
    def __init__(self):
        self.layers, self.inputs = [], []

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return types.SimpleNamespace(name=self.inputs[i])


def fake_tensorrt(log: dict) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.float32, trt.float16 = "float32", "float16"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY")

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            model = onnx.load(path, load_external_data=False)
            init = {i.name for i in model.graph.initializer}
            self.network.inputs = [i.name for i in model.graph.input if i.name not in init]
            for node in model.graph.node:  # the parser names layers after nodes, suffixing extras
                self.network.layers += [_Layer(node.name), _Layer(node.name + "_1")]
            self.network.layers.append(_Layer("unrelated"))
            log.setdefault("parsed", []).append(path)
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.pool = set(), [], None, None

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return _Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            config.cache.data += b"+"  # every build adds timings to the cache
            pinned = [layer.name for layer in network.layers if layer.precision == "float32"]
            log.setdefault("builds", []).append({"flags": sorted(config.flags), "profiles": config.profiles,
                                                 "pool": config.pool, "pinned": pinned,
                                                 "inputs": list(network.inputs)})
            return json.dumps({"inputs": network.inputs}).encode()

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt


@pytest.fixture()
def trt_log(monkeypatch):
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    return log


def test_build_engines_records_profiles_flags_and_versions(tiny_bundle, tmp_path, trt_log):
    bundle = Bundle.load(tiny_bundle[0])
    config = BuildConfig("fp16", workspace_mib=256, profiles=ProfileConfig(max_batch=2, num_beams=2),
                         timing_cache=str(tmp_path / "timing.cache"))
    out = build_engines(bundle, config, tmp_path / "engines", progress=False, device=DEVICE)
    manifest = json.loads((out / "engines.json").read_text())
    assert (manifest["tensorrt_version"], manifest["compute_capability"]) == ("10.3.0", "8.7")
    assert manifest["graphs"].keys() == bundle.manifest["graphs"].keys()
    expected = derive_profiles(bundle, config.profiles)
    for build, name in zip(trt_log["builds"], bundle.manifest["graphs"]):
        assert build["profiles"] == expected[name]  # exactly the derived profile, one per engine
        assert build["flags"] == ["FP16"] and build["pinned"] == []
        assert build["pool"] == ("workspace", 256 << 20)
        assert (out / manifest["graphs"][name]["file"]).is_file()
    # the timing cache persists across builds and runs: 4 engines, then 4 more
    assert (tmp_path / "timing.cache").read_bytes() == b"++++"
    build_engines(bundle, config, tmp_path / "engines", overwrite=True, progress=False, device=DEVICE)
    assert (tmp_path / "timing.cache").read_bytes() == b"++++++++"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engines")]  # no staging left behind


def test_int8_build_pins_excluded_nodes_to_fp32(tiny_int8_trt_bundle, tmp_path, trt_log):
    bundle = Bundle.load(tiny_int8_trt_bundle)
    (head,) = bundle.manifest["graphs"]["decoder"]["quantization"]["excluded_nodes"]
    out = build_engines(bundle, BuildConfig("int8"), tmp_path / "e", graphs=["decoder"], progress=False,
                        device=DEVICE)
    (build,) = trt_log["builds"]
    assert build["flags"] == ["INT8", "OBEY"]
    assert build["pinned"] == [head, head + "_1"]  # the node's layers, not the unrelated one
    entry = json.loads((out / "engines.json").read_text())["graphs"]["decoder"]
    assert entry["fp32_nodes"] == [head]
    command = trtexec_commands(bundle, out, BuildConfig("int8"))["decoder"]
    assert f"--layerPrecisions={head}:fp32" in command and "--precisionConstraints=obey" in command


def test_int8_needs_explicit_qdq(tiny_bundle, tmp_path):
    # raised before TensorRT is imported: no implicit calibrator exists to fall back to
    with pytest.raises(ValueError, match="tensorrt` preset"):
        build_engines(tiny_bundle[0], BuildConfig("int8"), tmp_path / "e", progress=False, device=DEVICE)


def test_build_config_validates():
    with pytest.raises(ValueError, match="precision"):
        BuildConfig("int4")
    with pytest.raises(ValueError, match="workspace"):
        BuildConfig(workspace_mib=1)


def test_trtexec_commands_match_the_profiles(tiny_bundle, tmp_path):
    bundle = Bundle.load(tiny_bundle[0])
    ctx = bundle.config["model"]["text"]["context_length"]
    commands = trtexec_commands(bundle, tmp_path / "e", BuildConfig("best", profiles=ProfileConfig(max_batch=2)))
    decoder = commands["decoder"]
    assert "--minShapes=input_ids:1x1,past_text_k_0:1x2x0x32" in decoder
    assert f"--maxShapes=input_ids:6x{ctx},past_text_k_0:6x2x{ctx - 1}x32" in decoder
    assert "--fp16 --int8" in decoder and "--timingCacheFile=" in decoder
    assert "--layerPrecisions" not in decoder


# -- engines.json verification -----------------------------------------------------------
def test_mismatched_engines_fail_with_rebuild_message(tiny_bundle, tmp_path, trt_log):
    bundle = Bundle.load(tiny_bundle[0])
    out = build_engines(bundle, BuildConfig("fp16"), tmp_path / "e", progress=False, device=DEVICE)
    assert verify_engines(out, bundle, "10.3.0", "8.7")["precision"] == "fp16"
    for version, cc, what in (("10.4.0", "8.7", "TensorRT 10.3.0"), ("10.3.0", "8.9", "compute capability 8.7")):
        with pytest.raises(EngineError, match="rebuild") as err:
            verify_engines(out, bundle, version, cc)
        assert what in str(err.value) and "coca-edge build-engine" in str(err.value)
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle[0], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source_model"] = {"name": "another"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="different bundle"):
        verify_engines(out, Bundle.load(other), "10.3.0", "8.7")
    plan = out / "decoder.plan"
    plan.write_bytes(plan.read_bytes() + b"x")
    with pytest.raises(EngineError, match="sha256 mismatch for decoder.plan"):
        verify_engines(out, bundle, "10.3.0", "8.7")
    with pytest.raises(EngineError, match="no engines.json"):
        verify_engines(tmp_path, bundle, "10.3.0", "8.7")


# -- TrtRunner over a fake engine and fake device memory ---------------------------------
class _FakeCuda(types.ModuleType):
    """Device memory as host bytearrays behind integer pointers (cuda.bindings.runtime's call shapes)."""

    def __init__(self):
        super().__init__("cudart")
        self.memory, self.next = {}, 1 << 20
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaMalloc(self, size):
        ptr, self.next = self.next, self.next + size
        self.memory[ptr] = bytearray(size)
        return 0, ptr

    def cudaFree(self, ptr):
        self.memory.pop(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        import ctypes

        if kind == 1:
            self.memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(self.memory[src][:count]), count)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


def _fake_engine_trt(cuda, runs):
    """An engine computing y = 2 * x for x, y of shape [batch, 3], profile batch 1..4."""
    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32

    class Context:
        def __init__(self):
            self.shapes, self.addr = {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return 1 <= shape[0] <= 4

        def get_tensor_shape(self, name):
            return self.shapes["x"]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            n = int(np.prod(self.shapes["x"]))
            x = np.frombuffer(bytes(cuda.memory[self.addr["x"]][:4 * n]), np.float32)
            cuda.memory[self.addr["y"]][:4 * n] = (2 * x).astype(np.float32).tobytes()
            runs.append(self.shapes["x"])
            return True

    class Engine:
        num_io_tensors = 2
        get_tensor_name = staticmethod(lambda i: ["x", "y"][i])
        get_tensor_mode = staticmethod(lambda name: "in" if name == "x" else "out")
        get_tensor_dtype = staticmethod(lambda name: "float32")
        get_tensor_profile_shape = staticmethod(lambda name, profile: [(1, 3), (1, 3), (4, 3)])
        create_execution_context = staticmethod(Context)

    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: Engine())
    return trt


def test_trt_runner_moves_data_and_chunks_large_batches(tmp_path, monkeypatch):
    cuda, runs = _FakeCuda(), []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_engine_trt(cuda, runs))
    monkeypatch.setattr("coca_edge.runtime.trt._cudart", lambda: cuda)
    (tmp_path / "g.plan").write_bytes(b"plan")
    io = ([{"name": "x", "dtype": "float32", "shape": ["batch", 3]}],
          [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}])
    runner = TrtRunner(tmp_path / "g.plan", *io, name="g")
    assert runner.max_batch == 4
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.testing.assert_array_equal(runner.run({"x": x})["y"], 2 * x)  # exact: the fake doubles floats
    assert runs == [(4, 3), (4, 3), (2, 3)]  # batch 10 in chunks of the profile maximum
    with pytest.raises(ValueError, match="missing input"):
        runner.run({})
    runner.close()
    assert cuda.memory == {}


def test_trt_runner_rejects_engine_io_that_differs_from_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_engine_trt(_FakeCuda(), []))
    monkeypatch.setattr("coca_edge.runtime.trt._cudart", lambda: _FakeCuda())
    (tmp_path / "g.plan").write_bytes(b"plan")
    with pytest.raises(EngineError, match="does not match the bundle manifest"):
        TrtRunner(tmp_path / "g.plan", [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3]}],
                  [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}])


# -- without TensorRT --------------------------------------------------------------------
def test_modules_import_without_tensorrt_and_runtime_stays_torch_free():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorrt', 'cuda'):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import coca_edge.runtime.trt, coca_edge.runtime.iobinding
assert 'torch' not in sys.modules, 'runtime imported torch'
import coca_edge.exporters.tensorrt, coca_edge.exporters.trt_checks, coca_edge.exporters.trt_cli
try:
    coca_edge.runtime.trt.import_tensorrt()
except coca_edge.runtime.trt.TensorRTUnavailableError as err:
    assert 'pip install' in str(err)
else:
    raise SystemExit('tensorrt imported')
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_engine_cli_without_tensorrt(tiny_bundle, tmp_path, capsys, monkeypatch):
    from coca_edge.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(SystemExit) as help_exit:
        main(["build-engine", "--help"])
    assert help_exit.value.code == 0 and "not yet been run on hardware" in capsys.readouterr().out
    assert main(["build-engine", str(tiny_bundle[0]), "--out", str(tmp_path / "e"), "--max-batch", "2"]) == 2
    captured = capsys.readouterr()
    assert "TensorRT is not installed" in captured.err and "pip install" in captured.err
    assert "structural checks passed" in captured.out
    assert not (tmp_path / "e").exists()
    assert main(["build-engine", str(tiny_bundle[0]), "--print-trtexec", "--skip-checks", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["trtexec"]) == set(Bundle.load(tiny_bundle[0]).manifest["graphs"])
    assert main(["build-engine", str(tmp_path / "missing")]) == 2
    assert main(["build-engine", str(tiny_bundle[0]), "--max-batch", "0"]) == 2


def test_build_engine_cli_fails_on_a_graph_tensorrt_cannot_parse(tiny_bundle, tmp_path, capsys):
    from coca_edge.cli import main
    from coca_edge.runtime.bundle import write_manifest

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle[0], broken)
    model = onnx.load(str(broken / "cross_kv.onnx"))
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            node.domain = "com.microsoft"  # an ORT-fused op TensorRT has no parser for
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(broken / "cross_kv.onnx"))
    graphs = json.loads((broken / "manifest.json").read_text())["graphs"]
    (broken / "manifest.json").unlink()
    write_manifest(broken, graphs, {"name": "broken"}, "test", extra={"fused_cross_kv": False})
    assert main(["build-engine", str(broken), "--print-trtexec"]) == 1
    assert "cross_kv: [ops]" in capsys.readouterr().out


def test_load_engines_without_tensorrt_says_what_to_install(tiny_bundle, monkeypatch):
    from coca_edge.runtime.edge import EdgeCoCa

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        EdgeCoCa.load(tiny_bundle[0], engines="anywhere")
