"""Geo-distributed training without processes: the math, the participation rule, and bad-input errors."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import torch

from greenstack.carbon.sources import SeriesSource
from greenstack.errors import ConfigError
from greenstack.federated import (
    GeoTraining,
    OuterOptimizer,
    ParticipationRule,
    check_federated,
    decide_participation,
    parse_regions,
    rank_regions,
    topk_with_error_feedback,
    weighted_dense_average,
    weighted_sparse_average,
)
from greenstack.federated.core import flat_params, load_flat_params_

REGIONS = {"a": {"capacity": 2, "role": "coordinator", "carbon": {"kind": "static", "intensity_g_per_kwh": 100}},
           "b": {"capacity": 1, "carbon": {"kind": "embedded", "zone": "GB"}}}


def test_topk_sends_the_largest_fraction_and_keeps_the_rest_as_error():
    update = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, 0.3, -0.4, 0.5])
    error = torch.zeros(10)
    idx, val = topk_with_error_feedback(update, error, ratio=0.2)
    assert sorted(idx.tolist()) == [1, 3] and sorted(val.tolist()) == [-5.0, 3.0]
    assert error[1] == 0 and error[3] == 0 and error[6] == 1.0  # unsent coordinates are owed, not lost
    # the owed part is added to the next update: coordinate 6 (1.0 + 1.0) (2.0) beats 9 (0.5 owed + 1.4)
    idx2, val2 = topk_with_error_feedback(torch.tensor([0, 0, 0, 0, 0, 0, 1.0, 0, 0, 1.4]), error, ratio=0.1)
    assert idx2.tolist() == [6] and val2.tolist() == [2.0]
    with pytest.raises(ValueError):
        topk_with_error_feedback(update, error, ratio=0.0)


@pytest.fixture
def one_thread():
    """Tiny matmuls: OpenMP threads only spin against each other on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_topk_with_error_feedback_converges_on_a_toy_least_squares_problem(one_thread):
    """4 simulated workers, local SGD, 10 % of coordinates sent per round: reaches the optimum, like dense."""
    g = torch.Generator().manual_seed(0)
    dim, workers = 50, 4
    true_w = torch.randn(dim, generator=g)
    xs = [torch.randn(200, dim, generator=g) for _ in range(workers)]
    ys = [x @ true_w for x in xs]

    def train(ratio: float | None, rounds: int = 200) -> float:
        anchor = torch.zeros(dim)
        errors = [torch.zeros(dim) for _ in range(workers)]
        for _ in range(rounds):
            idxs, vals, dense = [], [], []
            for i in range(workers):
                w = anchor.clone()
                for _ in range(4):  # local steps
                    w -= 0.01 * 2 * xs[i].T @ (xs[i] @ w - ys[i]) / len(ys[i])
                if ratio is None:
                    dense.append(anchor - w)
                else:
                    idx, val = topk_with_error_feedback(anchor - w, errors[i], ratio)
                    idxs.append(idx)
                    vals.append(val)
            step = weighted_dense_average(dense, [1.0] * workers) if ratio is None else \
                weighted_sparse_average(dim, idxs, vals, [1.0] * workers)
            anchor -= step
        return float((anchor - true_w).norm() / true_w.norm())

    assert train(None) < 1e-3
    assert train(0.1) < 1e-2  # compressed 10x, still converges (no error feedback would stall coordinates)


def test_weighted_average_counts_work_and_ignores_workers_that_sat_out():
    idx = [torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32),
           torch.tensor([0], dtype=torch.int32)]
    val = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, 4.0]), torch.tensor([100.0])]
    out = weighted_sparse_average(3, idx, val, [3.0, 1.0, 0.0])
    assert out.tolist() == pytest.approx([0.75, 0.75 + 1.0, 1.0])
    assert weighted_sparse_average(3, idx, val, [0.0, 0.0, 0.0]).tolist() == [0.0, 0.0, 0.0]
    dense = weighted_dense_average([torch.ones(2), torch.zeros(2)], [1.0, 3.0])
    assert dense.tolist() == [0.25, 0.25]


def test_outer_optimizer_plain_averaging_and_batchnorm_statistics_without_momentum():
    anchor = torch.tensor([1.0, 1.0, 0.5])
    OuterOptimizer(lr=1.0).step(anchor, torch.tensor([0.5, -0.5, 0.1]))
    assert anchor.tolist() == pytest.approx([0.5, 1.5, 0.4])
    outer = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True)
    anchor = torch.tensor([0.0, 0.0, 1.0])
    for _ in range(3):
        outer.step(anchor, torch.tensor([1.0, 1.0, 0.2]), plain_from=2)
    assert anchor[2].item() == pytest.approx(1.0 - 3 * 0.2)  # buffers: plain average, never extrapolated
    assert anchor[0].item() < -3 * 0.7  # parameters: momentum accelerates


def test_flat_params_round_trip_includes_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3))
    flat = flat_params(model)
    assert flat.numel() == 3 * 4 + 4 + 4 + 4 + 4 + 4  # weight, bias, bn weight/bias, running mean/var
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    load_flat_params_(other, flat)
    assert torch.equal(flat_params(other), flat)


def _synthetic_trace(values: list[float], start: datetime) -> SeriesSource:
    times = [start + timedelta(hours=h) for h in range(len(values))]
    df = pd.DataFrame({"timestamp": pd.to_datetime(times, utc=True), "carbon_intensity": values})
    return SeriesSource(df, name="synthetic")


