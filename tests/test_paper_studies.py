"""The paper studies and the published split files they rely on.

The UniMatch split files are read from ``../shared/splits/unimatch`` (MIT; not part of this repository). Counts are
the documented ones (``datasets.md`` sections 1.3 and 2.3) and fingerprint prefixes those of its Appendix B, written
here independently of ``sslray.data.fingerprints``.
"""
from __future__ import annotations

import glob
import math
import os
import warnings

import pytest

from sslray import cli
from sslray.data.check import check_dataset
from sslray.data.cityscapes import CityscapesSource
from sslray.data.fingerprints import UNIMATCH, fingerprint, identify_list, identify_partition
from sslray.data.readers import NonStandardSplitWarning
from sslray.data.voc import VOCSource
from sslray.study import load_study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(REPO, "..", "shared", "splits", "unimatch")
needs_splits = pytest.mark.skipif(not os.path.isdir(SPLITS), reason=f"UniMatch split files not found at {SPLITS}")

# (labeled, unlabeled, Appendix B prefix of labeled, of unlabeled)
DOCUMENTED = {
    "pascal/92": (92, 10490, "f1143f45854fb9ad", "d2956c3d7e1e2f06"),
    "pascal/183": (183, 10399, "34c43d1a972d9b57", "d2352615af6eb19c"),
    "pascal/366": (366, 10216, "0aa3a97ff1f3768b", "6254d2c172e6a5c7"),
    "pascal/732": (732, 9850, "6844f1b8d6bf297a", "e63d4dff34254e90"),
    "pascal/1464": (1464, 9118, "f0e8d38b2b4f30c8", "354f4301501dba30"),
    "pascal/1_16": (662, 9920, "9127c95c80b4033e", "d4a231ed72e6b070"),
    "pascal/1_8": (1323, 9259, "252e71813a46991f", "f4a4e48ec57a8eee"),
    "pascal/1_4": (2646, 7936, "3f03293e2ea39c7a", "b481ee46592ee4a9"),
    "pascal/u2pl_1_16": (662, 9920, "bd9b442835b6b4f9", "341818a4ad05fefa"),
    "pascal/u2pl_1_8": (1323, 9259, "95e17e0018d17975", "210140491f6d2012"),
    "pascal/u2pl_1_4": (2646, 7936, "4ffe7ec307368582", "6f50f8eb5e842c42"),
    "cityscapes/1_16": (186, 2789, "6d72fa678b03a477", "d6e8cd67d5c02f2b"),
    "cityscapes/1_8": (372, 2603, "266b987f0f222648", "d3f1a68493ae1b3f"),
    "cityscapes/1_4": (744, 2231, "31f6f54be8ae901d", "5104c2d18670df1a"),
    "cityscapes/1_2": (1488, 1487, "b785c4f05cee5678", "747538629e0ec4be"),
    "cityscapes/1_30": (100, 2875, "c7d0ac1e88e31ae5", "e5f786046541abc5"),
}
LISTS = {"pascal/val": (1449, "d8727e6eb0121bca"), "pascal/train_aug": (10582, "9f5c46d25586ea17"),
         "cityscapes/val": (500, "cdee5a88f198e0d3")}
STUDIES = sorted(glob.glob(os.path.join(REPO, "studies", "*.yaml")))
PAPER = {name: os.path.join(REPO, "studies", f"{name}.yaml") for name in ("voc_classic", "voc_blended", "cityscapes")}


def _source(dataset: str, root, splits: str | None = SPLITS):
    return VOCSource(root, splits_dir=splits) if dataset == "pascal" else CityscapesSource(root, splits_dir=splits)


def test_builtin_fingerprints_agree_with_the_documentation():
    for name, (n_lab, n_unl, lab, unl) in DOCUMENTED.items():
        assert UNIMATCH[f"{name}/labeled"][0] == n_lab and UNIMATCH[f"{name}/labeled"][1].startswith(lab)
        assert UNIMATCH[f"{name}/unlabeled"][0] == n_unl and UNIMATCH[f"{name}/unlabeled"][1].startswith(unl)
    for name, (n, prefix) in LISTS.items():
        assert UNIMATCH[name][0] == n and UNIMATCH[name][1].startswith(prefix)


@needs_splits
@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_published_splits_parse_with_documented_counts_and_fingerprints(name, tmp_path):
    dataset, split = name.split("/")
    src = _source(dataset, tmp_path)  # an empty root: reading lists touches no data
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonStandardSplitWarning)  # the published split is recognised silently
        part = src.partition(split, seed=0)
    n_lab, n_unl = DOCUMENTED[name][:2]
    assert (len(part.labeled), len(part.unlabeled)) == (n_lab, n_unl)
    assert part.standard == f"unimatch:{name}" and part.origin == os.path.join(SPLITS, dataset, split)
    lab, unl = [e.image for e in part.labeled], [e.image for e in part.unlabeled]
    assert fingerprint(lab) == UNIMATCH[f"{name}/labeled"] and fingerprint(unl) == UNIMATCH[f"{name}/unlabeled"]
    assert not set(lab) & set(unl)
    pool = UNIMATCH["pascal/train_aug"] if dataset == "pascal" else UNIMATCH["cityscapes/train"]
    assert fingerprint(lab + unl) == pool  # every pair covers the whole pool
    assert all(e.mask is not None for e in part.labeled)


