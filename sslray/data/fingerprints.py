"""Fingerprints of the published UniMatch split files, to recognise a user's split as the standard one.

A fingerprint is ``(number of samples, sha256 of the sorted image paths joined by "\\n")`` -- the recipe of
``datasets.md`` Appendix B, whose 16-hex prefixes these extend. Image paths are the canonical UniMatch ones
(``JPEGImages/2007_000032.jpg``, ``leftImg8bit/train/jena/jena_000078_000019_leftImg8bit.png``), which is what
every split dialect resolves to (see ``voc.py`` / ``cityscapes.py``), so a U2PL bare-id file or a CPS tab file of
the same samples has the same fingerprint as the UniMatch file. Sorting makes it independent of line order.

The values are facts computed from LiheYoung/UniMatch ``splits/`` (MIT licence; the files themselves are not part
of sslray). ``cityscapes/train`` is the union of any labeled/unlabeled pair (the 2,975 fine train images).
Classic Pascal splits 92..1464 and ``val`` are also U2PL's and PCR's; ``u2pl_*`` are U2PL's 662/1323/2646;
``1_*`` are CPS's (``datasets.md`` sections 1.3, 2.3 and 6).
"""
from __future__ import annotations

import hashlib
from typing import Iterable

# "<dataset>/<split>/<labeled|unlabeled>" or "<dataset>/<list>" -> (count, sha256 hex)
UNIMATCH: dict[str, tuple[int, str]] = {
    "pascal/92/labeled": (92, "f1143f45854fb9ad420b4ecb0784cee63d226b426c027e2dc15a7b0f6ccf9cf1"),
    "pascal/92/unlabeled": (10490, "d2956c3d7e1e2f063a341dd321575dd209a53fe80f2d02be6756bc3786b3e0a1"),
    "pascal/183/labeled": (183, "34c43d1a972d9b57372c8ac37a72575753b94154570a1dc675a1dde819250db2"),
    "pascal/183/unlabeled": (10399, "d2352615af6eb19c56154fe15dfd3429f06676cd1dfb09ada2a6fe66a9bfdb75"),
    "pascal/366/labeled": (366, "0aa3a97ff1f3768b08d95fd4ab55a6143fc14986d1509570d754568e7e3bef45"),
    "pascal/366/unlabeled": (10216, "6254d2c172e6a5c7831f02ba7babc83fe736141965df23991cecb80be3bdc9c4"),
    "pascal/732/labeled": (732, "6844f1b8d6bf297a43db2bdf94108ba2cdced51e3bf4264c0c14d37c0a395224"),
    "pascal/732/unlabeled": (9850, "e63d4dff34254e90b29851a3e46109b4d22967f12f4c26a2ba4b819fb3386642"),
    "pascal/1464/labeled": (1464, "f0e8d38b2b4f30c8259447ab57f4468808016117988faba4a664f3d8f8714bd4"),
    "pascal/1464/unlabeled": (9118, "354f4301501dba302173cb2b722e61e0107f8e460dd8d7c248a80e9f69b423d9"),
    "pascal/1_16/labeled": (662, "9127c95c80b4033e18791d13f8c1aa4646eac51e97ca9bd0dd6e307677f2adc8"),
    "pascal/1_16/unlabeled": (9920, "d4a231ed72e6b070aab798e67c23e2309d01df2a3fe68e8d190164561eb4ac0f"),
    "pascal/1_8/labeled": (1323, "252e71813a46991f6befa247e64a0d4c338e000d5fdc389855df6f8855149c8c"),
    "pascal/1_8/unlabeled": (9259, "f4a4e48ec57a8eee15fae57063738e3f9d3c9c8ad0578d2cc1b26aef10d44db8"),
    "pascal/1_4/labeled": (2646, "3f03293e2ea39c7a12018c659c9e53fc73c73b26a07f0d4576b2f21acbb0ef1b"),
    "pascal/1_4/unlabeled": (7936, "b481ee46592ee4a960ebdcfc1a82c2b14db3eca56662622ffecb2163f435aa19"),
    "pascal/u2pl_1_16/labeled": (662, "bd9b442835b6b4f912bc2d23328b7d9ca7ced28ad49ec7dc4a8bf9292c4ed118"),
    "pascal/u2pl_1_16/unlabeled": (9920, "341818a4ad05fefaaa294ec6ea84dde1d14151d26e2be031076d2222fd2ad84f"),
    "pascal/u2pl_1_8/labeled": (1323, "95e17e0018d17975b10f87f6b458865e2d080313d2dda8710729144ddaf89853"),
    "pascal/u2pl_1_8/unlabeled": (9259, "210140491f6d20124b9995d1c6f97dea5145a6b2425be4fff1ec2d3a59b4cfd5"),
    "pascal/u2pl_1_4/labeled": (2646, "4ffe7ec3073685820b22a725206dbcc21bee3d8dd00b80ece7dcafb24c71bb17"),
    "pascal/u2pl_1_4/unlabeled": (7936, "6f50f8eb5e842c42462209510c86095c89cdd619982b4cf48bf8547a3bfe2900"),
    "pascal/val": (1449, "d8727e6eb0121bca0b220afeb03c1f46aab9741ca904fb0846b2f6951c0b805a"),
    "cityscapes/1_16/labeled": (186, "6d72fa678b03a477ae8ad003b27b1467ce712e2f0f422644cd972a458a3fb52d"),
    "cityscapes/1_16/unlabeled": (2789, "d6e8cd67d5c02f2bbcf6953dcac36a510996bdbf936d186f59bf94e9f995b859"),
    "cityscapes/1_8/labeled": (372, "266b987f0f222648c63a2ed73176e4b02dc4460e995769ba3b39bd715c4c894e"),
    "cityscapes/1_8/unlabeled": (2603, "d3f1a68493ae1b3f1eed406790210b13c23777213e9516c197c16a84e1b7469f"),
    "cityscapes/1_4/labeled": (744, "31f6f54be8ae901d0ec3c073c33be5dda41c8d3cd1c40cda53c843933e2f0926"),
    "cityscapes/1_4/unlabeled": (2231, "5104c2d18670df1a09771651a7d18c2658bb1037c7d231d1af6207d16c9f0009"),
    "cityscapes/1_2/labeled": (1488, "b785c4f05cee5678398df7d8345178799f2414c60b95059c1fc382374b3ea300"),
    "cityscapes/1_2/unlabeled": (1487, "747538629e0ec4bea836859215b4490a061cabffd7bba09d29704432f98665a3"),
    "cityscapes/1_30/labeled": (100, "c7d0ac1e88e31ae5e037b66d98ef33224cdef2a5efbec0a4599543b542e2d367"),
    "cityscapes/1_30/unlabeled": (2875, "e5f786046541abc598f2b0e29c5c7cb8bf1c237b68ae07be558a29b82a648c6a"),
    "cityscapes/val": (500, "cdee5a88f198e0d3134ec4d3025242fd0ee54b1674f4d16905a1c3f51ff41cd3"),
    "pascal/train_aug": (10582, "9f5c46d25586ea17861ec65d71fca6feecfc58e3c21bb14d51a27dd0e9213759"),
    "cityscapes/train": (2975, "38cd548d26d1de532e64ab391056eee3a810f677a7031b0c87b6f9f7683752fd"),
}

