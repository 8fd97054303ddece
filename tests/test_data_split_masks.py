"""Split files are the truth: a two-column line names the mask that trials read and ``sslray data check`` checks.

The VOC tree here has *different* labels in ``SegmentationClass/`` and ``SegmentationClassAug/`` (so a test sees
which one was opened), and its lists are verbatim lines of UniMatch's published ``pascal/92`` and ``pascal/val.txt``
(read from ``shared/splits/unimatch``, not copied): they name ``SegmentationClass/``, while the bare-id default on
this root is ``SegmentationClassAug/``.
"""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from data_fixtures import (city_mask, train_ids, unimatch_city_lines, unimatch_splits, write_cityscapes,
                           write_partition_files, write_voc_ids)
from PIL import Image

from sslray import cli
from sslray.config import DataConfig
from sslray.data.check import check_dataset
from sslray.data.datasets import build_data
from sslray.data.readers import DataError, MaskDirConflict, MissingDataError
from sslray.data.splits import SplitEntry
from sslray.data.voc import VOCSource

SPLITS = unimatch_splits()
pytestmark = [pytest.mark.skipif(SPLITS is None, reason="UniMatch split files (shared/splits/unimatch) not found"),
              # fixture lists are heads of the published ones, not the published lists
              pytest.mark.filterwarnings("ignore::sslray.data.readers.NonStandardSplitWarning")]
NAMED, AUG = "SegmentationClass", "SegmentationClassAug"


