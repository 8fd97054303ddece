import os
from pathlib import Path

import pytest
from data_fixtures import unimatch_splits

from sslray.data.splits import (Partition, SplitEntry, file_sha256, generate_partition, parse_partition_spec,
                                parse_split_text, read_split_file, write_partition, write_split_file)

UNIMATCH = unimatch_splits() or Path(__file__).resolve().parents[2] / "shared" / "splits" / "unimatch"


def _pool(n):
    return [SplitEntry(f"images/{i:06d}.png", f"masks/{i:06d}.png") for i in range(n)]


@pytest.mark.parametrize("spec,pool,expected", [
    ("16", 2016, 16), (" 16 ", 2016, 16), ("2016", 2016, 2016), ("1_8", 2016, 252), ("0.125", 2016, 252),
    # rounding up reproduces the published ratio splits (datasets.md 1.3 / 2.3)
    ("1_16", 10582, 662), ("1_8", 10582, 1323), ("1_4", 10582, 2646), ("1_30", 2975, 100), ("1_2", 2975, 1488),
    ("1_1000", 10, 1), ("0.3", 10, 3), ("1.0", 7, 7),
])
def test_parse_partition_spec(spec, pool, expected):
    assert parse_partition_spec(spec, pool) == expected


@pytest.mark.parametrize("spec", ["0", "2017", "-1", "abc", "", "1_0", "0_8", "3_2", "1.5", "16.0", "1/8", "1_8_2"])
def test_parse_partition_spec_errors(spec):
    with pytest.raises(ValueError, match="partition"):
        parse_partition_spec(spec, 2016)


def test_generate_partition_properties():
    pool = _pool(50)
    p = generate_partition(pool, "8", seed=3)
    assert len(p.labeled) == 8 and len(p.unlabeled) == 42
    assert not set(p.labeled) & set(p.unlabeled)
    assert set(p.labeled) | set(p.unlabeled) == set(pool)
    assert list(p.unlabeled) == [e for e in pool if e in set(p.unlabeled)]  # pool order
    assert p.name == "8-seed3"


def test_generate_partition_seeds_and_nesting():
    pool = _pool(50)
    a, b = generate_partition(pool, "8", 0), generate_partition(pool, "8", 0)
    assert a == b
    assert generate_partition(pool, "8", 1).labeled != a.labeled
    assert generate_partition(pool, "16", 0).labeled[:8] == a.labeled  # draw order: nested across sizes


def test_generate_partition_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        generate_partition(_pool(3) + _pool(1), "1", 0)


def test_write_partition_deterministic_bytes_and_sha(tmp_path):
    pool = _pool(20)
    shas = [write_partition(tmp_path / d, generate_partition(pool, "1_4", 5)) for d in ("a", "b")]
    assert shas[0] == shas[1] == generate_partition(pool, "1_4", 5).sha256()
    lab = (tmp_path / "a" / "labeled.txt").read_bytes()
    assert lab == (tmp_path / "b" / "labeled.txt").read_bytes()
    assert lab.endswith(b"\n") and b"\r" not in lab and lab.count(b"\n") == 5
    assert file_sha256(tmp_path / "a" / "unlabeled.txt") == shas[0]["unlabeled"]
    assert sorted(os.listdir(tmp_path / "a")) == ["labeled.txt", "unlabeled.txt"]  # no temporary left behind
    other = write_partition(tmp_path / "c", generate_partition(pool, "1_4", 6))
    assert other["labeled"] != shas[0]["labeled"]


def test_roundtrip(tmp_path):
    entries = [SplitEntry("a.jpg", "a.png"), SplitEntry("b.jpg"), SplitEntry("c.jpg", "c.png")]
    write_split_file(tmp_path / "sub" / "x.txt", entries)
    assert read_split_file(tmp_path / "sub" / "x.txt") == entries
    write_split_file(tmp_path / "empty.txt", [])
    assert (tmp_path / "empty.txt").read_bytes() == b"" and read_split_file(tmp_path / "empty.txt") == []


def test_parse_tolerates_crlf_blank_lines_and_missing_newline():
    text = "a.jpg a.png\r\n\r\n  b.jpg\tb.png  \r\nc.jpg\nd.jpg None"
    assert parse_split_text(text) == [SplitEntry("a.jpg", "a.png"), SplitEntry("b.jpg", "b.png"),
                                      SplitEntry("c.jpg"), SplitEntry("d.jpg")]
    with pytest.raises(ValueError, match=":2:"):
        parse_split_text("a b\na b c\n")


def test_entry_validation_and_line():
    assert SplitEntry("x.jpg", "y.png").line() == "x.jpg y.png"
    assert SplitEntry("x.jpg").line() == "x.jpg"
    with pytest.raises(ValueError):
        SplitEntry("has space.jpg", "m.png")
    with pytest.raises(ValueError):
        SplitEntry("", None)


def test_partition_sha_of_empty_unlabeled():
    p = Partition(labeled=(SplitEntry("a"),), unlabeled=(), name="all")
    assert p.sha256()["unlabeled"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.skipif(not UNIMATCH.is_dir(), reason=f"UniMatch split files not found at {UNIMATCH}")
def test_read_real_unimatch_pascal_92():
    lab = read_split_file(UNIMATCH / "pascal" / "92" / "labeled.txt")  # no trailing newline in the original
    unl = read_split_file(UNIMATCH / "pascal" / "92" / "unlabeled.txt")
    assert len(lab) == 92 and len(unl) == 10490
    assert lab[0] == SplitEntry("JPEGImages/2007_000733.jpg", "SegmentationClass/2007_000733.png")
    assert not {e.image for e in lab} & {e.image for e in unl}


@pytest.mark.skipif(not UNIMATCH.is_dir(), reason=f"UniMatch split files not found at {UNIMATCH}")
def test_read_real_unimatch_cityscapes_1_16():
    lab = read_split_file(UNIMATCH / "cityscapes" / "1_16" / "labeled.txt")
    assert len(lab) == 186 == parse_partition_spec("1_16", 2975)
    assert all(e.image.startswith("leftImg8bit/train/") and e.mask.endswith("_gtFine_labelTrainIds.png")
               for e in lab)
