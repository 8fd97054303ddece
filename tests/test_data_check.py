"""``sslray data check``: one fixture per planted fault, each found once and named by its file."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import city_mask, unimatch_voc_lines, write_cityscapes, write_voc
from PIL import Image

from sslray import cli
from sslray.data.check import check_dataset, split_role


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean VOC tree with a partition: labeled (UniMatch two-column), unlabeled (bare ids), val."""
    root = tmp_path_factory.mktemp("clean")
    ids = write_voc(root, n_fine=3, n_extra=2, n_val=2)
    part = root / "splits" / "pascal" / "p"
    part.mkdir(parents=True)
    (part / "labeled.txt").write_text(unimatch_voc_lines(ids["fine"]))
    (part / "unlabeled.txt").write_text("\n".join(ids["train_aug"][3:]) + "\n")
    return root, ids


def _lists(root: Path) -> list[str]:
    part = root / "splits" / "pascal" / "p"
    return [str(part / "labeled.txt"), str(part / "unlabeled.txt"), str(root / "splits" / "pascal" / "val.txt")]


def test_clean_dataset(clean):
    root, ids = clean
    report = check_dataset("pascal", root, _lists(root))
    assert report.ok and report.errors == []
    assert [(s.role, s.samples) for s in report.splits] == [("labeled", 3), ("unlabeled", 2), ("val", 2)]
    assert report.images_checked == 7 and report.masks_checked == 5  # unlabeled masks are not needed
    total = sum(int((np.array(Image.open(root / "SegmentationClassAug" / f"{i}.png")) != 255).sum())
                for i in ids["fine"] + ids["val"])
    assert sum(report.class_pixels) == total and report.ignore_pixels > 0
    summary = report.summary()
    assert "3 labeled samples" in summary and "dining table" in summary and "0 errors" in summary
    default = check_dataset("pascal", root, splits_dir=root / "splits")  # no files given: val + train pool
    assert default.ok and [(s.role, s.samples) for s in default.splits] == [("val", 2), ("labeled", 5)]


# The fixture's labeled and val lists are UniMatch two-column files: the masks they name, and so the masks checked,
# are SegmentationClass/ (SegmentationClassAug/ holds the same labels for bare-id lists).
NAMED = "SegmentationClass"


def _break_mask(root: Path, ident: str, fn) -> Path:
    path = root / NAMED / f"{ident}.png"
    fn(path, np.array(Image.open(path)))
    return path


def _value_21(path, lbl):
    lbl[2, 2] = 21
    Image.fromarray(lbl, "L").save(path)


def _rgb(path, lbl):
    Image.fromarray(np.stack([lbl] * 3, -1), "RGB").save(path)


