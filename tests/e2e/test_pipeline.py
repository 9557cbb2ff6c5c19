"""The recipe pipeline: checks before any work, skip / resume, SIGKILL mid-distill, unwritable run dirs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coca_edge.cli import main
from coca_edge.pipeline import PipelineError, load_recipe, run_pipeline

TRAIN = """\
model: test-tiny
seed: 0
steps: {steps}
batch_size: 8
save_every: 2
keep_last: 2
log_every: 1
threads: 1
data: {{train_size: 40, max_text_len: 24}}
loss: {{caption_vocab: data}}
optim: {{warmup_steps: 3, lr: 1.0e-3}}
eval: {{at_end: false}}
"""

RECIPE = """\
# test recipe
name: t
run_dir: {run_dir}
stages:
  first:
    type: train
    recipe: {train}
    set: {{steps: 2}}
    progress: false
  second:
    type: train
    recipe: {train}
    set: {{steps: {steps}}}
    progress: false
  bundle:
    type: export
    model: "@second"
"""


def _write(tmp_path: Path, steps: int = 4) -> Path:
    train = tmp_path / "train.yaml"
    train.write_text(TRAIN.format(steps=steps))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", train=train, steps=steps))
    return recipe


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _stage(run: Path, name: str) -> dict:
    return json.loads((run / name / "stage.json").read_text())


def test_run_skip_and_rerun_after_change(tmp_path, capsys):
    recipe = _write(tmp_path)
    assert main(["pipeline", str(recipe)]) == 0
    run = tmp_path / "run"
    for name in ("first", "second", "bundle"):
        assert _stage(run, name)["status"] == "done"
    assert (run / "bundle" / "out" / "bundle" / "manifest.json").is_file()
    assert (run / "recipe.yaml").is_file() and (run / "second" / "config.json").is_file()
    finished = {n: _stage(run, n)["finished"] for n in ("first", "second", "bundle")}
    capsys.readouterr()

    # unchanged inputs: every stage is skipped, nothing is rewritten
    assert main(["pipeline", str(recipe)]) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 3
    assert {n: _stage(run, n)["finished"] for n in finished} == finished

    # a changed parameter re-runs that stage and the stages that depend on its output
    assert main(["pipeline", str(recipe), "stages.second.set.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "first (train): up to date, skipped" in out
    assert "second (train): running" in out and "bundle (export): running" in out
    assert json.loads((run / "second" / "out" / "summary.json").read_text())["step"] == 3

    # --only re-runs one stage when asked with --from; --only of a stage needs its inputs done
    assert main(["pipeline", str(recipe), "stages.second.set.steps=3", "--from", "bundle", "--only", "bundle"]) == 0
    assert "bundle (export): running" in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.replace("name: t", "name: t\nrun_dri: x"), "unknown key(s) ['run_dri']"),
    (lambda r: r.replace("    set: {steps: 2}", "    sett: {steps: 2}"), "stages.first: unknown key(s) ['sett']"),
    (lambda r: r.replace("    set: {steps: 2}", "    set: {stepz: 2}"), "unknown key(s) ['stepz']"),
    (lambda r: r.replace("type: export", "type: exprot"), "unknown stage type 'exprot'"),
    (lambda r: r.replace('"@second"', '"@secnd"'), "'@secnd' does not name an earlier stage"),
    (lambda r: r.replace('"@second"', "/no/such/model.safetensors"), "path not found: /no/such/model.safetensors"),
    (lambda r: r.replace('"@second"', '"@second@fp16"'), "a reference may end in a dtype only in a validate stage"),
    (lambda r: r + '  q:\n    type: quantize\n    bundle: "@bundle"\n    fuse_attention: "yes"\n',
     "stages.q: fuse_attention must be true, false or absent"),
    (lambda r: r + '  v:\n    type: validate\n    reference: "@second"\n    candidates: ["@bundle"]\n    device: 0\n',
     "stages.v: device must be a torch device name (cpu, cuda, cuda:N), got 0"),
])
def test_bad_recipes_stop_before_any_work(tmp_path, capsys, edit, message):
    recipe = _write(tmp_path)
    recipe.write_text(edit(recipe.read_text()))
    assert main(["pipeline", str(recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_stage_flags_and_missing_recipe(tmp_path, capsys):
    recipe = _write(tmp_path)
    assert main(["pipeline", str(recipe), "--only", "nope"]) == 2
    assert "--only nope: unknown stage" in capsys.readouterr().err
    assert main(["pipeline", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    assert main(["pipeline", str(recipe), "--only", "bundle"]) == 2
    assert "needs stage second" in capsys.readouterr().err


def test_unwritable_stage_directory_keeps_finished_stages(tmp_path):
    recipe = load_recipe(_write(tmp_path))
    run = Path(recipe.run_dir)
    run.mkdir(parents=True)
    (run / "second").write_text("a file where the stage directory should be")  # root ignores chmod
    with pytest.raises(PipelineError, match="cannot write stage second .*finished stages are intact"):
        run_pipeline(recipe, echo=lambda _: None)
    assert _stage(run, "first")["status"] == "done"
    assert (run / "first" / "out" / "model.safetensors").is_file()
    with pytest.raises(PipelineError, match="run directory .* is not writable"):
        run_pipeline(load_recipe(_write(tmp_path), run_dir=str(run / "second" / "x")), echo=lambda _: None)


def test_failed_stage_is_recorded_and_rerun(tmp_path, capsys):
    recipe = _write(tmp_path)
    recipe.write_text(recipe.read_text().replace("    set: {steps: 2}", "    set: {steps: 2, model: no-such-preset}"))
    assert main(["pipeline", str(recipe)]) == 2
    assert "stage first failed" in capsys.readouterr().err
    assert _stage(tmp_path / "run", "first")["status"] == "failed"
    assert not (tmp_path / "run" / "second").exists()


@pytest.mark.slow
def test_sigkill_mid_distill_resumes_without_redoing_work(tmp_path):
    steps = 40
    recipe = _write(tmp_path, steps=steps)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "coca_edge.cli", "pipeline", str(recipe)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run / "second" / "work" / "train" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if latest.is_file() and int(latest.read_text().split("-")[1]) >= 6:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = int(latest.read_text().split("-")[1])
    assert 6 <= at_kill < steps, "the run must be killed in the middle of the second stage"
    assert _stage(run, "second")["status"] == "running"
    first_done = _stage(run, "first")["finished"]

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "first (train): up to date, skipped" in again.stdout
    assert _stage(run, "first")["finished"] == first_done
    summary = json.loads((run / "second" / "out" / "summary.json").read_text())
    assert summary["step"] == steps and summary["resumed_from_step"] >= at_kill
    logged = [json.loads(line)["step"] for line in (run / "second" / "work" / "train" / "metrics.jsonl").open()]
    assert logged == list(range(1, steps + 1))  # no step trained twice, none lost
    assert _stage(run, "bundle")["status"] == "done"


# The shipped demo recipe, shrunk (few steps, few samples): every stage type runs end to end.
DEMO_SHRINK = ["stages.student.set.steps=6", "stages.student.set.save_every=3", "stages.student.set.batch_size=16",
               "stages.student.set.data.train_size=64", "stages.student.set.threads=1",
               "stages.student_int8.calib_samples=4", "stages.student_int8.gates=null", "stages.vs_teacher.samples=8", "stages.vs_student.samples=8",
               "stages.vs_teacher.latency=false", "stages.vs_student.latency=false"]


@pytest.mark.slow
def test_demo_recipe_end_to_end_shrunk(tmp_path, capsys):
    root = Path(__file__).resolve().parents[2]
    os.chdir(root)
    code = main(["pipeline", "recipes/demo.yaml", *DEMO_SHRINK, "--run-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    # 6 steps make a student that fails the INT8 gates or passes them; both are a complete run
    assert code in (0, 1), out
    run = tmp_path / "demo"
    for name in ("student", "student_fp32", "student_fp16", "student_int8", "vs_teacher", "vs_student"):
        assert _stage(run, name)["status"] in ("done", "gates_failed"), name
    manifest = json.loads((run / "student_int8" / "out" / "bundle" / "manifest.json").read_text())
    assert {g["precision"] for g in manifest["graphs"].values()} <= {"int8-dynamic", "int8-static"}
    report = json.loads((run / "vs_teacher" / "out" / "report.json").read_text())
    assert len(report["candidates"]) == 3
    assert "demo_teacher" in out and "student INT8" in out  # the summary table, teacher as its reference row
    assert f"ready to deploy: {run / 'student_int8' / 'out' / 'bundle'}" in out
    assert (run / "vs_teacher" / "out" / "report.html").is_file()


def test_editing_a_gates_file_changes_the_stage_key(tmp_path):
    from coca_edge.pipeline import QuantizeParams, Stage, _stage_key

    gates = tmp_path / "gates.yaml"
    gates.write_text("gates:\n  zero_shot_top1_drop: '<= 0.3'\n")
    stage = Stage("q", "quantize", QuantizeParams(bundle=str(tmp_path), gates=str(gates)))
    before, inputs = _stage_key(stage, stage.params, {})
    assert str(gates) in inputs
    gates.write_text("gates:\n  zero_shot_top1_drop: '<= 0.1'\n")
    assert _stage_key(stage, stage.params, {})[0] != before
    named = Stage("q", "quantize", QuantizeParams(bundle=str(tmp_path), gates="cpu-int8"))
    assert "cpu-int8" not in _stage_key(named, named.params, {})[1]  # a shipped name, not a file


CHECK_STAGE = """\
  check:
    type: validate
    reference: "@second"
    candidates: ["@second@fp16", "@bundle"]
    samples: 8
"""


def test_validate_stage_runs_a_stage_checkpoint_in_a_dtype(tmp_path):
    """"@stage@fp16" in a validate stage names that stage's checkpoint run by PyTorch in FP16;
    a suffix the validator does not know is an error before any work."""
    from coca_edge.pipeline import _resolve

    recipe = _write(tmp_path)
    text = recipe.read_text() + CHECK_STAGE
    recipe.write_text(text)
    stage = load_recipe(recipe).stage("check")
    assert [ref for ref, _ in stage.refs] == ["second", "second", "bundle"]
    outputs = {"second": {"model": "/r/second/model.safetensors"}, "bundle": {"bundle": "/r/bundle"}}
    main_out = {"second": "model", "bundle": "bundle"}
    assert _resolve(list(stage.params.candidates), outputs, main_out) == ["/r/second/model.safetensors@fp16",
                                                                          "/r/bundle"]
    recipe.write_text(text.replace("@second@fp16", "@second@fp8"))
    with pytest.raises(PipelineError, match="stages.check: '@second@fp8': a reference may end in a dtype only"):
        load_recipe(recipe)
