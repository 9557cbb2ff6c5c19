"""Exact resume: SIGKILL a training process mid-run, resume, compare with an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CONFIG = """\
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


def _cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "coca_edge.distill.cli", "train", str(config), "--output-dir", str(out), "--no-progress", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    steps = 30
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(steps=steps))
    ref = subprocess.run(_cmd(config, tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(config, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _latest_step(killed) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _latest_step(killed)
    assert 6 <= at_kill < steps, "the run must be killed mid-way"

    resumed = subprocess.run(_cmd(config, killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise: same ops, same order, same thread count
    # the metrics log continues where the checkpoint was, without duplicated steps
    steps_logged = [int(line.split('"step": ')[1].split(",")[0]) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))


def test_resume_from_corrupted_checkpoint_is_a_clear_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(steps=4))
    out = tmp_path / "run"
    done = subprocess.run(_cmd(config, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    latest = out / "checkpoints" / "step-00000004" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    again = subprocess.run(_cmd(config, out, "--resume", "--steps", "6"), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "state.pt does not match its recorded sha256" in again.stderr
    assert "step-00000002 is still there" in again.stderr
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
