"""``coca-edge pipeline RECIPE``: run a recipe's stages into a run directory, resumably.

A recipe (YAML) names a run directory and an ordered mapping of stages. Each stage has a
``type`` (``distill``, ``train``, ``export``, ``quantize``, ``validate``) and the parameters
of that type; a string ``"@name"`` refers to the main output of an earlier stage
(``"@name.key"`` to another of its outputs; in a validate stage ``"@name@fp16"`` runs that
checkpoint in PyTorch FP16, as ``CKPT@fp16`` does on the command line). Everything is checked before any work starts:
unknown keys, unknown stage types, references to stages that do not come earlier, and
input paths that do not exist are errors naming the key, stage or path.

Run directory::

    RUN_DIR/recipe.yaml              the resolved recipe (overrides applied)
    RUN_DIR/<stage>/config.json      the stage's resolved parameters
    RUN_DIR/<stage>/stage.json       status, key (hash of parameters + inputs), outputs, timings
    RUN_DIR/<stage>/out/             the stage's outputs (renamed into place when complete)
    RUN_DIR/<stage>/work/            state kept across attempts (distill checkpoints)

A stage is skipped when its ``stage.json`` says ``done`` with the key the stage has now: the
key hashes the stage's resolved parameters, the output digests of the stages it refers to
and the size/mtime of every external input path. A stage that failed or was killed is run
again; ``distill`` / ``train`` resume from their last checkpoint in ``work/``. Stages are
plain functions of (parameters, output folder, work folder); they know nothing of this
module's bookkeeping.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["PipelineError", "GateFailure", "Recipe", "StageResult", "load_recipe", "run_pipeline", "STAGE_TYPES",
           "register"]

RECIPE_VERSION = 1
_STAGE_JSON = "stage.json"


class PipelineError(ValueError):
    """A recipe is invalid, or the run directory cannot be used (names the key, stage or path)."""


class GateFailure(RuntimeError):
    """Raised by a stage whose checks ran and failed (validation gates, or no quantization mix
    passes its gates); the stage counts as run. ``outputs`` are what it still produced (a
    report), none when there is nothing a later stage could use."""

    def __init__(self, message: str, outputs: dict[str, str] | None = None):
        super().__init__(message)
        self.outputs = outputs or {}


# --------------------------------------------------------------------------- stage parameters


def _path_exists(value: str, where: str) -> None:
    if not value.startswith("@") and not _strip_dtype(value).exists():
        raise PipelineError(f"{where}: path not found: {value}")


def _strip_dtype(value: str) -> Path:
    """A path, less a validator dtype suffix (``CKPT@fp16``) if it ends in one."""
    head, sep, tail = value.rpartition("@")
    return Path(head if sep and tail in _REF_SUFFIXES else value)


@dataclass(frozen=True)
class DistillParams:
    """A ``coca-edge distill`` / ``train`` run: a training recipe plus overrides."""

    recipe: str | None = None
    set: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True
    _paths = ("recipe",)
    _main = "model"

    def __post_init__(self) -> None:
        if self.recipe is None and not self.set:
            raise PipelineError("give a training recipe (recipe: path.yaml) and/or its values (set: {...})")


@dataclass(frozen=True)
class ExportParams:
    """``coca-edge export``: a checkpoint (or ``@stage``) to an FP32 ONNX bundle."""

    model: str
    preset: str | None = None
    opset: int = 20
    fuse_cross_kv: bool = False
    validate: bool = True
    _paths = ("model",)
    _main = "bundle"


@dataclass(frozen=True)
class QuantizeParams:
    """``coca-edge quantize``: a bundle to an FP16 / INT8 / INT4 bundle."""

    bundle: str
    precision: str = "int8"
    preset: str = "cpu"
    method: str | None = None
    calib: str = "synthetic-scenes:train"
    calib_samples: int = 256
    gates: str | None = None
    eval: str | None = None
    eval_samples: int = 200
    max_fallback_nodes: int = 32
    fuse_attention: bool | None = None
    _paths = ("bundle",)
    _main = "bundle"

    def __post_init__(self) -> None:
        if self.fuse_attention is not None and not isinstance(self.fuse_attention, bool):
            raise PipelineError(f"fuse_attention must be true, false or absent (the preset's choice), "
                                f"got {self.fuse_attention!r}")


@dataclass(frozen=True)
class ValidateParams:
    """``coca-edge validate``: candidates against a reference, report + gates."""

    reference: str
    candidates: Sequence[str]
    data: str = "synthetic-scenes:val"
    samples: int = 500
    gates: str | None = None
    localize: int = 0
    latency: bool = True
    labels: Sequence[str] = ()
    different_architecture: bool = False
    device: str = "cpu"  # torch device for checkpoints ("@stage", "@stage@fp16"); bundles run on ORT
    _paths = ("reference", "candidates")
    _main = "report"

    def __post_init__(self) -> None:
        if isinstance(self.candidates, str) or not self.candidates:
            raise PipelineError("candidates must be a non-empty list")
        if not isinstance(self.device, str) or not self.device:
            raise PipelineError(f"device must be a torch device name (cpu, cuda, cuda:N), got {self.device!r}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.labels and len(self.labels) != len(self.candidates):
            raise PipelineError(f"labels: {len(self.labels)} labels for {len(self.candidates)} candidates")


# --------------------------------------------------------------------------- stage functions


def _run_training(mode: str) -> Callable[[Any, Path, Path], dict[str, str]]:
    def run(p: DistillParams, out: Path, work: Path) -> dict[str, str]:
        from .distill.checkpoint import resolve_resume
        from .distill.config import load_config
        from .distill.trainer import distill, train

        overrides = _training_overrides(p)
        overrides.append(f"output_dir={json.dumps(str(work / 'train'))}")
        cfg = load_config(p.recipe, overrides)
        if cfg.teacher.path is not None and cfg.teacher.use_cache and "teacher.cache_dir" not in _flatten(dict(p.set)):
            # One teacher-output cache per run directory, shared by its stages (keyed inside by
            # what it depends on, so sharing is safe).
            cfg = cfg.replace(teacher=dataclasses.replace(cfg.teacher, cache_dir=str(work.parent.parent / "cache")))
        latest = resolve_resume(Path(cfg.output_dir) / "checkpoints", "latest")
        resumed_from = int(latest.name.split("-")[1]) if latest is not None else 0
        result = (distill if mode == "distill" else train)(cfg, resume="latest", progress=p.progress)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(result.final_dir / name, out / name)
        summary = {"step": result.step, "resumed_from_step": resumed_from, "params": result.params,
                   "seconds": round(result.seconds, 1),
                   "eval": {k: v for k, v in result.eval.items() if k != "examples"}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return {"model": "model.safetensors", "summary": "summary.json"}

    return run


def _run_export(p: ExportParams, out: Path, work: Path) -> dict[str, str]:
    from .exporters.bundle import export_bundle
    from .models.openclip import load_checkpoint

    model = load_checkpoint(p.model, preset=p.preset)
    export_bundle(model, out / "bundle", source_model={"path": str(Path(p.model).resolve()),
                                                       "preset": p.preset or model.config.name},
                  opset=p.opset, fuse_cross_kv=p.fuse_cross_kv, validate=p.validate, overwrite=True)
    return {"bundle": "bundle"}


def _run_quantize(p: QuantizeParams, out: Path, work: Path) -> dict[str, str]:
    from .quantize.cli import quantize_from_args

    from .quantize.fallback import FallbackFailed

    try:
        quantize_from_args(bundle=p.bundle, precision=p.precision, preset=p.preset, method=p.method, calib=p.calib,
                           calib_samples=p.calib_samples, gates=p.gates, eval_data=p.eval,
                           eval_samples=p.eval_samples, max_fallback_nodes=p.max_fallback_nodes,
                           fuse_attention=p.fuse_attention, out=str(out / "bundle"),
                           cache_dir=str(work.parent.parent / "cache"))
    except FallbackFailed as err:
        raise GateFailure(f"no quantization mix passes the gates: {err}") from None
    return {"bundle": "bundle"}


def _run_validate(p: ValidateParams, out: Path, work: Path) -> dict[str, str]:
    from .validate import validate
    from .validate.report import format_table, summary_rows

    report = validate(p.reference, list(p.candidates), data=p.data, samples=p.samples, gates=p.gates,
                      localize=p.localize, labels=list(p.labels) or None, latency=p.latency, out=out,
                      different_architecture=p.different_architecture, device=p.device)
    (out / "table.txt").write_text(format_table(summary_rows(report)) + "\n")
    if not report.passed:
        failed = [f"{r.name}: {g.name} measured {'not evaluated' if g.measured is None else f'{g.measured:.4g}'}, "
                  f"allowed {g.op} {g.allowed:g}" for r in report.results for g in r.gate_results if not g.passed]
        raise GateFailure("validation gates failed: " + "; ".join(failed),
                          {"report": "report.json", "html": "report.html", "markdown": "report.md",
                           "table": "table.txt"})
    return {"report": "report.json", "html": "report.html", "markdown": "report.md", "table": "table.txt"}


@dataclass(frozen=True)
class StageType:
    params: type
    run: Callable[[Any, Path, Path], dict[str, str]]
    description: str


STAGE_TYPES: dict[str, StageType] = {
    "distill": StageType(DistillParams, _run_training("distill"), "teacher -> student (coca-edge distill)"),
    "train": StageType(DistillParams, _run_training("train"), "train / fine-tune (coca-edge train)"),
    "export": StageType(ExportParams, _run_export, "checkpoint -> FP32 ONNX bundle (coca-edge export)"),
    "quantize": StageType(QuantizeParams, _run_quantize, "bundle -> FP16 / INT8 / INT4 bundle (coca-edge quantize)"),
    "validate": StageType(ValidateParams, _run_validate, "drift report + gates (coca-edge validate)"),
}


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Stage:
    name: str
    type: str
    params: Any  # the type's frozen params dataclass, references still as "@stage[.key]"

    @property
    def refs(self) -> list[tuple[str, str | None]]:
        return [_parse_ref(v) for v in _strings(dataclasses.asdict(self.params)) if v.startswith("@")]


@dataclass(frozen=True)
class Recipe:
    name: str
    run_dir: str
    stages: tuple[Stage, ...]
    deploy: str | None = None
    summary: str | None = None
    description: str = ""
    source: str = "recipe"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PipelineError(f"{self.source}: unknown stage {name!r}; stages are {', '.join(s.name for s in self.stages)}")


_RECIPE_KEYS = {"name", "run_dir", "stages", "deploy", "summary", "description", "version"}


# What may follow a reference to a checkpoint, as in "@student@fp16": the dtype the validator
# runs it in (coca_edge.validate.models.DTYPE_SUFFIXES; not imported here, that module needs torch).
_REF_SUFFIXES = ("fp32", "fp16", "fp16-pure", "bf16")


def _split_suffix(value: str) -> tuple[str, str | None]:
    """``"@name[.key]@dtype"`` -> (``"@name[.key]"``, dtype)."""
    head, sep, tail = value[1:].rpartition("@")
    return (f"@{head}", tail) if sep else (value, None)


def _parse_ref(value: str) -> tuple[str, str | None]:
    name, _, key = _split_suffix(value)[0][1:].partition(".")
    return name, key or None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), run_dir: str | None = None,
                check_paths: bool = True) -> Recipe:
    """Read and check a recipe; nothing runs. ``check_paths=False`` skips the existence checks
    of input paths (used to check recipes whose inputs live on a user's machine)."""
    import yaml

    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    from .distill.config import TrainConfigError, apply_overrides

    try:
        apply_overrides(data, overrides)
    except TrainConfigError as err:
        raise PipelineError(f"{source}: {err} (e.g. stages.student.set.steps=200)") from None
    if run_dir is not None:
        data["run_dir"] = run_dir
    unknown = sorted(set(data) - _RECIPE_KEYS)
    if unknown:
        raise PipelineError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_RECIPE_KEYS)}")
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise PipelineError(f"{source}: recipe version {data.get('version')!r} is not supported "
                            f"(this coca-edge reads version {RECIPE_VERSION})")
    for key in ("name", "run_dir", "stages"):
        if key not in data:
            raise PipelineError(f"{source}: missing key {key!r}")
    raw_stages = data["stages"]
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise PipelineError(f"{source}: 'stages' must be a non-empty mapping of stage name -> parameters")
    stages: list[Stage] = []
    for name, spec in raw_stages.items():
        where = f"{source}: stages.{name}"
        if not isinstance(spec, dict) or "type" not in spec:
            raise PipelineError(f"{where}: expected a mapping with a 'type' ({', '.join(STAGE_TYPES)})")
        kind = spec["type"]
        if kind not in STAGE_TYPES:
            raise PipelineError(f"{where}: unknown stage type {kind!r}; types are {', '.join(STAGE_TYPES)}")
        params_cls = STAGE_TYPES[kind].params
        allowed = {f.name for f in dataclasses.fields(params_cls)}
        extra = sorted(set(spec) - allowed - {"type"})
        if extra:
            raise PipelineError(f"{where}: unknown key(s) {extra} for a {kind} stage; allowed: {sorted(allowed)}")
        try:
            params = params_cls(**{k: v for k, v in spec.items() if k != "type"})
        except TypeError as err:
            raise PipelineError(f"{where}: {err}") from None
        except ValueError as err:
            raise PipelineError(f"{where}: {err}") from None
        stage = Stage(str(name), kind, params)
        earlier = {s.name for s in stages}
        for ref, _ in stage.refs:
            if ref not in earlier:
                raise PipelineError(f"{where}: '@{ref}' does not name an earlier stage "
                                    f"(earlier: {', '.join(sorted(earlier)) or 'none'})")
        for value in _strings(dataclasses.asdict(params)):
            suffix = _split_suffix(value)[1] if value.startswith("@") else None
            if suffix is not None and (kind != "validate" or suffix not in _REF_SUFFIXES):
                raise PipelineError(f"{where}: '{value}': a reference may end in a dtype only in a validate stage "
                                    f"(one of {', '.join('@' + x for x in _REF_SUFFIXES)}: a checkpoint run by "
                                    "PyTorch in that dtype)")
        if check_paths:
            for key in params_cls._paths:
                for value in _strings(getattr(params, key)):
                    _path_exists(value, f"{where}.{key}")
        if kind in ("distill", "train"):
            _check_training(params, where, check_paths)
        stages.append(stage)
    names = {s.name for s in stages}
    for key in ("deploy", "summary"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.startswith("@")
                                  or _parse_ref(value)[0] not in names):
            raise PipelineError(f"{source}: {key} must be '@<stage>' naming a stage, got {value!r}")
    return Recipe(str(data["name"]), str(data["run_dir"]), tuple(stages), data.get("deploy"), data.get("summary"),
                  str(data.get("description", "")), source, data)


