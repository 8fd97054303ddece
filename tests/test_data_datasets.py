import dataclasses

import numpy as np
import pytest
import torch

from sslray.config import AugConfig, DataConfig, SyntheticConfig
from sslray.data.datasets import (DATASETS, StreamSampler, SyntheticSource, batch_keys, build_data, get_spec,
                                  list_datasets, make_loader)
from sslray.data.splits import file_sha256
from sslray.data.synthetic import make_sample
from sslray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SMALL = DataConfig(partition="8", synthetic=SyntheticConfig(num_train=40, num_val=4))


@pytest.fixture(scope="module")
def data():
    return build_data(SMALL)


def test_registry():
    assert list_datasets() == ["cityscapes", "pascal", "synthetic", "synthetic_voc"]
    assert get_spec("synthetic") is DATASETS["synthetic"]
    pascal, city = get_spec("pascal"), get_spec("cityscapes")  # UniMatch's configs (datasets.md section 7)
    assert (pascal.num_classes, pascal.crop_size, pascal.eval_mode) == (21, 321, "original")
    assert (city.num_classes, city.crop_size, city.eval_mode) == (19, 801, "sliding_window")
    assert len(pascal.class_names) == len(pascal.palette) == 21 and pascal.palette[20] == (0, 64, 128)
    assert len(city.class_names) == len(city.palette) == 19 and city.class_names[-1] == "bicycle"
    with pytest.raises(ValueError, match="synthetic"):
        get_spec("nope")


def test_synthetic_source():
    src = SyntheticSource(SMALL.synthetic)
    pool, val = src.train_pool(), src.val_entries()
    assert len(pool) == 40 and len(val) == 4
    assert pool[17].line() == "images/000017.png masks/000017.png"
    assert val[3].line() == "val/images/000003.png val/masks/000003.png"
    img, mask = src.load(val[3])
    ref_img, ref_mask = make_sample(SMALL.synthetic.seed, 900003, 64)
    assert img.mode == "RGB" and mask.mode == "L"
    assert (np.array(img) == ref_img).all() and (np.array(mask) == ref_mask).all()
    assert src.load(pool[3], with_mask=False)[1] is None


def test_build_data(data, tmp_path):
    assert len(data.labeled) == 8 and len(data.unlabeled) == 32 and len(data.val) == 4
    assert data.crop_size == 64 and data.eval_mode == "original" and data.num_classes == 3
    on_disk = build_data(SMALL, workdir=str(tmp_path))
    assert on_disk.split_sha256 == data.split_sha256 == data.partition.sha256()
    for name in ("labeled", "unlabeled"):
        assert file_sha256(tmp_path / "splits" / f"{name}.txt") == data.split_sha256[name]
    other = build_data(dataclasses.replace(SMALL, crop_size=48, eval_mode="center_crop", split_seed=1))
    assert other.crop_size == 48 and other.eval_mode == "center_crop"
    assert other.split_sha256 != data.split_sha256


def test_labeled_item(data):
    d = data.labeled[(3, 11)]
    assert d["img_x"].shape == (3, 64, 64) and d["img_x"].dtype == torch.float32
    assert d["mask_x"].shape == (64, 64) and d["mask_x"].dtype == torch.long
    assert set(d["mask_x"].unique().tolist()) <= {0, 1, 2, 3, 255}
    again = data.labeled[(3, 11)]
    assert torch.equal(d["img_x"], again["img_x"]) and torch.equal(d["mask_x"], again["mask_x"])
    with pytest.raises(TypeError, match="aug_seed"):
        data.labeled[3]


def test_unlabeled_item(data):
    d = data.unlabeled[(5, 99)]
    for k in ("img_u_w", "img_u_s1", "img_u_s2"):
        assert d[k].shape == (3, 64, 64) and d[k].dtype == torch.float32
    assert d["ignore_mask_u"].shape == (64, 64) and d["ignore_mask_u"].dtype == torch.long
    assert set(d["ignore_mask_u"].unique().tolist()) <= {0, 255}
    for k in ("cutmix_box1", "cutmix_box2"):
        assert d[k].shape == (64, 64) and d[k].dtype == torch.float32 and set(d[k].unique().tolist()) <= {0.0, 1.0}
    again = data.unlabeled[(5, 99)]
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(d["img_u_s1"], data.unlabeled[(5, 100)]["img_u_s1"])


def test_ignore_mask_is_exactly_the_padding():
    # Crop 96 > 64 and scale <= 1: every view is padded right/bottom (hflip off keeps it there).
    cfg = dataclasses.replace(SMALL, crop_size=96, aug=AugConfig(scale=(0.5, 1.0), hflip_p=0.0))
    data = build_data(cfg)
    pad_pixel = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None, None]  # a 0 pixel, normalised
    for seed in range(3):
        d = data.unlabeled[(seed, seed)]
        ign = d["ignore_mask_u"]
        w, h = int((ign[0] == 0).sum()), int((ign[:, 0] == 0).sum())
        assert 32 <= w <= 64 and w == h
        expected = torch.zeros(96, 96, dtype=torch.long)
        expected[h:, :] = 255
        expected[:, w:] = 255
        assert torch.equal(ign, expected)
        img_w = d["img_u_w"]
        assert torch.allclose(img_w[:, h:, :], pad_pixel.expand(3, 96 - h, 96))
        assert torch.allclose(img_w[:, :, w:], pad_pixel.expand(3, 96, 96 - w))
        lab = data.labeled[(seed, seed)]["mask_x"]
        assert (lab[expected == 255] == 255).all()


def test_val_item(data):
    d = data.val[2]
    assert d["img"].shape == (3, 64, 64) and d["mask"].shape == (64, 64) and d["index"] == 2
    assert set(d["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}


def test_batch_keys_world_size_invariance():
    for it in range(4):
        full = batch_keys(10, 4, seed=1, stream=2, iteration=it)
        r0 = batch_keys(10, 4, seed=1, stream=2, iteration=it, rank=0, world=2)
        r1 = batch_keys(10, 4, seed=1, stream=2, iteration=it, rank=1, world=2)
        assert [r0[0], r1[0], r0[1], r1[1]] == full
    with pytest.raises(ValueError, match="divisible"):
        batch_keys(10, 3, 0, 0, 0, rank=0, world=2)


def test_batch_keys_epochs_cover_every_index_once():
    n, b = 7, 4  # batches straddle epochs
    keys = [k for it in range(7) for k in batch_keys(n, b, seed=0, stream=0, iteration=it)]
    for e in range(4):
        assert sorted(i for i, _ in keys[e * n:(e + 1) * n]) == list(range(n))
    assert keys[:n] != keys[n:2 * n]  # a new order each epoch
    assert len({s for _, s in keys}) == len(keys)  # every position its own augmentation
    assert batch_keys(n, b, 0, 1, 0) != batch_keys(n, b, 0, 0, 0)  # streams are independent


def test_sampler_resume():
    full = list(StreamSampler(13, 4, seed=3, stream=1, start_iter=0, num_iters=6))
    assert list(StreamSampler(13, 4, seed=3, stream=1, start_iter=4, num_iters=2)) == full[4:]
    assert len(StreamSampler(13, 4, 3, 1, 0, 6)) == 6


def test_loader_workers_match_single_process(data):
    def batches(workers):
        loader = make_loader(data.unlabeled, len(data.unlabeled), 4, seed=0, stream=1, start_iter=2, num_iters=2,
                             num_workers=workers)
        return list(loader)

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 2
    for a, b in zip(single, multi):
        assert a["img_u_s1"].shape == (4, 3, 64, 64)
        assert all(torch.equal(a[k], b[k]) for k in a)
