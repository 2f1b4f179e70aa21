"""The compressed artifact: a small safetensors file plus a JSON manifest, and the loader for it.

Layout of `<dir>/`:
- `weights.safetensors`: every tensor of the (converted) model, each stored the smaller way:
  dense, or sparse as a 1-bit occupancy mask (`<key>::mask`, uint8, np.packbits order) plus the
  nonzero values (`<key>::values`) in row-major order. int8 weights of a QAT model are stored as
  int8, so an 80 %-sparse int8 tensor costs 1 bit + 0.2 byte per element instead of 4 bytes.
- `manifest.json`: format version, the model spec (how to rebuild the float architecture), the QAT
  backend and its layout of quantized tensors, example-input shapes, and counts.

`load_compressed(dir)` rebuilds the architecture, converts a skeleton the same way (when QAT was
used) and fills it, so the reloaded model computes exactly what the exported one did.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from greenstack.compression import qat as qat_lib
from greenstack.compression.selection import count_parameters
from greenstack.models.spec import build_from_spec, model_spec

FORMAT = "greenstack.compressed/1"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


# -- sparse packing ----------------------------------------------------------------------------
def pack_tensor(key: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Store `tensor` densely or as (bitmask, nonzero values), whichever is smaller on disk."""
    tensor = tensor.detach().cpu().contiguous()
    n = tensor.numel()
    nonzero = tensor != 0
    nnz = int(nonzero.sum())
    dense_bytes = n * tensor.element_size()
    sparse_bytes = (n + 7) // 8 + nnz * tensor.element_size()
    meta = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""), "nnz": nnz}
    packable = tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8, torch.int32, torch.int64)
    if packable and n >= 64 and sparse_bytes < dense_bytes:
        bits = np.packbits(nonzero.flatten().numpy())
        return ({f"{key}::mask": torch.from_numpy(bits), f"{key}::values": tensor[nonzero].clone()},
                {**meta, "encoding": "sparse"})
    return {key: tensor}, {**meta, "encoding": "dense"}