@needs_splits
def test_published_lists_and_other_dialects(tmp_path):
    voc, city = _source("pascal", tmp_path), _source("cityscapes", tmp_path)
    assert voc.check_val_standard() == "unimatch:pascal/val" and len(voc.val_entries()) == 1449
    assert city.check_val_standard() == "unimatch:cityscapes/val" and len(city.val_entries()) == 500
    assert identify_list("pascal", (e.image for e in voc.pool_list().entries)) == "pascal/train_aug"
    # the same samples in the U2PL / CPS dialects have the same fingerprints
    lab = voc.read_list(os.path.join(SPLITS, "pascal", "92", "labeled.txt")).entries
    (tmp_path / "u2pl.txt").write_bytes("".join(e.image[11:-4] + "\r\n" for e in lab).encode())  # CRLF bare ids
    assert identify_list("pascal", (e.image for e in voc.read_list(tmp_path / "u2pl.txt").entries)) == \
        "pascal/92/labeled"
    cs = city.read_list(os.path.join(SPLITS, "cityscapes", "1_16", "labeled.txt")).entries
    stems = [e.image.rsplit("/", 1)[1].removesuffix("_leftImg8bit.png") for e in cs]
    (tmp_path / "cps.txt").write_text("".join(f"/images/train/{s}.png\t/segmentation/train/{s}_gtFine.png\n"
                                              for s in stems))
    assert city.read_list(tmp_path / "cps.txt").entries == cs
    # sslray data check names the published list it was given, even with no images on disk
    report = check_dataset("pascal", tmp_path, [os.path.join(SPLITS, "pascal", "92", "labeled.txt")])
    assert report.splits[0].standard == "unimatch:pascal/92/labeled" and len(report.errors) == 2 * 92
    # a published name whose files differ from the published split is flagged
    other = tmp_path / "splits" / "pascal" / "92"
    other.mkdir(parents=True)
    unl = voc.read_list(os.path.join(SPLITS, "pascal", "92", "unlabeled.txt")).entries
    (other / "labeled.txt").write_text("".join(f"{e.line()}\n" for e in lab[1:]))
    (other / "unlabeled.txt").write_text("".join(f"{e.line()}\n" for e in (lab[0],) + unl))
    with pytest.warns(NonStandardSplitWarning, match="differs from the published UniMatch split"):
        part = _source("pascal", tmp_path, str(tmp_path / "splits")).partition("92", 0)
    assert part.standard is None
    assert identify_partition("pascal", [e.image for e in lab], [e.image for e in unl]) == "unimatch:pascal/92"


@pytest.mark.parametrize("path", STUDIES, ids=os.path.basename)
def test_every_study_file_validates_without_its_data(path, capsys):
    assert cli.main(["validate", path]) == 0, capsys.readouterr().err


def _epoch(n_unlabeled: int) -> int:
    """UniMatch's len(trainloader_u): DistributedSampler over 4 GPUs, 2 images per GPU, drop_last."""
    return math.ceil(n_unlabeled / 4) // 2


@pytest.mark.parametrize("study,dataset,epochs,crop", [
    ("voc_classic", "pascal", 80, 321), ("voc_blended", "pascal", 80, 321), ("cityscapes", "cityscapes", 240, 801)])
def test_paper_studies_follow_unimatch(study, dataset, epochs, crop):
    s = load_study(PAPER[study])
    trials = s.trials()
    methods = {"supervised", "fixmatch", "unimatch", "ipixmatch", "guidedmix", "pcr", "mllc"}
    assert {t.config.method.name for t in trials} == methods
    assert {t.seed for t in trials} == {0, 1, 2}
    # partitions are a paired grid axis (each with its schedule), not ablation variants
    assert s.ablation is None and "data.partition" in s.paired
    assert len(trials) == len(methods) * 3 * len(s.grid["data.partition"])
    assert [t.point["data.partition"] for t in trials[:len(s.grid["data.partition"])]] == s.grid["data.partition"]
    for t in trials:
        c = t.config
        n_unl = DOCUMENTED[f"{dataset}/{c.data.partition}"][1]
        assert c.train.iterations == epochs * _epoch(n_unl), (c.data.partition, c.train.iterations)
        assert c.train.eval_every == _epoch(n_unl) * (4 if dataset == "cityscapes" else 1)
        assert c.data.crop_size == (513 if c.data.partition.startswith("u2pl") else crop)
        assert (c.data.batch_size_x, c.data.batch_size_u) == (8, 8)
        assert (c.model.name, c.model.backbone, c.model.output_stride) == ("deeplabv3plus", "resnet101", 16)
        assert c.optim.lr == (0.005 if dataset == "cityscapes" else 0.001)
        assert c.optim.head_lr_mult == (1.0 if dataset == "cityscapes" else 10.0)
        if dataset == "cityscapes":
            assert c.data.eval_mode == "sliding_window" and c.method.conf_thresh == 0.0
            # UniMatch: OHEM(0.7, min_kept 200,000) on each of 4 GPUs with 2 images; here one batch of 8
            pcr = c.method.name == "pcr"  # PCR's Cityscapes config: 100,000 per GPU of 2 images, M = 3, 0.65
            assert c.method.terms["x"].criterion == "ohem"
            assert c.method.terms["x"].ohem_min_kept == (4 * 100000 if pcr else 4 * 200000)
            if pcr:
                assert c.method.terms["pcr_x"].num_protos == c.method.terms["pcr_u"].num_protos == 3
                assert c.method.terms["pcr_u"].confid_thresh == 0.65
        else:
            assert c.data.eval_mode is None and c.method.conf_thresh == 0.95
    assert (s.report.rows, s.report.cols, s.report.agg) == ("method.name", "data.partition", "best")
    text = open(PAPER[study]).read()
    assert text.startswith(f"# sslray run studies/{study}.yaml") and "# The four founding methods run standalone" in text
