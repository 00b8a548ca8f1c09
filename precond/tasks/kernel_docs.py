"""A natural-language corpus for ``char_lm``: the English documentation of the Linux kernel, as one text file.

What it is: the prose files (``.rst`` and ``.txt``) under ``Documentation/`` of the Linux 6.1 source that Debian
ships as the package ``linux-source-6.1`` (``apt-get install linux-source-6.1`` puts
``/usr/src/linux-source-6.1.tar.xz`` on the machine). :func:`build_corpus` reads them straight from the tarball
(nothing is unpacked to disk), keeps the English prose, and concatenates them in sorted path order, each preceded
by a one-line separator ``==> Documentation/<path> <==``. Every file is decoded as UTF-8 with undecodable bytes
dropped, its line ends normalised to ``\\n``, and a final newline added where missing, so the result is valid
UTF-8 and the same tarball always gives the same bytes (:func:`main` prints the sha256).

What is left out (:func:`kept`):

- other files than ``.rst``/``.txt``: images (``.svg``, ``.png``, ...), the ABI descriptions (extension-less) and
  the devicetree YAML schemas, scripts, Sphinx configuration;
- ``Documentation/translations/`` (Chinese, Japanese, Korean, Italian, Spanish translations), the only
  non-English tree;
- ``Documentation/devicetree/bindings/``: hardware descriptions written as property lists and device-tree source,
  not prose; ``Documentation/features/``: the per-architecture support matrices;
- any file with a NUL byte (binary), and any file that is mostly code or tables by one easy rule: letters are
  fewer than :data:`MIN_LETTER_SHARE` (60 %) of its non-blank characters (the median file has 83 %; ASCII
  tables, register maps, card lists and listings fall below: 197 of the 6.1 files, 0.66 MB).

Licence: the kernel's documentation is GPL-2.0 for the most part, with some files under other licences (GFDL,
CC-BY-4.0, dual GPL/BSD; each file's SPDX line says which). The project does not redistribute the corpus: the file
is made on the user's machine from the Debian package, kept out of git (``data/`` is ignored) and only used as
training data.

Why this corpus: it is natural-language English (technical prose, written by hundreds of authors), large enough
for more than 10 M training tokens without repeating one, obtainable from a package registry with no other
network access, deterministic for a given package version, and not Project Gutenberg books. From Debian's
``linux-source-6.1`` 6.1.192-3 it is 21,601,038 bytes (20.6 MiB) in 2,654 files, sha256 ``609f52645e42…``
(``ablations/gpt2_small.toml`` reads its first 13,000,000 bytes). Tokenizer: bytes (``char_lm``'s vocabulary of 256).

Usage::

    apt-get install -y linux-source-6.1
    python -m precond.tasks.kernel_docs --out data/kernel_docs.txt [--tarball /usr/src/linux-source-6.1.tar.xz]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_TARBALL = "/usr/src/linux-source-6.1.tar.xz"
"""Where Debian's ``linux-source-6.1`` package puts the kernel source."""

SUFFIXES = (".rst", ".txt")
"""The prose files kept."""

EXCLUDED_TREES = ("Documentation/translations/", "Documentation/devicetree/bindings/", "Documentation/features/")
"""Trees left out whole: translations (not English), hardware bindings and support matrices (not prose)."""

MIN_LETTER_SHARE = 0.6
"""A file whose letters are fewer than this share of its non-blank characters is mostly code or tables."""

SEPARATOR = "==> {path} <==\n"
"""The line before each file."""


def documentation_path(member: str) -> Optional[str]:
    """``Documentation/...`` for a tar member under ``Documentation/`` at the top or below one top-level directory
    (``linux-source-6.1/Documentation/...``), else ``None``."""
    parts = [part for part in member.split("/") if part not in ("", ".")]
    for start in (0, 1):
        if len(parts) > start + 1 and parts[start] == "Documentation":
            return "/".join(parts[start:])
    return None


def letter_share(text: str) -> float:
    """Letters over non-blank characters (1.0 for a blank text)."""
    visible = [char for char in text if not char.isspace()]
    return sum(char.isalpha() for char in visible) / len(visible) if visible else 1.0