def unpack_tensor(key: str, meta: Mapping[str, Any], stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of `pack_tensor`."""
    if meta["encoding"] == "dense":
        return stored[key]
    shape = tuple(meta["shape"])
    n = int(np.prod(shape)) if shape else 1
    mask = torch.from_numpy(np.unpackbits(stored[f"{key}::mask"].numpy(), count=n).astype(bool))
    values = stored[f"{key}::values"]
    out = torch.zeros(n, dtype=values.dtype)
    out[mask] = values
    return out.reshape(shape)


# -- export ------------------------------------------------------------------------------------
def _example_inputs(batch: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One-sample example inputs for tracing skeletons, and their description for the manifest."""
    if batch is None:
        return (), {}
    inputs = batch["inputs"]
    if isinstance(inputs, torch.Tensor):
        example = inputs[:1].detach().cpu()
        return (example,), {"shape": list(example.shape), "dtype": str(example.dtype).replace("torch.", "")}
    return (), {"keys": sorted(inputs)}


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def export_compressed(model: nn.Module, out_dir: str | Path, *, example_batch: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Write `model` (float, pruned and/or QAT-prepared) as a compact artifact; returns the manifest.

    A QAT-prepared model is converted to real int8 first (its backend is detected from its modules).
    `example_batch` (a training batch) gives the input shape FX needs to rebuild a CNN skeleton.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model)
    info = qat_lib.qat_info(model)
    backend = info["backend"]
    example, example_meta = _example_inputs(example_batch)
    manifest: dict[str, Any] = {"format": FORMAT, "spec": spec, "backend": backend, "example_input": example_meta,
                                "exclude_modules": list(info["exclude_modules"])}
    if backend is None:
        state = _float_state(model)
        layout: dict[str, Any] = {k: {"kind": "tensor"} for k in state}
        tensors = state
        manifest["parameters"] = count_parameters(model)
    else:
        if backend == "ao_fx" and not example:
            raise ValueError("exporting an FX-quantized model needs `example_batch` (its input shape)")
        converted = qat_lib.convert_qat(model, backend, manifest["exclude_modules"])
        tensors, layout = qat_lib.backend_module(backend).flatten_state(converted)
        manifest["parameters"] = count_parameters(build_from_spec(spec, device="meta"))
    aliases = _tied_aliases(model, tensors)
    stored: dict[str, torch.Tensor] = {}
    encodings: dict[str, Any] = {}
    for key, tensor in tensors.items():
        if key in aliases:
            continue
        parts, meta = pack_tensor(key, tensor)
        stored.update(parts)
        encodings[key] = meta
    manifest["layout"] = layout
    manifest["tensors"] = encodings
    manifest["aliases"] = aliases
    manifest["stored_nonzero_values"] = _nonzero_count(manifest)
    _write(out, _untie(stored), manifest)
    return manifest


def _tied_aliases(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """`{stored key: earlier key}` for the tensors of parameters tied in `model` (one storage, two names:
    a GPT-2/Llama input embedding and LM head) that are still equal in `tensors`, float or converted
    to int8 (`<name>.__qdata`, `.__scale`, ...): stored once, as `save_pretrained` does."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor) or not value.numel():
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in first:
            tied[name] = first[ptr]
        else:
            first[ptr] = name
    aliases: dict[str, str] = {}
    for key, tensor in tensors.items():
        for name, original in tied.items():
            if key == name or key.startswith(f"{name}.__"):
                other = original + key[len(name):]
                if other in tensors and other not in aliases and tensors[other].dtype == tensor.dtype \
                        and torch.equal(tensors[other].detach().cpu(), tensor.detach().cpu()):
                    aliases[key] = other
                break
    return aliases


def _nonzero_count(manifest: Mapping[str, Any]) -> int:
    return sum(int(meta["nnz"]) for meta in manifest["tensors"].values() if meta["dtype"] in
               ("float32", "float16", "bfloat16", "int8", "qint8"))


def _write(out: Path, stored: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=out, prefix=".weights.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(stored, tmp, metadata={"format": FORMAT})
        os.replace(tmp, out / WEIGHTS_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True, separators=(",", ":")))


def artifact_bytes(path: str | Path) -> int:
    """Size on disk of an artifact directory (weights + manifest)."""
    path = Path(path)
    return sum((path / f).stat().st_size for f in (WEIGHTS_FILE, MANIFEST_FILE))


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST_FILE).read_text())


# -- load ----------------------------------------------------------------------------------------
def _example_from_meta(meta: Mapping[str, Any]) -> tuple[Any, ...]:
    if "shape" not in meta:
        return ()
    return (torch.zeros(meta["shape"], dtype=getattr(torch, meta["dtype"])),)


def load_compressed(path: str | Path) -> nn.Module:
    """A runnable model (eval mode, CPU) restored from an artifact written by `export_compressed`."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} artifact (format {manifest.get('format')!r})")
    stored = load_file(str(path / WEIGHTS_FILE))
    tensors = {key: unpack_tensor(key, meta, stored) for key, meta in manifest["tensors"].items()}
    for key, original in manifest.get("aliases", {}).items():
        tensors[key] = tensors[original].clone()
    float_model = build_from_spec(manifest["spec"])
    backend = manifest.get("backend")
    if backend is None:
        float_model.load_state_dict(tensors, strict=True)
        return float_model.eval()
    module = qat_lib.backend_module(backend)
    example = _example_from_meta(manifest.get("example_input", {}))
    skeleton = module.skeleton(float_model, example, manifest.get("exclude_modules", []))
    return module.load_state(skeleton, tensors, manifest["layout"])


def dense_reference(path: str | Path) -> nn.Module:
    """A freshly initialised fp32 model of the artifact's architecture: the "uncompressed" baseline
    for size and latency (dense kernels cost the same whatever the weight values)."""
    return build_from_spec(read_manifest(path)["spec"]).eval()


def dense_fp32_bytes(model: nn.Module) -> int:
    """Size of `model`'s state as an fp32 safetensors file, measured by writing it (a tensor shared by
    two names, e.g. a tied embedding and LM head, written once, as `save_pretrained` does)."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        ptr = v.untyped_storage().data_ptr() if v.numel() else 0
        if ptr and ptr in seen:
            continue
        seen.add(ptr)
        state[k] = v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_file(_untie(state), tmp)
        return Path(tmp).stat().st_size
    finally:
        Path(tmp).unlink(missing_ok=True)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store each tensor on its own."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


# -- measurement ---------------------------------------------------------------------------------
@torch.no_grad()
def latency_ms(model: nn.Module, inputs: Any, *, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time (ms) of an eval-mode CPU forward over `repeats` calls on `inputs`."""
    return compare_latency_ms([model], inputs, repeats=repeats, warmup=warmup)[0]


@torch.no_grad()
def compare_latency_ms(models: list[nn.Module], inputs: Any, *, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Median forward time (ms) of each model on `inputs`, the models timed in turn within each
    repetition so that a noisy machine (shared cores) slows all of them alike."""
    from greenstack.tasks.base import forward

    batch = {"inputs": inputs}
    for model in models:
        model.eval()
        for _ in range(warmup):
            forward(model, batch)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(max(1, repeats)):
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            forward(model, batch)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1000.0 for t in times]
