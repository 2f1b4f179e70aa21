"""What a user sees while training (issue 15.9): no `loss nan`, plain progress lines when output is not a
terminal, and a model load without torch/transformers noise."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

from greenstack.engine.loop import _Progress


def steps(progress: _Progress, losses: dict[int, float], n: int) -> None:
    with progress:
        for step in range(1, n + 1):
            if step in losses:
                progress.loss = losses[step]
            progress.advance(SimpleNamespace(step=step, epoch=0))


def test_plain_lines_when_not_a_terminal_and_no_nan(caplog):
    with caplog.at_level(logging.INFO, logger="greenstack"):
        steps(_Progress(enabled=True, total=12, plain_interval_s=0.0, terminal=False), {10: 0.25, 12: 0.125}, 12)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert lines[0].startswith("train: step 1/12 (8 %), epoch 0, ")
    assert all("nan" not in line for line in lines)
    assert "loss" not in lines[0] and "loss 0.2500" in lines[9]
    assert lines[-1].startswith("train: step 12/12 (100 %), epoch 0 loss 0.1250")  # the final state, once
    assert len(lines) == 12


def test_plain_lines_are_spaced_by_the_interval(caplog):
    with caplog.at_level(logging.INFO, logger="greenstack"):
        steps(_Progress(enabled=True, total=50, plain_interval_s=3600.0, terminal=False), {50: 0.5}, 50)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert lines == [next(m for m in lines if m.startswith("train: step 50/50"))]  # only the end line


def test_a_two_step_bar_ends_on_a_loss_not_nan():
    import io

    progress = _Progress(enabled=True, total=2, terminal=True)
    steps(progress, {}, 1)
    assert "nan" not in progress.info() and "loss" not in progress.info()
    buffer = io.StringIO()
    progress = _Progress(enabled=True, total=2, terminal=True)
    with progress:
        progress._bar.console.file = buffer
        progress.advance(SimpleNamespace(step=1, epoch=0))
        progress.loss = 0.75
        progress.advance(SimpleNamespace(step=2, epoch=0))
    assert progress.info() == "epoch 0 loss 0.7500"
    assert "nan" not in buffer.getvalue()


def test_loading_the_pretrained_text_model_prints_one_calm_line():
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from greenstack.models.builders import build_transformers\n"
            "build_transformers(3, path='minilm')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in ("_pytree", "LOAD REPORT", "MISSING", "Loading weights"):
        assert noise not in out, out[-3000:]
    assert "new 3-class head (classifier.bias, classifier.weight)" in out and "expected when fine-tuning" in out