def _training_overrides(p: DistillParams) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in _flatten(dict(p.set)).items()]


def _check_training(p: DistillParams, where: str, check_paths: bool) -> None:
    """The training config a stage will run must load (unknown keys, bad values) and its
    teacher must exist, before any stage runs."""
    from .distill.config import TrainConfigError, load_config

    if p.recipe is not None and not p.recipe.startswith("@") and not Path(p.recipe).is_file():
        if check_paths:
            raise PipelineError(f"{where}.recipe: path not found: {p.recipe}")
        return
    try:
        cfg = load_config(p.recipe, _training_overrides(p))
    except TrainConfigError as err:
        raise PipelineError(f"{where}: {err}") from None
    teacher = cfg.teacher.path
    if check_paths and teacher and not teacher.startswith("@") and not Path(teacher).exists():
        raise PipelineError(f"{where}: teacher.path not found: {teacher}")


# --------------------------------------------------------------------------- running


@dataclass
class StageResult:
    name: str
    type: str
    status: str  # done | skipped | failed | gates_failed
    seconds: float
    outputs: dict[str, str]
    error: str | None = None


def _digest_path(path: Path) -> str:
    """Cheap identity of an external input: size and mtime of every file under it."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _digest_outputs(out: Path) -> str:
    """Content hash of a stage's outputs (a bundle contributes its manifest, which hashes its files)."""
    h = hashlib.sha256()
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(out).as_posix()
        if f.suffix in (".onnx", ".data") and (f.parent / "manifest.json").is_file():
            continue  # covered by the manifest's sha256 per file
        h.update(rel.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_stage(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage_dir / _STAGE_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _resolve(value: Any, outputs: dict[str, dict[str, str]], main: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        name, key = _parse_ref(value)
        key = key or main[name]
        if key not in outputs[name]:
            raise PipelineError(f"'{value}': stage {name} has no output {key!r} (outputs: {sorted(outputs[name])})")
        suffix = _split_suffix(value)[1]
        return outputs[name][key] + (f"@{suffix}" if suffix else "")
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, outputs, main) for v in value)
    if isinstance(value, Mapping):
        return {k: _resolve(v, outputs, main) for k, v in value.items()}
    return value


def _stage_key(stage: Stage, resolved: Any, digests: dict[str, str]) -> tuple[str, dict[str, str]]:
    inputs: dict[str, str] = {}
    for ref, _ in stage.refs:
        inputs[f"@{ref}"] = digests[ref]
    for key in type(stage.params)._paths:
        for raw in _strings(getattr(stage.params, key)):
            if not raw.startswith("@"):
                inputs[raw] = _digest_path(_strip_dtype(raw))
    gates = getattr(stage.params, "gates", None)  # a gates file (not a shipped gate-set name) is an input
    if isinstance(gates, str) and Path(gates).is_file():
        inputs[gates] = _digest_path(Path(gates))
    if stage.type in ("distill", "train"):
        teacher = _train_teacher(resolved)
        if teacher:
            inputs[teacher] = _digest_path(Path(teacher))
    params = json.dumps(dataclasses.asdict(resolved), sort_keys=True, default=str)
    h = hashlib.sha256(json.dumps({"type": stage.type, "params": params, "inputs": inputs}, sort_keys=True).encode())
    return h.hexdigest(), inputs


def _train_teacher(p: DistillParams) -> str | None:
    """The teacher checkpoint a training recipe reads (an input of the stage)."""
    import yaml

    data = yaml.safe_load(Path(p.recipe).read_text()) or {} if p.recipe else {}
    teacher = _flatten(dict(p.set)).get("teacher.path", (data.get("teacher") or {}).get("path"))
    return teacher if teacher and Path(teacher).exists() else None


def run_pipeline(recipe: Recipe, start_from: str | None = None, only: str | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run (or skip) every stage in order; stops at the first failed stage.

    ``start_from``: re-run that stage and all after it even if up to date. ``only``: run just
    that stage (the stages it refers to must be done). Gate failures do not stop the run:
    they are recorded (status ``gates_failed``) and returned.
    """
    names = [s.name for s in recipe.stages]
    for flag, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in names:
            raise PipelineError(f"{flag} {value}: unknown stage; stages are {', '.join(names)}")
    run_dir = Path(recipe.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "recipe.json", recipe.raw)
        import yaml

        tmp = run_dir / ".recipe.yaml.tmp"
        tmp.write_text(yaml.safe_dump(recipe.raw, sort_keys=False))
        os.replace(tmp, run_dir / "recipe.yaml")
    except OSError as err:
        raise PipelineError(f"run directory {run_dir} is not writable: {err.strerror or err}") from None
    outputs: dict[str, dict[str, str]] = {}
    digests: dict[str, str] = {}
    main = {s.name: type(s.params)._main for s in recipe.stages}
    results: list[StageResult] = []
    forced = False
    for index, stage in enumerate(recipe.stages):
        stage_dir = run_dir / stage.name
        forced = forced or stage.name == start_from
        state = _read_stage(stage_dir)
        if only is not None and stage.name != only:
            if state and state.get("status") in ("done", "gates_failed"):
                outputs[stage.name] = {k: str(stage_dir / "out" / v) for k, v in state["outputs"].items()}
                digests[stage.name] = state["outputs_digest"]
            continue
        for ref, _ in stage.refs:
            if ref not in outputs:
                raise PipelineError(f"stage {stage.name} needs stage {ref}, which has not completed "
                                    f"(run without --only, or --only {ref} first)")
        resolved = dataclasses.replace(stage.params, **{
            f.name: _resolve(getattr(stage.params, f.name), outputs, main)
            for f in dataclasses.fields(stage.params)})
        key, inputs = _stage_key(stage, resolved, digests)
        label = f"[{index + 1}/{len(recipe.stages)}] {stage.name} ({stage.type})"
        out = stage_dir / "out"
        if (not forced and state and state.get("key") == key and state.get("status") in ("done", "gates_failed")
                and out.is_dir()):
            echo(f"{label}: up to date, skipped")
            outputs[stage.name] = {k: str(out / v) for k, v in state["outputs"].items()}
            digests[stage.name] = state["outputs_digest"]
            if state["status"] == "gates_failed":
                results.append(StageResult(stage.name, stage.type, "gates_failed", 0.0, outputs[stage.name],
                                           state.get("error")))
                if not state["outputs"]:
                    break
                continue
            results.append(StageResult(stage.name, stage.type, "skipped", 0.0, outputs[stage.name]))
            continue
        echo(f"{label}: running")
        result = _run_stage(stage, resolved, key, inputs, stage_dir)
        results.append(result)
        if result.status == "failed":
            echo(f"{label}: FAILED after {result.seconds:.1f} s: {result.error}")
            break
        outputs[stage.name] = result.outputs
        digests[stage.name] = _read_stage(stage_dir)["outputs_digest"]
        echo(f"{label}: {'gates FAILED' if result.status == 'gates_failed' else 'done'} in {result.seconds:.1f} s")
        if result.status == "gates_failed" and not result.outputs:
            echo(f"{label}: produced nothing later stages could use; stopping here")
            break
    return results


def _run_stage(stage: Stage, resolved: Any, key: str, inputs: dict[str, str], stage_dir: Path) -> StageResult:
    started = time.time()
    work = stage_dir / "work"
    out = stage_dir / "out"
    tmp_out = stage_dir / ".out-partial"
    record: dict[str, Any] = {"name": stage.name, "type": stage.type, "status": "running", "key": key,
                              "inputs": inputs, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        # A changed stage must not resume from state that belongs to other parameters.
        work_key = work / ".key"
        if work.exists() and (not work_key.is_file() or work_key.read_text() != key):
            shutil.rmtree(work)
        work.mkdir(exist_ok=True)
        work_key.write_text(key)
        _write_json(stage_dir / "config.json", {"type": stage.type, **dataclasses.asdict(resolved)})
        _write_json(stage_dir / _STAGE_JSON, record)
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir()
    except OSError as err:
        raise PipelineError(f"cannot write stage {stage.name} into {stage_dir}: {err.strerror or err} "
                            "(disk full or read-only?); finished stages are intact") from None
    status, error, produced = "done", None, {}
    try:
        produced = STAGE_TYPES[stage.type].run(resolved, tmp_out, work)
    except GateFailure as err:
        status, error, produced = "gates_failed", str(err), err.outputs
    except KeyboardInterrupt:
        record.update(status="failed", error="interrupted", seconds=round(time.time() - started, 1))
        _write_json(stage_dir / _STAGE_JSON, record)
        raise
    except Exception as err:  # any stage error ends the run with the stage marked failed
        status, error = "failed", f"{type(err).__name__}: {err}"
    seconds = time.time() - started
    try:
        if status != "failed":
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp_out, out)
            record["outputs_digest"] = _digest_outputs(out)
            record["outputs"] = produced
        record.update(status=status, error=error, seconds=round(seconds, 1),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_json(stage_dir / _STAGE_JSON, record)
    except OSError as err:
        raise PipelineError(f"cannot write stage {stage.name} into {stage_dir}: {err.strerror or err} "
                            "(disk full or read-only?); finished stages are intact") from None
    return StageResult(stage.name, stage.type, status, seconds,
                       {k: str(out / v) for k, v in produced.items()} if status != "failed" else {}, error)


# --------------------------------------------------------------------------- CLI

_EPILOG = """examples:
  coca-edge pipeline recipes/demo.yaml                       # the embedded offline demo
  coca-edge pipeline recipes/demo.yaml stages.student.set.steps=300 --run-dir runs/quick
  coca-edge pipeline recipes/demo.yaml --from int8           # redo int8 and everything after it
  coca-edge pipeline recipes/demo.yaml --only validate       # just that stage (its inputs must be done)
  coca-edge pipeline recipes/demo.yaml --check               # check the recipe, run nothing

exit codes: 0 every stage done and every gate passed; 1 a validation gate failed (the run
completed; see the report); 2 the recipe or an input is wrong, or a stage failed (the run
directory keeps every finished stage; run the same command again to resume)."""


def register(sub: Any) -> None:
    import argparse

    p = sub.add_parser(
        "pipeline", help="run a whole recipe: distill, export, quantize, validate (resumable)",
        description="Run the stages of a YAML recipe into a run directory. Finished stages whose inputs are "
                    "unchanged are skipped, an interrupted stage resumes (distillation from its last "
                    "checkpoint), and the resolved recipe is saved in the run directory.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/; its header comment names the command)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override recipe values, e.g. stages.student.set.steps=200 (value parsed as YAML)")
    p.add_argument("--from", dest="start_from", metavar="STAGE", help="re-run this stage and all after it")
    p.add_argument("--only", metavar="STAGE", help="run only this stage")
    p.add_argument("--run-dir", help="run directory (default: the recipe's run_dir)")
    p.add_argument("--check", action="store_true", help="check the recipe and its input paths; run nothing")
    p.add_argument("--json", action="store_true", help="print the stage results as JSON")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    import sys

    try:
        recipe = load_recipe(args.recipe, args.overrides, run_dir=args.run_dir)
        if args.check:
            print(f"{recipe.source}: ok ({len(recipe.stages)} stages: "
                  f"{', '.join(f'{s.name} ({s.type})' for s in recipe.stages)})")
            return 0
        started = time.time()
        echo = (lambda _msg: None) if args.json else print
        results = run_pipeline(recipe, start_from=args.start_from, only=args.only, echo=echo)
    except PipelineError as err:
        print(f"coca-edge pipeline: error: {err}", file=sys.stderr)
        return 2
    seconds = time.time() - started
    if args.json:
        print(json.dumps({"run_dir": recipe.run_dir, "seconds": round(seconds, 1),
                          "stages": [dataclasses.asdict(r) for r in results]}, indent=2))
    else:
        _print_summary(recipe, results, seconds)
    if any(r.status == "failed" for r in results):
        failed = next(r for r in results if r.status == "failed")
        print(f"coca-edge pipeline: stage {failed.name} failed: {failed.error}\n"
              f"  finished stages are kept in {recipe.run_dir}; fix the cause and run the same command to resume",
              file=sys.stderr)
        return 2
    return 1 if any(r.status == "gates_failed" for r in results) else 0


def _print_summary(recipe: Recipe, results: list[StageResult], seconds: float) -> None:
    run_dir = Path(recipe.run_dir)
    print()
    print(f"{'stage':<20}{'type':<10}{'status':<14}{'seconds':>9}")
    for r in results:
        print(f"{r.name:<20}{r.type:<10}{r.status:<14}{r.seconds:>9.1f}")
    print(f"total: {seconds:.1f} s, run directory: {run_dir}")
    for r in results:
        if r.status == "gates_failed":
            print(f"gates FAILED in {r.name}: {r.error}")
    states = {s.name: _read_stage(run_dir / s.name) or {} for s in recipe.stages}
    if recipe.summary:
        name = _parse_ref(recipe.summary)[0]
        state = states.get(name, {})
        if state.get("status") in ("done", "gates_failed"):
            out = run_dir / name / "out"
            table = out / state["outputs"].get("table", "table.txt")
            if table.is_file():
                print(f"\n{name}:\n{table.read_text()}", end="")
            print(f"report: {out / state['outputs']['html']}")
    if recipe.deploy:
        name, key = _parse_ref(recipe.deploy)
        state = states.get(name, {})
        if state.get("status") == "done":
            print(f"ready to deploy: {run_dir / name / 'out' / state['outputs'][key or 'bundle']}")
