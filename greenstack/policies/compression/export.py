"""At the end of the run: write the compressed artifact, reload it, and measure what compression bought."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from greenstack.compression.export import (
    artifact_bytes,
    compare_latency_ms,
    dense_fp32_bytes,
    dense_reference,
    export_compressed,
    load_compressed,
)
from greenstack.compression.qat import backend_module
from greenstack.compression.selection import select_weights, zero_fraction
from greenstack.engine.events import Event
from greenstack.engine.loop import move_to
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import Check, at_least, checked, is_bool
from greenstack.models.spec import model_spec, verify_spec
from greenstack.provenance import Figure
from greenstack.tasks.base import forward

log = logging.getLogger("greenstack")
NAME = "compression.export"
INSIDE_RUN_DIR = Check(lambda d: isinstance(d, str) and bool(d) and not Path(d).is_absolute() and ".." not in Path(d).parts,
                       "must be a relative path inside the run directory", "e.g. compressed")


class _OnCPU(nn.Module):
    """Runs a CPU-only (int8) model on batches that live on another device; returns logits there."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner, self.device = model, device

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        cpu = torch.device("cpu")
        logits = forward(self.inner, {"inputs": move_to(kwargs, cpu) if kwargs else move_to(args[0], cpu)})
        return logits.to(self.device)


class ExportCompressed(Policy):
    """Writes `<run_dir>/<directory>/` (int8 and sparse tensors stored compactly + manifest.json; see
    greenstack.compression.export), reloads it with `load_compressed`, and reports in
    sustainability.json: size on disk vs the same architecture in dense fp32, CPU latency (median over
    `latency_repeats` forwards of a training batch) dense vs compressed, parameter count, sparsity,
    and test accuracy (language models: perplexity) of the model at the end of training vs the reloaded
    artifact.
    """

    role = Role.MODIFIER

    audit_kind = "compression"

    events = frozenset({Event.INIT, Event.FIT_END})

    @checked(NAME)
    def __init__(self, directory: Annotated[str, INSIDE_RUN_DIR] = "compressed",
                 latency_repeats: Annotated[int, at_least(1, integer=True)] = 10,
                 evaluate: Annotated[bool, is_bool()] = True) -> None:
        super().__init__(name=NAME)
        self.directory, self.latency_repeats, self.evaluate = directory, latency_repeats, evaluate
        self.figures: dict[str, Figure] = {}
        self.path: Path | None = None

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            # fail before training when the architecture cannot be rebuilt from the artifact
            verify_spec(state.model, model_spec(state.model))
            return
        out = Path(state.run_dir or ".") / self.directory
        batch = state.batch if isinstance(state.batch, dict) else None
        example = move_to(batch, torch.device("cpu")) if batch is not None else None
        manifest = export_compressed(state.model, out, example_batch=example)
        self.path = out
        reloaded = load_compressed(out)
        dense = dense_reference(out)
        size, dense_size = artifact_bytes(out), dense_fp32_bytes(dense)
        src_size = f"{out.name}/ on disk (weights.safetensors + manifest.json) vs the same architecture as fp32 safetensors"
        figures = {
            "compression/artifact_bytes": Figure(size, "B", "measured", f"size of {out.name}/ on disk"),
            "compression/dense_fp32_bytes": Figure(dense_size, "B", "measured", "fp32 safetensors of the architecture"),
            "compression/size_ratio": Figure(round(dense_size / size, 4), "x", "measured", src_size),
            "compression/parameters": Figure(manifest["parameters"], "count", "measured",
                                             "parameters of the exported architecture"),
            "compression/backend": Figure(manifest["backend"] or "float", "", "measured", f"{NAME}: artifact format"),
        }
        sparsity = _sparsity(reloaded, manifest["backend"])
        if sparsity is not None:
            figures["compression/sparsity"] = Figure(round(sparsity, 6), "fraction", "measured",
                                                     "zeros in the exported Conv/Linear weights")
        if example is not None:
            inputs = example["inputs"]
            n = int(example["labels"].shape[0]) if "labels" in example else 0
            src = (f"median of {self.latency_repeats} CPU forwards of one training batch ({n} samples), "
                   f"{torch.get_num_threads()} threads, dense and compressed timed alternately")
            dense_ms, comp_ms = compare_latency_ms([dense, reloaded], inputs, repeats=self.latency_repeats)
            figures["compression/latency_ms"] = Figure(round(comp_ms, 3), "ms", "measured", f"compressed: {src}")
            figures["compression/dense_latency_ms"] = Figure(round(dense_ms, 3), "ms", "measured", f"dense fp32: {src}")
            figures["compression/latency_speedup"] = Figure(round(dense_ms / comp_ms, 4), "x", "measured",
                                                            "dense fp32 latency / compressed latency")
        if self.evaluate and state.evaluate is not None:
            # a copy: QAT observers keep updating in eval mode unless frozen, and the run's model must
            # stay what was exported
            model = copy.deepcopy(state.model) if manifest["backend"] else state.model
            before = state.evaluate(model, "test")
            after = state.evaluate(_OnCPU(reloaded, state.device), "test")
            if "test/accuracy" in before and "test/accuracy" in after:
                src = f"test split ({int(after.get('test/samples', 0))} samples)"
                figures["compression/accuracy_before"] = Figure(before["test/accuracy"], "fraction", "measured",
                                                                f"model at the end of training, {src}")
                figures["compression/accuracy_after"] = Figure(after["test/accuracy"], "fraction", "measured",
                                                               f"reloaded artifact, {src}")
                figures["compression/accuracy_drop_pt"] = Figure(
                    round(100 * (before["test/accuracy"] - after["test/accuracy"]), 4), "points", "measured", src)
            if "test/perplexity" in before and "test/perplexity" in after:
                src = f"test split ({int(after.get('test/tokens', 0))} tokens)"
                figures["compression/perplexity_before"] = Figure(round(before["test/perplexity"], 6), "perplexity",
                                                                  "measured", f"model at the end of training, {src}")
                figures["compression/perplexity_after"] = Figure(round(after["test/perplexity"], 6), "perplexity",
                                                                 "measured", f"reloaded artifact, {src}")
        self.figures = figures
        log.info("export: %s written (%.1f kB, %.1fx smaller than dense fp32)", out, size / 1e3, dense_size / size)

    def summary(self) -> dict[str, Any]:
        return dict(self.figures)


def _sparsity(model: nn.Module, backend: str | None) -> float | None:
    if backend is None:
        weights = list(select_weights(model).values())
    else:
        weights = list(backend_module(backend).quantized_weights(model).values())
    return zero_fraction(weights) if weights else None
