"""The Pascal VOC reader on tiny trees in the exact published formats (tests/data_fixtures.py)."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from data_fixtures import unimatch_voc_lines, write_partition_files, write_voc
from PIL import Image

from sslray import cli
from sslray.config import DataConfig, SyntheticConfig, TrialConfig
from sslray.data.datasets import build_data
from sslray.data.fingerprints import fingerprint
from sslray.data.readers import DataError, MissingDataError, NonStandardSplitWarning
from sslray.data.splits import SplitEntry
from sslray.data.voc import VOCSource, color_map
from sslray.trainer import fit

# Fixture val lists are never the published 1,449 images; that warning is tested in test_paper_studies.py.
pytestmark = pytest.mark.filterwarnings("ignore:.*validation samples, not the published:UserWarning")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, write_voc(root)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="pascal", root=str(root), crop_size=24, batch_size_x=2, batch_size_u=2, **kw)


def test_palette_matches_the_voc_colour_map():
    cmap = color_map()
    assert cmap[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert cmap[20].tolist() == [0, 64, 128] and cmap[255].tolist() == [224, 224, 192]


def test_palette_and_grayscale_masks_are_identical(voc):
    root, ids = voc
    p_src = VOCSource(root, mask_dir="SegmentationClass")
    l_src = VOCSource(root, mask_dir="SegmentationClassAug")
    assert VOCSource(root).mask_dir == "SegmentationClassAug"  # auto: the Aug folder wins when present
    assert Image.open(root / "SegmentationClass" / f"{ids['fine'][0]}.png").mode == "P"
    for ident in ids["train_aug"] + ids["val"]:
        # each reader given a line naming its own folder (a two-column line is read as written)
        (p, p_path), (q, q_path) = (src.mask_array(src.resolve(
            (f"JPEGImages/{ident}.jpg", f"{src.mask_dir}/{ident}.png"), "")) for src in (p_src, l_src))
        assert p_path.parent.name == "SegmentationClass" and q_path.parent.name == "SegmentationClassAug"
        assert p.dtype == np.uint8 and np.array_equal(p, q) and 255 in p and p[p != 255].max() <= 20
    a = build_data(_cfg(root, partition="2", mask_dir="SegmentationClass"))
    b = build_data(_cfg(root, partition="2", mask_dir="SegmentationClassAug"))
    for key in [(0, 3), (1, 8)]:
        assert torch.equal(a.labeled[key]["mask_x"], b.labeled[key]["mask_x"])
        assert torch.equal(a.labeled[key]["img_x"], b.labeled[key]["img_x"])
    assert torch.equal(a.val[1]["mask"], b.val[1]["mask"])


def test_split_dialects_parse_to_the_same_samples(voc, tmp_path):
    root, ids = voc
    files = {
        "unimatch": unimatch_voc_lines(ids["train_aug"], trailing_newline=False),  # as UniMatch's 92/labeled.txt
        "u2pl": "\n".join(ids["train_aug"]),  # bare ids, no final newline
        "cps_crlf": "".join(f"{i}\r\n" for i in ids["train_aug"]),  # CPS pseudoseg_*: CRLF
        "tabs_blank": "\n".join(f"  JPEGImages/{i}.jpg\tSegmentationClassAug/{i}.png " for i in ids["train_aug"])
                      + "\n\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_bytes(text.encode())
    # bare ids take their mask folder from data.mask_dir (unset: SegmentationClassAug, present here); a two-column
    # line keeps the folder it names, whatever data.mask_dir would say
    named = {"unimatch": "SegmentationClass", "tabs_blank": "SegmentationClassAug"}
    for mask_dir in ("SegmentationClass", "SegmentationClassAug", None):
        src = VOCSource(root, mask_dir=mask_dir)
        lists = {name: (src if mask_dir is None or name not in named else VOCSource(root)).read_list(
            tmp_path / f"{name}.txt") for name in files}
        for name, lst in lists.items():
            folder = named.get(name, mask_dir or "SegmentationClassAug")
            expected = tuple(SplitEntry(f"JPEGImages/{i}.jpg", f"{folder}/{i}.png") for i in ids["train_aug"])
            assert lst.entries == expected, (name, lst)
        assert lists["unimatch"].lines == tuple(range(1, len(expected) + 1))
        assert len({fingerprint(e.image for e in lst.entries) for lst in lists.values()}) == 1
    (tmp_path / "none.txt").write_text(f"JPEGImages/{ids['val'][0]}.jpg None\n")
    assert VOCSource(root).read_list(tmp_path / "none.txt").entries == (
        SplitEntry(f"JPEGImages/{ids['val'][0]}.jpg", None),)
    (tmp_path / "bad.txt").write_text("a b\na b c\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        VOCSource(root).read_list(tmp_path / "bad.txt")


def test_partitions_from_files_and_drawn(voc, tmp_path):
    root, ids = voc
    fine, pool = ids["fine"], ids["train_aug"]
    splits = tmp_path / "splits"
    shutil.copytree(root / "splits", splits)
    lab, unl = pool[:3], pool[3:]
    write_partition_files(splits / "pascal" / "3", unimatch_voc_lines(lab, False), "\n".join(unl) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_data(_cfg(root, partition="3", splits_dir=str(splits)))
    assert not [w for w in caught if "partition '" in str(w.message)]  # "3" is not a published name: no warning
    p = data.partition
    assert [e.image for e in p.labeled] == [f"JPEGImages/{i}.jpg" for i in lab]
    assert [e.image for e in p.unlabeled] == [f"JPEGImages/{i}.jpg" for i in unl]
    assert p.origin == str(splits / "pascal" / "3") and p.standard is None
    assert len(data.val) == len(ids["val"])
    # splits_dir may also point at the dataset's own folder
    assert build_data(_cfg(root, partition="3", splits_dir=str(splits / "pascal"))).partition.labeled == p.labeled

    # a count draws from the fine pool (classic), a ratio from train_aug (blended); the rest of train_aug is unlabeled
    classic = build_data(_cfg(root, partition="2", split_seed=1)).partition
    assert {e.image for e in classic.labeled} <= {f"JPEGImages/{i}.jpg" for i in fine}
    assert len(classic.unlabeled) == len(pool) - 2
    assert classic.origin.endswith(f"labeled from {root}/ImageSets/Segmentation/train.txt")
    blended = build_data(_cfg(root, partition="1_2", split_seed=1)).partition
    assert len(blended.labeled) == 4 and len(blended.unlabeled) == 4
    assert build_data(_cfg(root, partition="2", split_seed=1)).partition == classic  # seeded
    assert build_data(_cfg(root, partition="2", split_seed=2)).partition.labeled != classic.labeled

    with pytest.raises(MissingDataError, match=r"pascal/92/labeled\.txt: missing split file of the published"):
        build_data(_cfg(root, partition="92", splits_dir=str(splits)))
    with pytest.raises(ValueError, match="data.partition: .*a published split: set data.splits_dir"):
        build_data(_cfg(root, partition="92"))  # no splits_dir: drawn, but 92 > the 4 fine images
    write_partition_files(splits / "pascal" / "92", unimatch_voc_lines(lab), unimatch_voc_lines(unl))
    with pytest.warns(NonStandardSplitWarning, match="differs from the published UniMatch split"):
        build_data(_cfg(root, partition="92", splits_dir=str(splits)))


def test_quick_checks_name_the_file(voc, tmp_path):
    root, ids = voc
    pool = ids["train_aug"]
    tree = tmp_path / "voc"
    shutil.copytree(root, tree)
    splits = tree / "splits"

    def check(lab, unl, match, exc=DataError):
        write_partition_files(splits / "pascal" / "p", lab, unl)
        with pytest.raises(exc, match=match):
            build_data(_cfg(tree, partition="p", splits_dir=str(splits)))

    check("\n".join(pool[:2] + pool[:1]), "\n".join(pool[2:]), rf"{pool[0]}\.jpg: listed twice in the labeled list")
    check("\n".join(pool[:2]), "\n".join(pool[1:]), rf"{pool[1]}\.jpg: in both the labeled and the unlabeled list")
    check("", "\n".join(pool), "the labeled list is empty")
    check("\n".join(pool[:2]), "\n".join(pool[2:] + ids["val"][:1]), "in both the unlabeled and the val list")
    (tree / "JPEGImages" / f"{pool[5]}.jpg").unlink()
    check("\n".join(pool[:2]), "\n".join(pool[2:]),
          rf"{tree}/JPEGImages/{pool[5]}\.jpg: missing image \(unlabeled sample of partition p", MissingDataError)
    (tree / "SegmentationClassAug" / f"{pool[1]}.png").unlink()
    check("\n".join(pool[:2]), "\n".join(pool[2:]), rf"SegmentationClassAug/{pool[1]}\.png: missing mask "
                                                    r"\(labeled sample.*; 1 more missing files", MissingDataError)


def test_unlabeled_samples_need_no_mask(voc, tmp_path):
    root, ids = voc
    tree = tmp_path / "voc"
    shutil.copytree(root, tree)
    pool = ids["train_aug"]
    for i in pool[2:]:
        (tree / "SegmentationClassAug" / f"{i}.png").unlink()
    splits = tree / "splits"
    write_partition_files(splits / "pascal" / "p", unimatch_voc_lines(pool[:2]),
                          "".join(f"JPEGImages/{i}.jpg None\n" for i in pool[2:4]) + "\n".join(pool[4:]))
    data = build_data(_cfg(tree, partition="p", splits_dir=str(splits)))
    assert not data.unlabeled.with_truth  # no ground truth: no pseudo_acc, and nothing is read
    item = data.unlabeled[(3, 5)]
    assert "mask_u_true" not in item and item["img_u_w"].shape == (3, 24, 24)


def test_bad_label_values_stop_loading_with_the_file_named(voc, tmp_path):
    root, ids = voc
    tree = tmp_path / "voc"
    shutil.copytree(root, tree)
    ident = ids["fine"][0]
    lbl = np.array(Image.open(tree / "SegmentationClassAug" / f"{ident}.png"))
    lbl[3, 3] = 30
    Image.fromarray(lbl, "L").save(tree / "SegmentationClassAug" / f"{ident}.png")
    src = VOCSource(tree)
    with pytest.raises(DataError, match=rf"{ident}\.png: label values \[30\] outside 0..20 and 255"):
        src.load(src.resolve((ident,), ""))


def _fit(data: dict, tmp_path, method: str = "unimatch", **data_extra):
    cfg = TrialConfig.from_dict({
        "data": {"crop_size": 24, "batch_size_x": 2, "batch_size_u": 2, **data, **data_extra},
        "model": {"name": "small", "width": 8}, "method": {"name": method},
        "train": {"iterations": 2, "eval_every": 2}, "run": {"checkpoint": False, "out_dir": str(tmp_path / "run")}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonStandardSplitWarning)  # fixture lists are not the published ones
        return fit(cfg)


def test_two_training_steps_on_a_voc_tree(voc, tmp_path):
    root, _ = voc
    m = _fit({"dataset": "pascal", "root": str(root), "partition": "2"}, tmp_path)
    assert 0 <= m["val/miou"] <= 100 and len(m["val/confusion"]) == 21 and "val/iou/dining table" in m
    assert (tmp_path / "run" / "splits" / "labeled.txt").read_text().count("\n") == 2


def test_sslray_data_synth_trains_through_the_reader(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["data", "synth", "--out", str(out), "--size", "32", "--num-train", "24", "--num-val", "4",
                     "--partition", "8"]) == 0
    assert "wrote 24 train + 4 val images" in capsys.readouterr().out
    assert Image.open(out / "SegmentationClass" / "synth_000000.png").mode == "P"
    assert (out / "splits" / "8" / "labeled.txt").read_text().count("\n") == 8
    data = {"dataset": "synthetic_voc", "root": str(out), "splits_dir": str(out / "splits"), "partition": "8"}
    m = _fit(data, tmp_path, method="fixmatch")
    assert 0 <= m["val/miou"] <= 100 and len(m["val/confusion"]) == 3
    # the files hold the generator's pixels, and the written partition is the in-memory dataset's draw
    on_disk = build_data(DataConfig(**data, crop_size=24))
    in_memory = build_data(DataConfig(partition="8", crop_size=24,
                                      synthetic=SyntheticConfig(size=32, num_train=24, num_val=4)))
    for key in [(0, 1), (5, 2)]:
        a, b = on_disk.labeled[key], in_memory.labeled[key]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(on_disk.val[3]["img"], in_memory.val[3]["img"])
    assert [e.image.rsplit("_", 1)[1] for e in on_disk.partition.labeled] == \
        [e.image.rsplit("/", 1)[1] for e in in_memory.partition.labeled]