def _head(name: str, n: int) -> list[str]:
    return (SPLITS / "pascal" / name).read_text().splitlines()[:n]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root, {role: published lines}, {role: ids}, labels {folder: {id: array}}; partitions ``head`` (UniMatch
    lines) and ``bare`` (the same ids, U2PL dialect) under ``root/splits/pascal``."""
    root = tmp_path_factory.mktemp("voc_two_mask_folders")
    lines = {"labeled": _head("92/labeled.txt", 3), "unlabeled": _head("92/unlabeled.txt", 3),
             "val": _head("val.txt", 2)}
    ids = {role: [PurePosixPath(line.split()[0]).stem for line in ls] for role, ls in lines.items()}
    labels = write_voc_ids(root, sum(ids.values(), []))
    assert all(not np.array_equal(labels[NAMED][i], labels[AUG][i]) for i in labels[NAMED])
    splits = root / "splits" / "pascal"
    write_partition_files(splits / "head", "\n".join(lines["labeled"]) + "\n", "\n".join(lines["unlabeled"]) + "\n")
    write_partition_files(splits / "bare", "".join(i + "\n" for i in ids["labeled"]),
                          "".join(i + "\n" for i in ids["unlabeled"]))
    (splits / "val.txt").write_text("\n".join(lines["val"]) + "\n")
    return root, lines, ids, labels


def _cfg(root: Path, partition: str, **kw) -> DataConfig:
    return DataConfig(dataset="pascal", root=str(root), splits_dir=str(root / "splits"), partition=partition,
                      crop_size=24, batch_size_x=2, batch_size_u=2, **kw)


def _files(root: Path, partition: str = "head") -> list[str]:
    d = root / "splits" / "pascal"
    return [str(d / partition / "labeled.txt"), str(d / partition / "unlabeled.txt"), str(d / "val.txt")]


def test_a_trial_reads_the_mask_its_split_names(tree, tmp_path):
    root, lines, ids, labels = tree
    assert VOCSource(root).mask_dir == AUG  # the bare-id default on this root is not the folder the split names
    data = build_data(_cfg(root, "head"), workdir=tmp_path)
    assert [e.mask for e in data.partition.labeled] == [f"{NAMED}/{i}.png" for i in ids["labeled"]]
    for e, ident in zip(data.partition.labeled, ids["labeled"]):
        assert np.array_equal(np.array(data.labeled.source.load(e)[1]), labels[NAMED][ident])
    for k, ident in enumerate(ids["val"]):
        assert torch.equal(data.val[k]["mask"], torch.from_numpy(labels[NAMED][ident].astype(np.int64)))
    # the trial's record of its split is the published lines themselves
    assert (tmp_path / "splits" / "labeled.txt").read_text() == "\n".join(lines["labeled"]) + "\n"


def test_bare_ids_take_their_folder_from_data_mask_dir(tree):
    root, _, ids, labels = tree
    for mask_dir, folder in ((None, AUG), (NAMED, NAMED)):
        data = build_data(_cfg(root, "bare", mask_dir=mask_dir))
        for e, ident in zip(data.partition.labeled, ids["labeled"]):
            assert e.mask == f"{folder}/{ident}.png"
            assert np.array_equal(np.array(data.labeled.source.load(e)[1]), labels[folder][ident])
        # the val list of the same trial has a mask column: the folder it names, whatever data.mask_dir says
        assert [e.mask for e in data.val.entries] == [f"{NAMED}/{i}.png" for i in ids["val"]]


def test_a_missing_named_mask_is_one_line_naming_split_file_line_and_path(tree, tmp_path):
    src, _, ids, _ = tree
    root = tmp_path / "voc"
    shutil.copytree(src, root)
    ident = ids["labeled"][1]
    (root / NAMED / f"{ident}.png").unlink()  # SegmentationClassAug/<ident>.png is still there
    labeled = root / "splits" / "pascal" / "head" / "labeled.txt"
    with pytest.raises(MissingDataError) as caught:
        build_data(_cfg(root, "head"))
    assert str(caught.value) == (f"{root}/{NAMED}/{ident}.png: missing mask (labeled sample of partition head, "
                                 f"{labeled}:2) -- {AUG}/{ident}.png exists, but the list points at {NAMED}/")
    report = check_dataset("pascal", root, _files(root))
    assert report.errors == [(f"{root}/{NAMED}/{ident}.png", f"missing mask (listed in {labeled}:2) -- {AUG}/"
                                                              f"{ident}.png exists, but the list points at {NAMED}/")]


def test_an_explicit_mask_dir_that_contradicts_the_split_is_an_error(tree):
    root, _, ids, labels = tree
    lab, unl, val = _files(root)
    with pytest.raises(MaskDirConflict, match="^" + re.escape(
            f"{lab}:1: the split names mask {NAMED}/{ids['labeled'][0]}.png but data.mask_dir is '{AUG}'; "
            "data.mask_dir applies only to split files without a mask column (bare ids)")):
        build_data(_cfg(root, "head", mask_dir=AUG))
    # data check: one error per contradicting file, and the masks the split names are still checked
    report = check_dataset("pascal", root, [lab, unl, val], mask_dir=AUG)
    assert [(w, "(and 2 more lines)" in m) for w, m in report.errors] == [(f"{lab}:1", True), (f"{unl}:1", True),
                                                                          (f"{val}:1", False)]
    assert report.masks_checked == 5
    expected = np.bincount(np.concatenate([labels[NAMED][i].ravel() for i in ids["labeled"] + ids["val"]]),
                           minlength=256)
    assert report.class_pixels == expected[:21].tolist()
    # agreeing with the split is fine
    data = build_data(_cfg(root, "head", mask_dir=NAMED))
    assert [e.mask for e in data.partition.labeled] == [f"{NAMED}/{i}.png" for i in ids["labeled"]]


def test_data_check_prints_the_mask_folder_each_split_resolved_to(tree, capsys):
    root, _, ids, labels = tree
    head, bare = _files(root, "head"), _files(root, "bare")
    files = [head[0], bare[1], head[2]]  # labeled two-column, unlabeled bare ids, val two-column
    assert cli.main(["data", "check", "--dataset", "pascal", "--root", str(root)]
                    + sum((["--split", f] for f in files), [])) == 0
    out = capsys.readouterr().out
    assert f"{files[0]}: 3 labeled samples; masks: {NAMED}/ (named in the split file)" in out
    assert (f"{files[1]}: 3 unlabeled samples; masks: {AUG}/ (bare ids + data.mask_dir unset: {AUG} is under the "
            "root)") in out
    assert f"{files[2]}: 2 val samples; masks: {NAMED}/ (named in the split file)" in out
    assert cli.main(["data", "check", "--dataset", "pascal", "--root", str(root), "--mask-dir", NAMED,
                     "--split", bare[0]]) == 0
    assert f"{bare[0]}: 3 labeled samples; masks: {NAMED}/ (bare ids + data.mask_dir)" in capsys.readouterr().out
    # what was checked is the named files: the class histogram is SegmentationClass's, not SegmentationClassAug's
    report = check_dataset("pascal", root, files)
    named = np.bincount(np.concatenate([labels[NAMED][i].ravel() for i in ids["labeled"] + ids["val"]]),
                        minlength=256)
    assert report.ok and report.class_pixels == named[:21].tolist()


def test_cityscapes_split_names_its_mask_folder(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    paths = write_cityscapes(root, per_city=1)
    fixed = {}  # a re-annotated copy under another folder, with other labels
    for image in paths["train"]:
        mask = city_mask(image).replace("gtFine/", "gtFine_fixed/", 1)
        (root / mask).parent.mkdir(parents=True, exist_ok=True)
        fixed[image] = train_ids(np.full((32, 64), 26, np.uint8))  # all "car"
        Image.fromarray(fixed[image], "L").save(root / mask)
    named = tmp_path / "labeled.txt"
    named.write_text(unimatch_city_lines(paths["train"]).replace(" gtFine/", " gtFine_fixed/"))
    u2pl = tmp_path / "train_u2pl_labeled.txt"
    u2pl.write_text("\n".join(paths["train"]) + "\n")
    assert cli.main(["data", "check", "--dataset", "cityscapes", "--root", str(root),
                     "--split", str(named), "--split", str(u2pl)]) == 0
    out = capsys.readouterr().out
    assert f"{named}: 2 labeled samples; masks: gtFine_fixed/train/ (2 sub-folders) (named in the split file)" in out
    assert f"{u2pl}: 2 labeled samples; masks: gtFine/train/ (2 sub-folders) (derived from the image paths)" in out
    report = check_dataset("cityscapes", root, [str(named)])
    assert report.class_pixels[13] == 2 * 32 * 64 == sum(report.class_pixels)  # car: the named copy was read
    splits = tmp_path / "splits"
    write_partition_files(splits / "cityscapes" / "mine", named.read_text(), "")
    (splits / "cityscapes" / "val.txt").write_text((root / "splits" / "cityscapes" / "val.txt").read_text())
    data = build_data(DataConfig(dataset="cityscapes", root=str(root), splits_dir=str(splits), partition="mine",
                                 crop_size=24, batch_size_x=2, batch_size_u=2))
    for e in data.partition.labeled:
        assert np.array_equal(np.array(data.labeled.source.load(e)[1]), fixed[e.image])


def test_data_errors_survive_pickling():  # Ray and DataLoader workers send them back pickled
    for err in (DataError("a/b.png", "missing mask"), MissingDataError("a/b.png", "missing mask"),
                MaskDirConflict("s.txt:3", "the split names ...", SplitEntry("x.jpg", "m/x.png"))):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.path == err.path
    assert back.entry == SplitEntry("x.jpg", "m/x.png")