def test_participation_skips_the_high_carbon_region_on_a_synthetic_trace():
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    clean = _synthetic_trace([100.0] * 6, start)
    dirty_at_night = _synthetic_trace([700.0, 700.0, 700.0, 110.0, 90.0, 120.0], start)
    rule = ParticipationRule(mode="carbon_aware", margin=0.5)
    plans = [rule.steps({"clean": clean.at(start + timedelta(hours=h)).value,
                         "dirty": dirty_at_night.at(start + timedelta(hours=h)).value}, 8) for h in range(6)]
    assert [p["dirty"] for p in plans] == [0, 0, 0, 8, 8, 8]  # sits out only while its grid is dirty
    assert all(p["clean"] == 8 for p in plans[:3])
    assert plans[4]["clean"] == 8  # 100 g is within the margin of the 90 g region: both work
    # threshold rule, fewer steps instead of sitting out, the cleanest never sits out, uniform ignores carbon
    assert decide_participation({"a": 300, "b": 500}, 8, threshold_g_per_kwh=400, margin=None,
                                dirty_steps_fraction=0.5) == {"a": 8, "b": 4}
    assert decide_participation({"a": 900, "b": 800}, 8, threshold_g_per_kwh=100, margin=None) == {"a": 0, "b": 8}
    assert decide_participation({"a": 900, "b": 100}, 8, mode="uniform") == {"a": 8, "b": 8}


def test_regions_fill_ranks_coordinator_first():
    regions = parse_regions({"w": {"capacity": 1, "carbon": {"kind": "embedded", "zone": "DE-LU"}}, **REGIONS})
    assert [r.name for r in rank_regions(regions)] == ["a", "a", "w", "b"]


def _problems(**kwargs) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        GeoTraining(**kwargs)
    return {p.key: p.reason for p in info.value.problems}


def test_bad_geo_configs_are_all_reported_at_once():
    got = _problems(regions={"a": {"capacity": 1, "role": "coordinator"},
                             "b": {"capacity": 1, "carbon": {"kind": "embedded", "zone": "Atlantis"}}},
                    compression={"kind": "topk", "ratio": 1.5}, local_steps=0)
    assert "region has no carbon source" in got["federated.regions.a.carbon"]
    assert any(k.startswith("federated.regions.b.carbon") for k in got)  # unknown zone, named with its region
    assert got["federated.compression.ratio"] == "must be in (0, 1]"
    assert "federated.local_steps" in got
    for bad in (0, -0.1, 0.0):
        assert "federated.compression.ratio" in _problems(regions=REGIONS, compression={"kind": "topk", "ratio": bad})
    zero = _problems(regions={"a": {"capacity": 0, "carbon": {"zone": "GB"}}, "b": {"capacity": 0, "carbon": {"zone": "GB"}}})
    assert "total capacity is zero" in zero["federated.regions"]
    GeoTraining(regions=REGIONS, compression={"kind": "topk", "ratio": 1.0})  # 1 is allowed (no compression)


def test_world_size_that_does_not_match_the_regions_is_a_config_problem(monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"federated": {"_target_": "greenstack.federated.GeoTraining", "regions": REGIONS}})
    monkeypatch.delenv("RANK", raising=False)
    assert check_federated(cfg) == []  # greenstack spawns the 3 workers itself
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    problems = check_federated(cfg)
    assert len(problems) == 1 and "2 processes" in problems[0].reason and "3" in problems[0].reason
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert check_federated(cfg) == []


def test_validate_lists_federated_problems_with_the_rest(monkeypatch):
    from greenstack.compose import compose_with_problems
    from greenstack.validate import validate_config

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "7")
    cfg, found = compose_with_problems(["federated=geo", "federated.compression.ratio=0",
                                        "~federated.regions.us-west.carbon", "optim.lr=-1"])
    assert not found and cfg is not None
    keys = {p.key for p in validate_config(cfg)}
    assert {"federated.compression.ratio", "federated.regions.us-west.carbon", "optim.lr"} <= keys
    assert "federated" in keys  # WORLD_SIZE=7 vs the YAML's 4 workers


def test_shards_are_disjoint_equal_and_keep_length_grouping():
    from torch.utils.data import DataLoader, TensorDataset

    from greenstack.efficiency.sampler import LengthGroupedSampler
    from greenstack.federated.launch import shard_loader

    ds = TensorDataset(torch.arange(50))
    lengths = [i % 7 + 1 for i in range(50)]
    g = torch.Generator().manual_seed(0)
    grouped = DataLoader(ds, batch_size=4, sampler=LengthGroupedSampler(ds, lengths, generator=g, group_by_length=True,
                                                                        bucket_size=8), generator=g)
    plain = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    for loader in (grouped, plain):
        shards = [shard_loader(loader, r, 3) for r in range(3)]
        seen = [sorted(int(x) for (b,) in s for x in b) for s in shards]
        assert [len(s) for s in seen] == [16, 16, 16]  # equal: 50 // 3 each, the remainder is dropped
        assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2])
    sampler = shard_loader(grouped, 1, 3).sampler
    assert isinstance(sampler, LengthGroupedSampler) and sampler.group_by_length
    assert sampler.lengths == [lengths[i] for i in range(1, 48, 3)]


def test_the_first_non_peer_failure_note_names_the_cause(tmp_path):
    from greenstack.federated.launch import FAILURE_DIR, first_marked_failure, mark_failure

    mark_failure(tmp_path, 0, RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:25832"))
    mark_failure(tmp_path, 2, RuntimeError("injected failure on rank 2"))
    mark_failure(tmp_path, 1, ValueError("later, unrelated"))
    folder = tmp_path / FAILURE_DIR
    notes = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    notes["rank-0.json"]["at"] = 0.0  # the lost-peer report came first: still not the cause
    (folder / "rank-0.json").write_text(json.dumps(notes["rank-0.json"]))
    assert first_marked_failure(folder) == (2, "RuntimeError: injected failure on rank 2")
    assert first_marked_failure(tmp_path / "nothing") is None
