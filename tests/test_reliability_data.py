"""Reliability suite, broken datasets: each fault planted in a copy of a small on-disk dataset (the synthetic default
in the VOC layout, ``sslray data synth``) must be named, by file, both by ``sslray data check`` and by a trial that
trains on it (``sslray train``): missing files, corrupt PNG and JPEG, label values out of range, an image/mask size
mismatch, an empty split, duplicate ids. Generated here; nothing is committed.
"""
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sslray import cli

pytestmark = pytest.mark.reliability
PARTITION = "16"  # 16 labeled of 24: four iterations of batch 4 read every labeled sample once


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> Path:
    from sslray.config import SyntheticConfig
    from sslray.data.synth_voc import write_synthetic_voc

    root = tmp_path_factory.mktemp("synth_voc")
    write_synthetic_voc(root, SyntheticConfig(size=32, num_train=24, num_val=6), partitions=(PARTITION,))
    return root


def labeled_ids(root: Path) -> list[tuple[str, str]]:
    """(image, mask) relative paths of the labeled split, in file order."""
    lines = (root / "splits" / PARTITION / "labeled.txt").read_text().split("\n")
    return [tuple(line.split()) for line in lines if line.strip()]


def _missing_image(root):
    img, _ = labeled_ids(root)[3]
    (root / img).unlink()
    return img


def _missing_mask(root):
    _, mask = labeled_ids(root)[5]
    (root / mask).unlink()
    return mask


def _corrupt_png(root):
    img, _ = labeled_ids(root)[2]
    data = (root / img).read_bytes()
    (root / img).write_bytes(data[: len(data) // 2])  # a transfer cut short
    return img


def _corrupt_jpeg(root):
    img, _ = labeled_ids(root)[7]
    buf = io.BytesIO()
    Image.open(root / img).convert("RGB").save(buf, "JPEG")
    (root / img).write_bytes(buf.getvalue()[:200])  # a JPEG stream under the image's name, truncated
    return img


def _label_out_of_range(root):
    _, mask = labeled_ids(root)[1]
    m = Image.open(root / mask)
    a = np.array(m)
    a[0, :4] = 7  # 3 classes: 0..2, plus 255 for ignore
    out = Image.fromarray(a, "P")
    out.putpalette(m.getpalette())
    out.save(root / mask)
    return mask


def _size_mismatch(root):
    _, mask = labeled_ids(root)[4]
    m = Image.open(root / mask)
    small = m.resize((16, 16), Image.NEAREST)
    small.putpalette(m.getpalette())
    small.save(root / mask)
    return mask


def _empty_split(root):
    split = root / "splits" / PARTITION / "labeled.txt"
    split.write_text("")
    # a trial reads the partition as one unit: it names the partition directory and the list that is empty
    return str(split.relative_to(root)), (f"splits/{PARTITION}", "the labeled list is empty")


def _duplicate_ids(root):
    split = root / "splits" / PARTITION / "labeled.txt"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines + [lines[0]]) + "\n")
    # a trial names the image listed twice, and the partition
    return str(split.relative_to(root)), (lines[0].split()[0], "listed twice in the labeled list of partition")


FAULTS = [_missing_image, _missing_mask, _corrupt_png, _corrupt_jpeg, _label_out_of_range, _size_mismatch,
          _empty_split, _duplicate_ids]


@pytest.fixture(params=FAULTS, ids=[f.__name__[1:] for f in FAULTS])
def broken(request, clean_dataset, tmp_path):
    """A copy of the dataset with one fault planted: (root, the bad file as data check names it, (the path a trial
    names, text its message must contain)), paths relative to root."""
    root = tmp_path / "data"
    shutil.copytree(clean_dataset, root)
    bad = request.param(root)
    return (root, bad, (bad, "")) if isinstance(bad, str) else (root, *bad)


def test_data_check_names_the_bad_file(broken, capsys):
    root, bad, _ = broken
    splits = [root / "splits" / PARTITION / "labeled.txt", root / "splits" / PARTITION / "unlabeled.txt",
              root / "splits" / "val.txt"]
    code = cli.main(["data", "check", "--dataset", "synthetic_voc", "--root", str(root),
                     *[a for s in splits for a in ("--split", str(s))]])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED, out + err
    named = [line for line in out.splitlines() if str(root / bad) in line or line.startswith(f"{bad}")]
    assert named, out


def test_trial_start_names_the_bad_file(broken, tmp_path, capsys):
    root, _, (bad, what) = broken
    cfg = {"data": {"dataset": "synthetic_voc", "root": str(root), "splits_dir": str(root / "splits"),
                    "partition": PARTITION, "crop_size": 32, "batch_size_x": 4, "batch_size_u": 4},
           "model": {"name": "small", "width": 8}, "train": {"iterations": 4, "eval_every": 4},
           "run": {"threads": 1, "progress": "off"}}
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "out"
    code = cli.main(["train", str(path), "--out", str(out_dir), "--quiet"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sslray: error: {root / bad}: ") and what in lines[0], err
    assert not (out_dir / "checkpoint").exists()  # it stopped before a checkpoint could hide the fault
