"""The plain-function cores of the efficiency stack (greenstack.efficiency), tested alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import RandomSampler

from greenstack.efficiency.alerts import PlateauRule, ThresholdRule
from greenstack.efficiency.attention import attention_implementation, set_attention_implementation
from greenstack.efficiency.batch_size import lr_scale_factor, scale_learning_rate_, search_batch_size
from greenstack.efficiency.checkpointing import (
    Unsupported,
    apply_activation_checkpointing,
    is_activation_checkpointing,
    remove_activation_checkpointing,
)
from greenstack.efficiency.compile import try_compile
from greenstack.efficiency.memory_format import apply_channels_last, channels_last_batch
from greenstack.efficiency.power_limit import (
    GpuPowerControl,
    PowerLimitSweep,
    PowerLimitUnavailable,
    zeus_cost,
)
from greenstack.efficiency.probe import Comparison, Timing, Variant, compare, saved_activation_bytes
from greenstack.efficiency.sampler import LengthGroupedSampler, plan_padding
from greenstack.engine.optim import Optim
from greenstack.models import build_timm, build_transformers
from greenstack.tasks.base import forward

CPU = torch.device("cpu")
BERT = {"model_type": "bert", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    """Probes time steps: one intra-op thread keeps a shared 2-core machine from thrashing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_batch(n: int = 4, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"inputs": torch.randn(n, 3, size, size, generator=g), "labels": torch.arange(n) % 2}


def text_batch(n: int = 4, length: int = 8) -> dict:
    ids = torch.randint(1, 100, (n, length), generator=torch.Generator().manual_seed(0))
    return {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "labels": torch.arange(n) % 2}


def mlp_blocks() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), *[torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.GELU())
                                                     for _ in range(3)], torch.nn.Linear(48, 2))


