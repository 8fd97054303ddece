"""The Cityscapes reader on tiny trees in the cityscapesScripts layout (tests/data_fixtures.py)."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from data_fixtures import (CITYSCAPES_TRAIN_IDS, city_mask, train_ids, unimatch_city_lines, write_cityscapes,
                           write_partition_files)
from PIL import Image
from torch import nn

from sslray.config import DataConfig, TrialConfig
from sslray.data.cityscapes import LUT, CityscapesSource
from sslray.data.datasets import build_data
from sslray.data.readers import DataError, NonStandardSplitWarning
from sslray.data.splits import SplitEntry
from sslray.evaluate import evaluate, predict
from sslray.trainer import fit

pytestmark = pytest.mark.filterwarnings("ignore:.*validation samples, not the published:UserWarning")


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_cityscapes(root)


@pytest.fixture(scope="module")
def city_label_ids_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes_ids")
    return root, write_cityscapes(root, train_ids_files=False)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="cityscapes", root=str(root), crop_size=40, batch_size_x=2, batch_size_u=2, **kw)


def test_lookup_table_is_the_documented_one():
    expected = np.full(256, 255, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        expected[label_id] = train_id
    assert np.array_equal(LUT, expected)
    cps_trans_labels = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # CPS's view
    assert [int(np.flatnonzero(LUT == t)[0]) for t in range(19)] == cps_trans_labels


def test_label_ids_map_to_train_ids(city, city_label_ids_only):
    (root, paths), (ids_root, ids_paths) = city, city_label_ids_only
    assert paths == ids_paths  # same seed: same images and label ids
    with_train_ids, only_ids = CityscapesSource(root), CityscapesSource(ids_root)
    for image in paths["train"] + paths["val"]:
        entry = SplitEntry(image, city_mask(image))
        a, a_path = with_train_ids.mask_array(entry)
        b, b_path = only_ids.mask_array(entry)
        assert a_path.name.endswith("_gtFine_labelTrainIds.png") and b_path.name.endswith("_gtFine_labelIds.png")
        raw = np.array(Image.open(b_path))
        assert np.array_equal(a, b) and np.array_equal(b, train_ids(raw))
        assert set(np.unique(b)) <= set(range(19)) | {255}
    a = build_data(_cfg(root, partition="2"))
    b = build_data(_cfg(ids_root, partition="2"))
    assert torch.equal(a.labeled[(1, 4)]["mask_x"], b.labeled[(1, 4)]["mask_x"])
    assert torch.equal(a.val[0]["mask"], b.val[0]["mask"])


def test_label_ids_above_33_are_an_error(city_label_ids_only, tmp_path):
    root, paths = tmp_path / "tree", city_label_ids_only[1]
    shutil.copytree(city_label_ids_only[0], root)
    src = CityscapesSource(root)
    entry = SplitEntry(paths["train"][0], city_mask(paths["train"][0]))
    raw_path = root / entry.mask.replace("labelTrainIds", "labelIds")
    raw = np.array(Image.open(raw_path))
    raw[0, 0] = 40
    Image.fromarray(raw, "L").save(raw_path)
    with pytest.raises(DataError, match=r"_gtFine_labelIds\.png: label ids \[40\] outside 0..33"):
        src.mask_array(entry)


def test_split_dialects_parse_to_the_same_samples(city, tmp_path):
    root, paths = city
    train = paths["train"]
    stems = [p.rsplit("/", 1)[1].removesuffix("_leftImg8bit.png") for p in train]
    files = {
        "unimatch": unimatch_city_lines(train, trailing_newline=False),
        "u2pl": "\n".join(train) + "\n",  # image path only
        "cps": "".join(f"/images/train/{s}.png\t/segmentation/train/{s}_gtFine.png\n" for s in stems),
    }
    src = CityscapesSource(root)
    expected = tuple(SplitEntry(p, city_mask(p)) for p in train)
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text)
        assert src.read_list(tmp_path / f"{name}.txt").entries == expected, name
    (tmp_path / "v2.txt").write_text(f"{train[0]} None\n")  # UniMatch-V2 train_extra lines: no mask
    assert src.read_list(tmp_path / "v2.txt").entries == (SplitEntry(train[0], None),)
    (tmp_path / "odd.txt").write_text("somewhere/else.png\n")
    with pytest.raises(ValueError, match="odd.txt:1: cannot derive the mask"):
        src.read_list(tmp_path / "odd.txt")


def test_lists_scanned_without_splits_dir_and_partitions(city, tmp_path):
    root, paths = city
    src = CityscapesSource(root)
    assert [e.image for e in src.pool_list().entries] == sorted(paths["train"])
    assert [e.image for e in src.val_list().entries] == sorted(paths["val"])
    with pytest.warns(NonStandardSplitWarning, match="'1_16' of cityscapes was drawn with split_seed 3"):
        drawn = build_data(_cfg(root, partition="1_16", split_seed=3)).partition
    assert len(drawn.labeled) == 1 and len(drawn.unlabeled) == 3 and drawn.origin.startswith("generated from")
    splits = tmp_path / "splits"
    write_partition_files(splits / "cityscapes" / "mine", unimatch_city_lines(paths["train"][:1]),
                          "\n".join(paths["train"][1:]))  # the unlabeled file in the U2PL dialect
    (splits / "cityscapes" / "val.txt").write_text(unimatch_city_lines(paths["val"][:1]))
    data = build_data(_cfg(root, partition="mine", splits_dir=str(splits)))
    assert [e.image for e in data.partition.labeled] == paths["train"][:1] and len(data.val) == 1


class Recorder(nn.Module):
    """Per-pixel linear model (a window's prediction equals the whole image's there) that records window sizes."""

    def __init__(self, k: int = 19):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.calls = nn.Conv2d(3, k, 1), []

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return {"logits": self.conv(x)}


@pytest.mark.parametrize("mode,windows", [
    # 48 x 96 image, window 40, stride int(40 * 2 / 3) = 26. V1: rows {0, 26}, cols {0, 26, 52, 78}, edges cut.
    ("sliding_window", [(40, 40), (40, 40), (40, 40), (40, 18), (22, 40), (22, 40), (22, 40), (22, 18)]),
    # V2: the last window shifted inside: rows {0, 8}, cols {0, 26, 52, 56}
    ("sliding_window_v2", [(40, 40)] * 8),
])
def test_sliding_window_on_images_larger_than_the_window(city, mode, windows):
    root, _ = city
    data = build_data(_cfg(root, partition="2", eval_mode=None if mode == "sliding_window" else mode))
    assert data.eval_mode == mode and data.crop_size == 40  # the spec's default unless data.eval_mode says
    img = data.val[0]["img"].unsqueeze(0)
    assert img.shape[-2:] == (48, 96)
    model = Recorder()
    scores = predict(model, img, mode, data.crop_size, 19)
    assert model.calls == windows
    whole = model(img)["logits"]
    assert torch.equal(scores.argmax(1), whole.argmax(1))
    out = evaluate(model, data.val, 19, data.eval_mode, data.crop_size, "cpu", data.class_names)
    assert int(torch.tensor(out["val/confusion"]).sum()) == sum(int((data.val[i]["mask"] != 255).sum())
                                                                for i in range(len(data.val)))


def test_two_training_steps_on_a_cityscapes_tree_with_ohem(city, tmp_path):
    root, _ = city
    cfg = TrialConfig.from_dict({
        "data": {"dataset": "cityscapes", "root": str(root), "partition": "2", "crop_size": 40, "batch_size_x": 2,
                 "batch_size_u": 2},
        "model": {"name": "small", "width": 8},
        "method": {"name": "fixmatch", "conf_thresh": 0.0, "terms": {"x": {"criterion": "ohem", "ohem_min_kept": 500}}},
        "train": {"iterations": 2, "eval_every": 2}, "run": {"checkpoint": False, "out_dir": str(tmp_path / "run")}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonStandardSplitWarning)
        m = fit(cfg)
    assert 0 <= m["val/miou"] <= 100 and len(m["val/confusion"]) == 19 and "val/iou/traffic light" in m
