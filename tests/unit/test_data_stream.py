"""data=stream: shards read on the fly; a preempted run resumes at the next unseen sample."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
import torch

from greenstack.data import stream
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.errors import ConfigError
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing, Preempted
from greenstack.tasks import CausalLM, Classification

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_shards(root, n_shards=4, rows=10):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with (root / f"part-{s:03d}.jsonl").open("w") as f:
            for r in range(rows):
                f.write(json.dumps({"text": f"shard {s} row {r} " + "ab" * (r % 5), "label": "pos" if r % 2 else "neg"})
                        + "\n")
    return root


class _Ids(Policy):
    """Records the sample ids of every batch the loop trains on; requests preemption at `stop_at`."""

    events = frozenset({Event.BATCH_START, Event.AFTER_FORWARD})

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__(name="ids")
        self.seen: list[str] = []
        self.stop_at = stop_at

    def __call__(self, event, state, reporter):
        if event is Event.BATCH_START:
            self.seen += state.batch["ids"]
        elif self.stop_at is not None and state.step == self.stop_at:
            state.preemption.request(signal.SIGUSR2)

    def state_dict(self):
        return {}


def _fit(data, policies, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(258, 8), torch.nn.Linear(8, 258))
    model.forward = lambda input_ids, attention_mask=None, _m=model: torch.nn.Sequential.forward(_m, input_ids)
    trainer = Trainer(model, data.train, Optim(lr=0.05), TrainerConfig(max_duration=f"{steps}ba", progress=False,
                      device="cpu", eval_interval=f"{steps}ba"), policies=policies, batch_size=data.batch_size,
                      task=CausalLM())
    return trainer.fit()


def test_rows_are_lm_samples_with_ids_and_an_epoch_covers_every_row_once(tmp_path):
    data = stream(str(_write_shards(tmp_path / "shards")), batch_size=6, max_length=16)
    assert len(data.train.dataset) == 40 and data.target == "next_token" and data.num_classes == 258
    ids = [i for batch in data.train for i in batch["ids"]]
    assert sorted(ids) == sorted(f"part-{s:03d}.jsonl:{r}" for s in range(4) for r in range(10))
    again = [i for batch in data.train for i in batch["ids"]]
    assert again != ids and sorted(again) == sorted(ids)  # the next epoch visits the shards in another order
    batch = next(iter(data.train))
    x, y = batch["inputs"]["input_ids"], batch["labels"]
    assert x.shape == y.shape and x.shape[1] <= 16
    first = batch["inputs"]["attention_mask"][0].sum()
    assert torch.equal(x[0, 1:first], y[0, : first - 1]) and (y[0, first:] == -100).all()


def test_a_preempted_and_resumed_stream_sees_exactly_the_uninterrupted_samples(tmp_path):
    shards = str(_write_shards(tmp_path / "shards"))
    steps = 16  # 7 batches an epoch: crosses two epoch boundaries
    reference = _Ids()
    _fit(stream(shards, batch_size=6, max_length=16), [reference], steps)
    assert len(reference.seen) == 6 * 14 + 6 * 2 - 4  # 7 batches an epoch, the last of 4 rows
    first = _Ids(stop_at=9)  # requested during step 10 (second epoch): saved after it
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Preempted):
        _fit(stream(shards, batch_size=6, max_length=16),
             [first, HierarchicalCheckpointing(memory_every=1, local_every=100, local_dir=ckpt)], steps)
    assert os.path.isdir(os.path.join(ckpt, "step-000000010"))
    resumed = _Ids()
    state = _fit(stream(shards, batch_size=6, max_length=16),
                 [resumed, HierarchicalCheckpointing(memory_every=1, local_every=100, local_dir=ckpt, resume="auto")],
                 steps)
    assert state.step == steps
    assert first.seen + resumed.seen == reference.seen


def test_labelled_stream_and_clear_errors(tmp_path):
    shards = str(_write_shards(tmp_path / "shards", n_shards=2, rows=4))
    data = stream(shards, label_column="label", classes=["neg", "pos"], batch_size=4)
    batch = next(iter(data.train))
    assert data.target == "class" and batch["labels"].tolist() == [0, 1, 0, 1]
    loss = Classification().loss(torch.zeros(4, 2), batch)
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="list of classes"):
        stream(shards, label_column="label")
    with pytest.raises(ConfigError, match="no such file"):
        stream(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not one of data.classes"):
        list(stream(shards, label_column="label", classes=["neg"], batch_size=4).train)


@pytest.mark.s3
def test_parquet_shards_on_s3(tmp_path):
    endpoint = os.environ.get("GREENSTACK_TEST_S3_ENDPOINT")
    if not endpoint:
        if os.environ.get("CI"):
            pytest.fail("CI must start the S3 server (tests/infra/s3_ceph_rgw.sh) and set GREENSTACK_TEST_S3_ENDPOINT")
        pytest.skip("no S3 server: run tests/infra/s3_ceph_rgw.sh and set GREENSTACK_TEST_S3_ENDPOINT")
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    opts = {"key": os.environ.get("GREENSTACK_TEST_S3_KEY", "testkey"),
            "secret": os.environ.get("GREENSTACK_TEST_S3_SECRET", "testsecret"),
            "client_kwargs": {"endpoint_url": endpoint}, "use_listings_cache": False}
    fs = fsspec.filesystem("s3", **opts)
    bucket = f"greenstack-stream-{uuid.uuid4().hex[:8]}"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for s in range(2):
        with fs.open(f"{bucket}/shards/part-{s}.parquet", "wb") as f:
            pq.write_table(pa.table({"text": [f"s3 shard {s} row {r}" for r in range(5)]}), f)
    data = stream(f"s3://{bucket}/shards/", batch_size=4, storage_options=opts, shuffle_shards=False)
    ids = [i for batch in data.train for i in batch["ids"]]
    assert ids == [f"part-{s}.parquet:{r}" for s in range(2) for r in range(5)]