def grads(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.nn.functional.cross_entropy(forward(model, batch), batch["labels"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# -- length-grouped sampling -------------------------------------------------------------------------
def test_ungrouped_sampler_is_exactly_random_sampler_and_grouping_cuts_padding():
    data = list(range(40))
    lengths = [3 + (i * 7) % 29 for i in range(40)]
    ours = LengthGroupedSampler(data, lengths, generator=torch.Generator().manual_seed(5), bucket_size=20)
    theirs = RandomSampler(data, generator=torch.Generator().manual_seed(5))
    assert [list(ours) for _ in range(2)] == [list(theirs) for _ in range(2)]  # runs without grouping unchanged
    ours.group_by_length = True
    order = list(ours)
    assert sorted(order) == data  # still a permutation: every sample once per epoch
    for bucket in (order[:20], order[20:]):
        assert [lengths[i] for i in bucket] == sorted((lengths[i] for i in bucket), reverse=True)
    plan = plan_padding(ours, batch_size=4)
    assert plan.real_tokens == sum(lengths)
    assert plan.real_tokens <= plan.grouped_tokens < plan.random_tokens
    assert plan.grouped_ratio < 0.9


# -- batch-size search and LR scaling --------------------------------------------------------------
class FakeDevice:
    """1 GiB device; peak = 100 MiB + 10 MiB per sample; above 1.25 GiB it raises an OOM like CUDA does."""

    limit = 2**30

    def __init__(self) -> None:
        self.tried: list[int] = []

    def peak(self, n: int) -> int:
        self.tried.append(n)
        peak = (100 + 10 * n) * 2**20
        if peak > 1.25 * 2**30:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return peak

    @staticmethod
    def measure(sizes: list[int]) -> dict[int, tuple[float, None]]:
        return {n: (1000 * n / (n + 16), None) for n in sizes}  # saturating throughput


def test_batch_size_search_finds_largest_power_of_two_within_the_memory_fraction():
    dev = FakeDevice()
    result = search_batch_size(dev.peak, dev.measure, start=8, max_batch_size=4096, limit_bytes=dev.limit,
                               memory_fraction=0.5)
    # budget 512 MiB: 32 samples = 420 MiB fits, 64 = 740 MiB runs but exceeds the budget
    assert result.max_fit == 32 and result.chosen == 32
    assert dev.tried == [8, 16, 32, 64]
    assert result.gain == pytest.approx((32 / 48) / (8 / 24))
    over = next(t for t in result.trials if t.batch_size == 64)
    assert not over.fits and over.reason == "peak 740 MiB > 50% of 1024 MiB"


def test_batch_size_search_survives_oom_halves_when_too_big_and_keeps_start_without_gain():
    dev = FakeDevice()
    result = search_batch_size(dev.peak, dev.measure, start=64, max_batch_size=4096, limit_bytes=dev.limit,
                               memory_fraction=1.0)  # budget 1024 MiB: 64 fits, 128 OOMs (1380 MiB)
    assert result.chosen == 64 and result.max_fit == 64
    assert "out of memory" in next(t for t in result.trials if t.batch_size == 128).reason
    too_big = search_batch_size(dev.peak, dev.measure, start=256, max_batch_size=4096, limit_bytes=dev.limit,
                                memory_fraction=0.8)
    assert too_big.chosen == 64 and math.isinf(too_big.gain)
    flat = search_batch_size(dev.peak, lambda sizes: {n: (100.0, None) for n in sizes}, start=8,
                             max_batch_size=4096, limit_bytes=dev.limit, memory_fraction=0.8)
    assert flat.chosen == 8 and flat.max_fit == 64  # no measured gain: keep the configured batch


def test_lr_scaling_rules_keep_the_schedule_consistent():
    assert lr_scale_factor(32, 128, "linear") == 4.0
    assert lr_scale_factor(32, 128, "sqrt") == 2.0
    assert lr_scale_factor(32, 128, "none") == 1.0
    optim = Optim(lr=1e-3, schedule="cosine", warmup_steps=2)
    reference, ref_sched = optim.build([torch.nn.Parameter(torch.zeros(1))], 10)
    scaled, sched = optim.build([torch.nn.Parameter(torch.zeros(1))], 10)
    scale_learning_rate_(scaled, sched, 2.0)
    for _ in range(6):
        assert scaled.param_groups[0]["lr"] == pytest.approx(2 * reference.param_groups[0]["lr"])
        for opt, s in ((reference, ref_sched), (scaled, sched)):
            opt.step()
            s.step()


# -- model transformations -------------------------------------------------------------------------
def test_activation_checkpointing_on_plain_blocks_keeps_gradients_and_names():
    model, batch = mlp_blocks(), {"inputs": torch.randn(4, 48), "labels": torch.tensor([0, 1, 0, 1])}
    before, keys = grads(model, batch), list(model.state_dict())
    saved_full = saved_activation_bytes(model, batch, device=CPU)
    assert apply_activation_checkpointing(model).startswith("torch.utils.checkpoint(use_reentrant=False) around 4")
    assert is_activation_checkpointing(model) and list(model.state_dict()) == keys
    after = grads(model, batch)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert saved_activation_bytes(model, batch, device=CPU) < saved_full
    assert copy.deepcopy(model)(batch["inputs"]).shape == (4, 2)  # copies checkpoint their own blocks
    remove_activation_checkpointing(model)
    assert not is_activation_checkpointing(model)
    with pytest.raises(Unsupported, match="no repeated blocks"):
        apply_activation_checkpointing(torch.nn.Linear(4, 2))


def test_activation_checkpointing_uses_timm_and_transformers_switches():
    vit = build_timm("vit_tiny_patch16_224", 2, 3, kwargs={"img_size": 16, "patch_size": 8, "depth": 2})
    assert apply_activation_checkpointing(vit) == "timm set_grad_checkpointing" and vit.grad_checkpointing
    bert = build_transformers(2, config=BERT)
    assert "transformers" in apply_activation_checkpointing(bert) and is_activation_checkpointing(bert)
    bert.train()
    bert(**text_batch()["inputs"]).logits.sum().backward()
    remove_activation_checkpointing(bert)
    assert not is_activation_checkpointing(bert)


def test_attention_switches_between_sdpa_and_eager_with_the_same_outputs():
    bert = build_transformers(2, config=BERT, attn_implementation="eager").eval()
    inputs = text_batch()["inputs"]
    eager = bert(**inputs).logits
    set_attention_implementation(bert, "sdpa")
    assert attention_implementation(bert) == "sdpa"
    assert torch.allclose(bert(**inputs).logits, eager, atol=1e-5)
    vit = build_timm("vit_tiny_patch16_224", 2, 3, kwargs={"img_size": 16, "patch_size": 8, "depth": 1}).eval()
    x = image_batch()["inputs"]
    fused = vit(x)
    set_attention_implementation(vit, "eager")
    assert attention_implementation(vit) == "eager" and torch.allclose(vit(x), fused, atol=1e-5)
    with pytest.raises(Unsupported, match="no attention layers"):
        set_attention_implementation(build_timm("resnet10t", 2, 3), "sdpa")


def test_channels_last_converts_convolutions_and_batches_without_changing_results():
    model, batch = build_timm("resnet10t", 2, 3).eval(), image_batch()
    expected = model(batch["inputs"])
    assert apply_channels_last(model) > 0
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    converted = channels_last_batch(batch)
    assert converted["inputs"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(converted["inputs"]), expected, atol=1e-4)
    assert channels_last_batch(text_batch())["inputs"]["input_ids"].shape == (4, 8)


def test_compile_falls_back_to_eager_with_the_reason_and_restores_what_the_trial_touched():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 2))
    batch = {"inputs": torch.randn(4, 48), "labels": torch.tensor([0, 1, 0, 1])}
    bad = try_compile(model, batch, device=CPU, backend="no_such_backend")
    assert not bad.ok and "no_such_backend" in bad.reason
    assert model._compiled_call_impl is None and model(batch["inputs"]).shape == (4, 2)
    stats = model[2].running_mean.clone()
    good = try_compile(model, batch, device=CPU, backend="eager")
    assert good.ok and model._compiled_call_impl is not None
    assert torch.equal(model[2].running_mean, stats)  # the trial step left no trace
    assert all(p.grad is None for p in model.parameters())
    assert list(model.state_dict()) == ["1.weight", "1.bias", "2.weight", "2.bias", "2.running_mean",
                                        "2.running_var", "2.num_batches_tracked", "3.weight", "3.bias"]


# -- probes ----------------------------------------------------------------------------------------
def test_probe_leaves_rng_and_flop_counter_untouched_and_compares_variants():
    from torch.utils.flop_counter import FlopCounterMode

    model, batch = mlp_blocks(), {"inputs": torch.randn(4, 48), "labels": torch.tensor([0, 1, 0, 1])}
    rng = torch.get_rng_state()
    counter = FlopCounterMode(display=False)
    with counter:
        cmp = compare(model, batch, Variant("plain"), Variant("checkpointed", prepare=apply_activation_checkpointing),
                      device=CPU, steps=1, rounds=2, measure_memory=True)
    assert counter.get_total_flops() == 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert not is_activation_checkpointing(model)  # probes work on copies
    assert len(cmp.baseline.steps_s) == 2 and cmp.speedup > 0
    assert cmp.candidate.saved_activation_bytes < cmp.baseline.saved_activation_bytes
    assert cmp.basis == "samples/s"


def test_probe_energy_reads_hardware_counters_only_when_there_are_some():
    from greenstack.efficiency.probe import MonitorEnergy
    from greenstack.energy import EnergyMonitor
    from greenstack.energy.meters import Meter

    class Fake(Meter):
        def __init__(self, component: str, provenance: str, watts: float) -> None:
            self.components, self.provenance, self.source, self.name = (component,), provenance, component, component
            self.joules, self.watts = 0.0, watts

        def poll(self) -> None:
            self.joules += self.watts

        def read_energy_j(self) -> dict[str, float]:
            return {self.components[0]: self.joules}

    monitor = EnergyMonitor([Fake("gpu", "measured", 300.0), Fake("ram", "estimated", 5.0)], interval_s=60)
    monitor.start(background=False)
    energy = MonitorEnergy(monitor)
    first = energy()
    assert energy() - first == 300.0  # the modelled RAM share stays out of a measured reading
    assert energy.provenance == "measured" and energy.source == "gpu"
    monitor.stop()
    modelled = EnergyMonitor([Fake("ram", "estimated", 5.0)], interval_s=60).start(background=False)
    assert MonitorEnergy(modelled).provenance == "estimated"
    modelled.stop()


def test_comparison_decides_on_time_unless_energy_is_measured():
    fast, slow = Timing("a", 1.0, 8, 10.0, median_s=1.0), Timing("b", 2.0, 8, 5.0, median_s=2.0)
    timed = Comparison(slow, fast, "estimated")
    assert timed.basis == "samples/s" and timed.gain == 2.0 and timed.helps(1.05)
    assert timed.describe("b", "a") == "b 2.00× faster than a"
    metered = Comparison(slow, fast, "measured")
    assert metered.basis == "samples/J" and metered.gain == 0.5 and metered.hurts(1.05)
    lucky = Comparison(Timing("a", 1.0, 8, median_s=1.0), Timing("b", 0.5, 8, median_s=1.0))
    assert not lucky.helps(1.05)  # one fast step is not a consistent gain


# -- power limits (Zeus) against a fake NVML -------------------------------------------------------
class NVMLError(Exception):
    pass


class NVMLError_NoPermission(NVMLError):  # noqa: N801 - pynvml's name
    pass


class FakeNvml:
    """One GPU (100-300 W) whose step time and energy depend on the power limit."""

    NVMLError = NVMLError

    def __init__(self, *, settable: bool = True) -> None:
        self.limit_mw, self.energy_mj, self.t, self.settable = 300_000, 0, 0.0, settable
        self.history: list[int] = []

    def nvmlInit(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, i: int) -> str: return "gpu0"
    def nvmlDeviceGetUUID(self, h: str) -> str: return "GPU-0000"
    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: str) -> tuple[int, int]: return 100_000, 300_000
    def nvmlDeviceGetPowerManagementLimit(self, h: str) -> int: return self.limit_mw
    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int: return self.energy_mj
    def nvmlDeviceGetUtilizationRates(self, h: str):  # noqa: ANN201
        from types import SimpleNamespace

        return SimpleNamespace(gpu=30, memory=0)

    def nvmlDeviceSetPowerManagementLimit(self, h: str, mw: int) -> None:
        if not self.settable:
            raise NVMLError_NoPermission("Insufficient Permissions")
        self.limit_mw = mw
        self.history.append(mw)

    def step(self) -> None:
        """One training step: time 1 s at >= 200 W, slower below; power = the limit."""
        watts = self.limit_mw / 1000
        seconds = 1.0 if watts >= 200 else 200 / watts
        self.t += seconds
        self.energy_mj += round(watts * seconds * 1000)


