"""The kernel-documentation corpus builder (precond.tasks.kernel_docs) on tiny synthetic tarballs."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from precond.tasks import kernel_docs
from precond.tasks.kernel_docs import SEPARATOR, build_corpus, documentation_files, documentation_path, main

PROSE = "The scheduler picks the next task to run on each processor.\n"
TABLE = "+----+----+----+\n| 0x | 1f | 2e |\n+----+----+----+\n| 00 | 01 | 02 |\n+----+----+----+\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"

# (path in the tarball, content), deliberately not in sorted order
MEMBERS: list[tuple[str, bytes]] = [
    ("linux/Documentation/zeta.txt", b"Zeta is the last file in path order.\r\nIts lines end in CRLF.\r\n"),
    ("linux/Documentation/translations/zh_CN/index.rst", "调度器选择下一个任务。\n".encode()),
    ("linux/Documentation/translations/it_IT/index.rst", b"Il pianificatore sceglie il prossimo compito.\n"),
    ("linux/Documentation/images/logo.png", PNG),
    ("linux/Documentation/images/diagram.svg", b"<svg xmlns='http://www.w3.org/2000/svg'>text</svg>\n"),
    ("linux/Documentation/admin-guide/mm/deep/nested.rst", b"Memory pages are reclaimed when memory is low."),
    ("linux/Documentation/index.rst", PROSE.encode()),
    ("linux/Documentation/broken.rst", b"Caf\xe9 cr\xffme: bytes that are not UTF-8 are dropped.\n"),
    ("linux/Documentation/tables.rst", TABLE.encode()),
    ("linux/Documentation/blob.txt", b"Looks like text but has a NUL\x00 byte in it.\n"),
    ("linux/Documentation/devicetree/bindings/foo.yaml", b"title: Foo controller\nproperties: {}\n"),
    ("linux/Documentation/devicetree/bindings/bar.txt", b"Required properties: compatible, reg.\n"),
    ("linux/Documentation/features/vm/arch-support.txt", b"Feature support for each architecture.\n"),
    ("linux/Documentation/ABI/testing/sysfs-foo", b"What: /sys/foo\nDescription: a file.\n"),
    ("linux/Documentation/admin-guide/README.rst", b"\xef\xbb\xbfLinux kernel release notes for users.\n"),
    ("linux/README", b"Linux kernel: read the documentation.\n"),
    ("linux/kernel/sched/core.c", b"/* The scheduler core. */\nint main(void) { return 0; }\n"),
]

KEPT = [
    ("Documentation/admin-guide/README.rst", "Linux kernel release notes for users.\n"),
    ("Documentation/admin-guide/mm/deep/nested.rst", "Memory pages are reclaimed when memory is low.\n"),
    ("Documentation/broken.rst", "Caf crme: bytes that are not UTF-8 are dropped.\n"),
    ("Documentation/index.rst", PROSE),
    ("Documentation/zeta.txt", "Zeta is the last file in path order.\nIts lines end in CRLF.\n"),
]


def make_tarball(path: Path, members: list[tuple[str, bytes]], mode: str = "w:xz", mtime: int = 1_700_000_000,
                 links: bool = True) -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            archive.addfile(info, io.BytesIO(data))
        if links:
            link = tarfile.TarInfo("linux/Documentation/link.rst")
            link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "index.rst", mtime
            archive.addfile(link)
    return path


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    return make_tarball(tmp_path / "linux-source.tar.xz", MEMBERS)


def test_keeps_english_prose_in_sorted_path_order(tarball: Path) -> None:
    assert documentation_files(tarball) == KEPT


def test_corpus_is_each_file_after_its_separator_line(tarball: Path) -> None:
    data, count = build_corpus(tarball)
    assert count == len(KEPT)
    assert data == "".join(SEPARATOR.format(path=path) + text for path, text in KEPT).encode("utf-8")
    text = data.decode("utf-8")  # strictly valid UTF-8
    assert text.splitlines()[0] == "==> Documentation/admin-guide/README.rst <=="
    for excluded in ("translations", "调度", "pianificatore", "PNG", "svg", "0x", "NUL", "devicetree", "Feature",
                     "sysfs", "link.rst", "scheduler core", "read the documentation"):
        assert excluded not in text


def test_undecodable_bytes_are_dropped(tarball: Path) -> None:
    text = dict(documentation_files(tarball))["Documentation/broken.rst"]
    assert text == "Caf crme: bytes that are not UTF-8 are dropped.\n"
    assert "\ufffd" not in text


def test_deterministic_across_member_order_mtime_and_compression(tmp_path: Path, tarball: Path) -> None:
    first, _ = build_corpus(tarball)
    assert build_corpus(tarball)[0] == first
    shuffled = make_tarball(tmp_path / "other.tar.gz", MEMBERS[::-1], mode="w:gz", mtime=0)
    assert build_corpus(shuffled)[0] == first
    plain = make_tarball(tmp_path / "plain.tar", MEMBERS[3:] + MEMBERS[:3], mode="w", links=False)
    assert build_corpus(plain)[0] == first


def test_documentation_at_the_top_of_the_tarball(tmp_path: Path) -> None:
    members = [(name.removeprefix("linux/"), data) for name, data in MEMBERS]
    top = make_tarball(tmp_path / "top.tar.xz", members, links=False)
    assert documentation_files(top) == KEPT


def test_documentation_path() -> None:
    assert documentation_path("linux-source-6.1/Documentation/a/b.rst") == "Documentation/a/b.rst"
    assert documentation_path("./Documentation/b.txt") == "Documentation/b.txt"
    assert documentation_path("Documentation/b.txt") == "Documentation/b.txt"
    assert documentation_path("linux/drivers/Documentation/b.txt") is None
    assert documentation_path("linux/Documentation") is None


def test_cli_writes_the_file_and_prints_size_count_and_hash(tmp_path: Path, tarball: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data" / "kernel_docs.txt"
    assert main(["--out", str(out), "--tarball", str(tarball)]) == 0
    data = out.read_bytes()
    assert data == build_corpus(tarball)[0]
    printed = capsys.readouterr().out
    assert f"{len(data):,} bytes" in printed and f"{len(KEPT)} files" in printed
    assert hashlib.sha256(data).hexdigest() in printed
    assert not list(out.parent.glob("*.partial"))


def test_missing_tarball_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.tar.xz"
    with pytest.raises(FileNotFoundError, match="apt-get install linux-source-6.1"):
        build_corpus(missing)
    assert main(["--out", str(tmp_path / "out.txt"), "--tarball", str(missing)]) == 1
    assert "no kernel source tarball" in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()


def test_tarball_without_documentation_is_a_clear_error(tmp_path: Path) -> None:
    other = make_tarball(tmp_path / "other.tar.xz", [("linux/README", b"hello\n"), ("linux/docs/a.rst", b"x\n")],
                         links=False)
    with pytest.raises(ValueError, match="no Documentation/ directory"):
        build_corpus(other)
    only_excluded = make_tarball(tmp_path / "excluded.tar.xz", MEMBERS[1:5], links=False)
    with pytest.raises(ValueError, match="no English .rst or .txt prose"):
        build_corpus(only_excluded)


def test_not_a_tarball_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tar.xz"
    bogus.write_bytes(b"this is not an archive")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        build_corpus(bogus)


def test_mostly_table_files_are_left_out() -> None:
    assert kernel_docs.letter_share(TABLE) < kernel_docs.MIN_LETTER_SHARE <= kernel_docs.letter_share(PROSE)
    assert not kernel_docs.kept("Documentation/tables.rst", TABLE)
    assert kernel_docs.kept("Documentation/prose.rst", PROSE)
    assert not kernel_docs.kept("Documentation/prose.yaml", PROSE)
    assert not kernel_docs.kept("Documentation/translations/ja_JP/prose.rst", PROSE)
