"""Efficiency policies on a causal LM (task=causal_lm, a tiny GPT-2 decoder): each trains 2 batches and
records its decision and figure, or says why it does not apply (packed blocks have no padding)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from greenstack.efficiency.checkpointing import is_activation_checkpointing
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.state import State
from greenstack.models import build_causal_lm
from greenstack.policies.efficiency.activation_checkpointing import ActivationCheckpointing
from greenstack.policies.efficiency.amp import MixedPrecision
from greenstack.policies.efficiency.compile import Compile
from greenstack.policies.efficiency.padding import DynamicPadding
from greenstack.policies.efficiency.sdpa import SdpaAttention
from greenstack.tasks import CausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 32
FAST = {"probe_steps": 1, "probe_rounds": 2}


def gpt2(attn: str | None = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_causal_lm(VOCAB, config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                          "n_positions": 16}, attn_implementation=attn)


def packed(n: int = 3, batch: int = 4, length: int = 12) -> list[dict[str, Any]]:
    """Packed blocks (the LM builders' format): token ids in, next tokens out, nothing padded."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = (torch.randint(0, 10, (batch, 1), generator=g) + torch.arange(length + 1)) % 10
        out.append({"inputs": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    return out


def padded_rows(n: int = 3, batch: int = 4, length: int = 12) -> list[dict[str, Any]]:
    """Rows of different lengths padded to the batch's longest (data=stream's format): masked inputs,
    ignore_index labels at the padding."""
    out = []
    for b in packed(n, batch, length):
        lengths = torch.tensor([length, length - 3, length - 6, 4][:batch])
        mask = (torch.arange(length) < lengths[:, None]).long()
        labels = b["labels"].masked_fill(mask == 0, -100)
        out.append({"inputs": {"input_ids": b["inputs"] * mask, "attention_mask": mask}, "labels": labels})
    return out


def train(policy: Any, batches: list[dict[str, Any]], model: torch.nn.Module) -> tuple[Trainer, State]:
    trainer = Trainer(model, batches, Optim(lr=1e-3), TrainerConfig(
        max_duration="2ba", progress=False, log_interval=1, limit_eval_batches=1),
        val_loader=batches[:1], policies=[policy], batch_size=4, task=CausalLM())
    return trainer, trainer.fit()


def warned(policy: Any, text: str) -> bool:
    return any(text in d.get("warning", "") for d in policy.decisions)


CASES: list[tuple[str, Callable[[], Any], Callable, Callable[[Any, State], tuple]]] = [
    ("amp-bf16", lambda: MixedPrecision(mode="bf16", **FAST), packed,
     lambda p, s: (p.on, s.autocast_dtype is torch.bfloat16, s.grad_scaler is None)),
    ("amp-auto", lambda: MixedPrecision(**FAST), packed,
     lambda p, s: (p.on is not None, s.autocast_dtype == (torch.bfloat16 if p.on else None),
                   p.summary()["efficiency/amp_speedup"].provenance == "measured")),
    ("sdpa-auto", lambda: SdpaAttention(**FAST), packed,
     lambda p, s: (p.implementation in ("sdpa", "eager"), s.model.config._attn_implementation == p.implementation,
                   p.summary()["efficiency/sdpa_speedup"].provenance == "measured")),
    ("act-ckpt-on", lambda: ActivationCheckpointing(mode="on", **FAST), packed,
     lambda p, s: (p.on, is_activation_checkpointing(s.model), "transformers" in p.method,
                   p.summary()["efficiency/activation_checkpointing_activation_ratio"].value < 1)),
    ("padding-packed", lambda: DynamicPadding(), packed,
     lambda p, s: (p.on is False, warned(p, "packed token blocks"), "efficiency/padding_fraction" not in p.summary())),
    ("padding-rows", lambda: DynamicPadding(), padded_rows,
     lambda p, s: (p.on is False, warned(p, "no LengthGroupedSampler"),
                   p.summary()["efficiency/padding_fraction"].value == pytest.approx(17 / 48))),
]


@pytest.mark.parametrize(("policy", "data", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_efficiency_policy_on_a_causal_lm(policy, data, check):
    p = policy()
    trainer, state = train(p, data(), gpt2())
    assert state.step == 2 and torch.isfinite(state.loss) and state.tokens_seen > 0
    assert all(check(p, state)), p.decisions
    assert p.decisions and all("step" in d for d in p.decisions)


@pytest.mark.slow
def test_compile_on_a_causal_lm():
    p = Compile(mode="on", backend="eager", **FAST)
    trainer, state = train(p, packed(), gpt2("sdpa"))
    assert p.on and state.model._compiled_call_impl is not None, p.decisions
    assert torch.isfinite(state.loss) and "transformer.wte.weight" in state.model.state_dict()