# Standard partitions by dataset, in the order of the papers' tables.
STANDARD_PARTITIONS: dict[str, tuple[str, ...]] = {
    "pascal": ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4"),
    "cityscapes": ("1_16", "1_8", "1_4", "1_2", "1_30"),
}


def fingerprint(image_paths: Iterable[str]) -> tuple[int, str]:
    """``(count, sha256 hex of "\\n".join(sorted(image_paths)))`` (no trailing newline)."""
    paths = sorted(image_paths)
    return len(paths), hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()


def identify_list(dataset: str, image_paths: Iterable[str]) -> str | None:
    """The published list these image paths are, e.g. ``"pascal/92/labeled"`` or ``"cityscapes/val"``; None if
    none (order does not matter, every sample does)."""
    fp = fingerprint(image_paths)
    for key, value in UNIMATCH.items():
        if key.startswith(dataset + "/") and value == fp:
            return key
    return None


def identify_partition(dataset: str, labeled: Iterable[str], unlabeled: Iterable[str]) -> str | None:
    """``"unimatch:<dataset>/<split>"`` when the labeled and unlabeled image paths both equal one published
    split's, else None."""
    lab, unl = fingerprint(labeled), fingerprint(unlabeled)
    for name in STANDARD_PARTITIONS.get(dataset, ()):
        if UNIMATCH[f"{dataset}/{name}/labeled"] == lab and UNIMATCH[f"{dataset}/{name}/unlabeled"] == unl:
            return f"unimatch:{dataset}/{name}"
    return None