def kept(path: str, text: str) -> bool:
    """Whether the file ``path`` (``Documentation/...``), decoded as ``text``, belongs to the corpus: an English
    ``.rst``/``.txt`` file of prose (see the module's docstring)."""
    if not path.endswith(SUFFIXES) or path.startswith(EXCLUDED_TREES):
        return False
    if "\x00" in text or not text.strip():
        return False
    return letter_share(text) >= MIN_LETTER_SHARE


def normalise(data: bytes) -> str:
    """``data`` as text: UTF-8 with undecodable bytes dropped, a byte-order mark removed, ``\\r\\n`` and ``\\r``
    line ends made ``\\n``, and a final newline."""
    text = data.decode("utf-8", errors="ignore").lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def documentation_files(tarball: str | os.PathLike[str] = DEFAULT_TARBALL) -> list[tuple[str, str]]:
    """The kept files of ``Documentation/`` in the tarball (any compression ``tarfile`` reads), as
    ``(path, text)`` sorted by path; read as a stream, nothing written to disk. Only regular files count (links
    are skipped); a path present twice keeps its last copy, as ``tar x`` would."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise FileNotFoundError(f"no kernel source tarball at {str(tarball)!r}: install Debian's package with "
                                f"'apt-get install linux-source-6.1' (it puts {DEFAULT_TARBALL}) or pass --tarball")
    files: dict[str, str] = {}
    seen_documentation = False
    try:
        with tarfile.open(tarball, mode="r|*") as archive:
            for member in archive:
                path = documentation_path(member.name)
                if path is None:
                    continue
                seen_documentation = True
                if not member.isfile() or not path.endswith(SUFFIXES) or path.startswith(EXCLUDED_TREES):
                    files.pop(path, None)
                    continue
                handle = archive.extractfile(member)
                text = normalise(handle.read() if handle is not None else b"")
                if kept(path, text):
                    files[path] = text
                else:
                    files.pop(path, None)
    except tarfile.TarError as error:
        raise ValueError(f"{str(tarball)!r} is not a readable tar archive: {error}") from None
    if not seen_documentation:
        raise ValueError(f"{str(tarball)!r} has no Documentation/ directory (at its top or under one top-level "
                         f"directory): is it a Linux kernel source tarball?")
    if not files:
        raise ValueError(f"{str(tarball)!r} has a Documentation/ directory but no English .rst or .txt prose in it")
    return sorted(files.items())


def build_corpus(tarball: str | os.PathLike[str] = DEFAULT_TARBALL) -> tuple[bytes, int]:
    """The corpus as UTF-8 bytes and its number of files: each kept file after its separator line, in sorted
    path order."""
    files = documentation_files(tarball)
    text = "".join(SEPARATOR.format(path=path) + body for path, body in files)
    return text.encode("utf-8"), len(files)


def write_corpus(out: str | os.PathLike[str], tarball: str | os.PathLike[str] = DEFAULT_TARBALL) -> dict[str, object]:
    """Write the corpus to ``out`` (its directory made if needed; replaced whole, never left half written) and
    return ``{"path", "bytes", "files", "sha256"}``."""
    data, count = build_corpus(tarball)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(data)
    partial.replace(out)
    return {"path": str(out), "bytes": len(data), "files": count, "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m precond.tasks.kernel_docs",
        description="Write the English prose of the Linux kernel's Documentation/ (from Debian's linux-source-6.1 "
                    "tarball, read without unpacking) as one UTF-8 text file for char_lm's data=FILE.")
    parser.add_argument("--out", required=True, help="the text file to write, e.g. data/kernel_docs.txt")
    parser.add_argument("--tarball", default=DEFAULT_TARBALL, help=f"the kernel source tarball (default "
                        f"{DEFAULT_TARBALL})")
    args = parser.parse_args(argv)
    try:
        written = write_corpus(args.out, args.tarball)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{written['path']}: {written['bytes']:,} bytes, {written['files']:,} files, sha256 {written['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