def _narrow(path, lbl):
    Image.fromarray(lbl[:, :20], "L").save(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name -> (break the tree: returns the file that must be named, expected message)
FAULTS = {
    "missing image": (lambda r, i: _unlink(r / "JPEGImages" / f"{i['fine'][0]}.jpg"),
                      r"missing image \(listed in .*labeled\.txt:1\)"),
    "missing mask": (lambda r, i: _unlink(r / NAMED / f"{i['fine'][1]}.png"),
                     r"missing mask \(listed in .*labeled\.txt:2\)"),
    "truncated image": (lambda r, i: _touch(r / "JPEGImages" / f"{i['val'][0]}.jpg", _truncate),
                        r"unreadable image: .*truncated"),
    "unreadable mask": (lambda r, i: _touch(r / NAMED / f"{i['fine'][2]}.png",
                                            lambda p: p.write_bytes(b"not a png at all")),
                        r"unreadable mask"),
    "label out of range": (lambda r, i: _break_mask(r, i["fine"][0], _value_21),
                           r"label values \[21\] outside 0..20 and 255"),
    "colour mask": (lambda r, i: _break_mask(r, i["val"][1], _rgb), r"mask is a RGB image"),
    "size mismatch": (lambda r, i: _break_mask(r, i["fine"][1], _narrow),
                      r"mask is 20x30 but its image is 40x30"),
    "duplicate id": (lambda r, i: _append(r / "splits/pascal/p/labeled.txt", unimatch_voc_lines(i["fine"][:1])),
                     r"duplicate of line 1: JPEGImages/2007_000001\.jpg"),
    "labeled/unlabeled overlap": (lambda r, i: _append(r / "splits/pascal/p/unlabeled.txt", i["fine"][2] + "\n"),
                                  r"JPEGImages/2007_000003\.jpg is also labeled \(.*labeled\.txt:3\)"),
    "val in training": (lambda r, i: _append(r / "splits/pascal/p/unlabeled.txt", i["val"][0] + "\n"),
                        r"JPEGImages/2007_000006\.jpg is a validation image \(.*val\.txt:1\) "
                        r"listed as unlabeled training data"),
    "unparsable line": (lambda r, i: _append(r / "splits/pascal/p/labeled.txt", "a b c\n"),
                        r"expected '<image> <mask>' or '<image>', got 'a b c'"),
    "empty split file": (lambda r, i: _touch(r / "splits/pascal/p/unlabeled.txt", lambda p: p.write_text("\n")),
                         r"no samples listed"),
    "missing split file": (lambda r, i: _unlink(r / "splits/pascal/p/unlabeled.txt"), r"missing split file"),
}


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


def _touch(path: Path, fn) -> Path:
    fn(path)
    return path


def _append(path: Path, text: str) -> str:
    with open(path, "a") as f:
        f.write(text)
    return f"{path}:{path.read_text().count(chr(10))}"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_planted_fault_is_found_once_and_named(clean, tmp_path, fault):
    src, ids = clean
    root = tmp_path / "voc"
    shutil.copytree(src, root)
    breaker, message = FAULTS[fault]
    named = str(breaker(root, ids))
    report = check_dataset("pascal", root, _lists(root), workers=2)
    assert len(report.errors) == 1, report.errors
    path, msg = report.errors[0]
    assert path == named
    assert re.search(message, msg), msg


def test_unlabeled_images_need_no_mask(clean, tmp_path):
    src, ids = clean
    root = tmp_path / "voc"
    shutil.copytree(src, root)
    for ident in ids["train_aug"][3:]:
        (root / "SegmentationClassAug" / f"{ident}.png").unlink()
    assert check_dataset("pascal", root, _lists(root)).ok


def test_cityscapes_faults(tmp_path):
    root = tmp_path / "cityscapes"
    paths = write_cityscapes(root, per_city=1)
    lab = tmp_path / "labeled.txt"
    lab.write_text("\n".join(paths["train"]) + "\n")  # the U2PL dialect: image paths only
    assert check_dataset("cityscapes", root, [str(lab)]).ok
    # labelTrainIds missing, labelIds present: read through the table, no error
    mask = root / city_mask(paths["train"][0])
    mask.unlink()
    assert check_dataset("cityscapes", root, [str(lab)]).ok
    label_ids = root / city_mask(paths["train"][0]).replace("labelTrainIds", "labelIds")
    label_ids.unlink()
    _truncate(root / paths["train"][1])
    report = check_dataset("cityscapes", root, [str(lab)])
    by_path = dict(report.errors)
    assert len(report.errors) == 2 and set(by_path) == {str(mask), str(root / paths["train"][1])}
    assert by_path[str(mask)] == f"missing mask (nor {label_ids}) (listed in {lab}:1)"
    assert by_path[str(root / paths["train"][1])].startswith("unreadable image")


def test_split_roles():
    assert [split_role(p) for p in ("a/92/labeled.txt", "a/92/unlabeled.txt", "pascal/val.txt", "train_aug.txt",
                                    "train_aug_unlabeled_1-16.txt", "train_aug_labeled_1-16.txt", "test.txt",
                                    "pseudoseg_unlabeled_1-2.txt")] == \
        ["labeled", "unlabeled", "val", "labeled", "unlabeled", "labeled", "unlabeled", "unlabeled"]


def test_cli_exit_codes_and_lines(clean, tmp_path, capsys):
    src, ids = clean
    args = ["data", "check", "--dataset", "pascal", "--root"]
    assert cli.main(args + [str(src)] + sum((["--split", f] for f in _lists(src)), [])) == 0
    assert "0 errors" in capsys.readouterr().out
    root = tmp_path / "voc"
    shutil.copytree(src, root)
    (root / "JPEGImages" / f"{ids['fine'][0]}.jpg").unlink()
    assert cli.main(args + [str(root)] + sum((["--split", f] for f in _lists(root)), [])) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{root}/JPEGImages/{ids['fine'][0]}.jpg: missing image")
    assert cli.main(args[:3] + ["synthetic", "--root", str(root)]) == 2  # not a dataset on disk
    assert cli.main(args + [str(tmp_path / "nowhere")]) == 1
    assert "data.root is not a directory" in capsys.readouterr().out
