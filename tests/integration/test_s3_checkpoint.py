"""The durable checkpoint tier against a real S3 server (Ceph RADOS Gateway, started by .ci/run)."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from greenstack.checkpoint.store import Store
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing

ENDPOINT = os.environ.get("GREENSTACK_TEST_S3_ENDPOINT")
pytestmark = pytest.mark.s3


@pytest.fixture
def s3():
    if not ENDPOINT:
        if os.environ.get("CI"):
            pytest.fail("CI must start the S3 server (tests/infra/s3_ceph_rgw.sh) and set GREENSTACK_TEST_S3_ENDPOINT")
        pytest.skip("no S3 server: run tests/infra/s3_ceph_rgw.sh and set GREENSTACK_TEST_S3_ENDPOINT")
    options = {"key": os.environ.get("GREENSTACK_TEST_S3_KEY", "testkey"),
               "secret": os.environ.get("GREENSTACK_TEST_S3_SECRET", "testsecret"),
               "client_kwargs": {"endpoint_url": ENDPOINT}, "use_listings_cache": False}
    return f"s3://greenstack-test-{uuid.uuid4().hex[:8]}/run", options


def _trainer(policy, steps, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.DataLoader([(x[i], (x[i, 0] > 0).long()) for i in range(64)], batch_size=8,
                                       shuffle=True, generator=torch.Generator().manual_seed(seed),
                                       collate_fn=lambda b: {"inputs": torch.stack([t[0] for t in b]),
                                                             "labels": torch.stack([t[1] for t in b])})
    return Trainer(model, data, Optim(lr=0.05), TrainerConfig(max_duration=f"{steps}ba", progress=False),
                   policies=[policy], batch_size=8)


def test_durable_tier_on_real_s3_resumes_exactly(s3, tmp_path):
    url, options = s3
    reference = _trainer(HierarchicalCheckpointing(local_every=0, durable_every=0), 12).fit().model.state_dict()

    first = HierarchicalCheckpointing(local_every=0, durable_every=3, durable_keep=2, durable_url=url,
                                      storage_options=options)
    _trainer(first, 6).fit()
    store = Store(url, options)
    assert store.names() == ["step-000000006", "step-000000003"]
    assert first.tiers["durable"].errors == []
    # the object-store checkpoint has every file plus the manifest
    assert sorted(store.read("step-000000006")) == ["manifest.json", "model.safetensors", "state.json",
                                                    "trainer.pt"]

    second = HierarchicalCheckpointing(local_every=0, durable_every=3, durable_url=url, storage_options=options,
                                       resume="auto")
    resumed = _trainer(second, 12, seed=99)  # different init: everything must come from the checkpoint
    state = resumed.fit()
    assert second.resumed_from.endswith("step-000000006") and state.step == 12
    for key, value in reference.items():
        assert torch.equal(value, state.model.state_dict()[key]), key
    assert store.names()[0] == "step-000000012" and len(store.names()) == 2  # retention kept 2