def test_zeus_sweep_profiles_every_limit_picks_the_cheapest_and_restores():
    nvml = FakeNvml()
    control = GpuPowerControl(nvml)
    sweep = PowerLimitSweep(control, eta=1.0, step_w=50, warmup_steps=2, settle_steps=1, profile_steps=2,
                            clock=lambda: nvml.t)
    assert sweep.limits == [300.0, 250.0, 200.0, 150.0, 100.0]
    sweep.begin()
    done = []
    for _ in range(2 + 5 * 3):
        nvml.step()
        done.append(sweep.on_step())
    assert done.count(True) == 1 and done[-1]
    # energy per step: 300 J at 300 W, 250 J, 200 J, then 200 J below 200 W (slower, same energy)
    assert [round(m.energy_j / m.steps) for m in sweep.measurements] == [300, 250, 200, 200, 200]
    assert sweep.chosen_w == 200.0 and nvml.limit_mw == 200_000  # ties go to the faster limit
    time_only = PowerLimitSweep(control, eta=0.0)
    time_only.measurements = sweep.measurements
    assert time_only.best().limit_w == 300.0
    assert zeus_cost(100.0, 2.0, eta=0.5, max_power_w=300) == pytest.approx(350.0)
    control.restore()
    assert nvml.limit_mw == 300_000


def test_power_control_reports_missing_permission():
    control = GpuPowerControl(FakeNvml(settable=False))
    with pytest.raises(PowerLimitUnavailable, match="needs root"):
        control.set_limit_w(200)


# -- alert rules -----------------------------------------------------------------------------------
def test_threshold_rule_needs_patience_fires_once_and_rearms():
    rule = ThresholdRule("carbon", "carbon/intensity_g_per_kwh", 400, above=True, patience=2)
    fired = [rule.update(v) for v in (500, 300, 500, 520, 530, 300, 450, 460)]
    assert fired == [False, False, False, True, False, False, False, True]
    low = ThresholdRule("util", "efficiency/gpu_utilization", 50, above=False)
    assert [low.update(v) for v in (80, 20, 10, math.nan, 30)] == [False, True, False, False, True]


def test_plateau_rule_fires_after_patience_evaluations_without_improvement():
    rule = PlateauRule("plateau", "val/loss", "min", patience=2, min_delta=0.01)
    assert [rule.update(v) for v in (1.0, 0.8, 0.795, 0.81, 0.7, 0.7, 0.7)] == \
        [False, False, False, True, False, False, True]
    assert rule.best == 0.7
