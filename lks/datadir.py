"""The benchmark data directory and its pinned data files: where the directory is
(:func:`data_dir`, ``$LKS_DATA_DIR``), the files lks knows with their SHA-256 and public URL
(``KNOWN_FILES``), and :func:`data_file`, which verifies a file and downloads a missing known one.

Nothing here touches the network at import; only :func:`data_file` may download, and only files
it knows a public URL and a SHA-256 for.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import NamedTuple


class DataFileInfo(NamedTuple):
    """A pinned data file: its hash, a direct public URL (if any) and human directions to it."""

    sha256: str
    url: str | None  # public direct download, or None when only a manual route exists
    source: str  # where a person gets it


_LKS_RAW = "https://raw.githubusercontent.com/Linuxin-xxx/LKS/main/data"
KNOWN_FILES: dict[str, DataFileInfo] = {
    "lks/cf_eval_data.json": DataFileInfo(
        "765a69a29238af887a40e22d0f0d9949cd3735d9fe3ac20c5fd3e9025e08f9b8", f"{_LKS_RAW}/counterfact/cf_eval_data.json",
        "the LKS repository, https://github.com/Linuxin-xxx/LKS (data/counterfact/cf_eval_data.json)"),
    "lks/zsre_eval_data.json": DataFileInfo(
        "d14acb1bc87411560a4d7ac385f6c9e4f27ec44888509e6617f87d12d54b55a8", f"{_LKS_RAW}/zsre/zsre_eval_data.json",
        "the LKS repository, https://github.com/Linuxin-xxx/LKS (data/zsre/zsre_eval_data.json)"),
    "counterfact_mend/counterfact-edit.json": DataFileInfo(
        "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec", None,
        "https://github.com/Jometeorie/KnowledgeSpread (data/counterfact/counterfact-edit.json; CounterFact "
        "in the MEND/EasyEdit form, case ids as in ROME's CounterFact)"),
    "gsm8k/test.jsonl": DataFileInfo(
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
        "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)"),
    "sst2/dev.tsv": DataFileInfo(
        "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", None,
        "GLUE SST-2 (dev.tsv from the GLUE data), or datasets.load_dataset('glue', 'sst2') split 'validation'"),
    "rte/superglue_val.jsonl": DataFileInfo(
        "ab990507bf5f35dc176cba7770a72bfa2c50a88ed72b8cc95cfbf9db95ab1af1", None,
        "SuperGLUE RTE val.jsonl (https://super.gluebenchmark.com/tasks), or datasets.load_dataset('glue', 'rte')"),
    "rte/validation.parquet": DataFileInfo(
        "fb2aa2e04f551133ba663617a15ae133dc22b0f6a969bc0629b5ea6003ee9cf8", None,
        "GLUE RTE validation split: datasets.load_dataset('glue', 'rte')['validation'].to_parquet(...)"),
    "wikitext2/wiki.test.raw": DataFileInfo(
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", None,
        "WikiText-2 raw test split: datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')"),
}
_PREFIX_SOURCES = {"mmlu/": "MMLU (Hendrycks et al. 2021): datasets.load_dataset('cais/mmlu', 'all'), one csv per subject"}
ENV_DATA_DIR = "LKS_DATA_DIR"
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> verified sha256


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The benchmark data directory: ``path`` if given, else ``$LKS_DATA_DIR``, else ``~/.cache/lks/data``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lks" / "data"


_resolve_dir = data_dir  # data_file's parameter shadows the function name


def _sha256_stream(path: Path) -> str:
    from lks.utils import sha256_file

    return sha256_file(path)


def _sums_entry(root: Path, rel: PurePosixPath) -> str | None:
    """Expected hash of ``rel`` from a SHA256SUMS file in its folder or any parent up to ``root``."""
    parts = rel.parts
    for k in range(len(parts) - 1, -1, -1):
        sums = root.joinpath(*parts[:k], "SHA256SUMS")
        if not sums.is_file():
            continue
        want = "/".join(parts[k:])
        for line in sums.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*").removeprefix("./") == want:
                return digest.lower()
    return None


def _verify(path: Path, rel: PurePosixPath, root: Path) -> None:
    info = KNOWN_FILES.get(str(rel))
    expected = info.sha256 if info else _sums_entry(root, rel)
    if expected is None:  # not pinned anywhere: nothing to check
        return
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if _VERIFIED.get(key) == expected:  # hashing 4 MB files on every load is wasted time
        return
    actual = _sha256_stream(path)
    if actual != expected:
        from lks.data import DataChecksumError  # lks.data does not import this module: no cycle

        raise DataChecksumError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
                                "The file is corrupt or a different version; delete it and fetch it again "
                                f"({info.source if info else 'see the SHA256SUMS next to it'}).")
    _VERIFIED[key] = expected


def _open_url(url: str, timeout: float):
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URLs from KNOWN_FILES


def _download(url: str, dest: Path, sha256: str, timeout: float = 15.0) -> None:
    """Stream ``url`` into a temporary sibling of ``dest``, check its hash, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    from lks.utils import temp_sibling

    fd, tmp = temp_sibling(dest)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, _open_url(url, timeout) as resp:
            while block := resp.read(1 << 20):
                h.update(block)
                f.write(block)
        if h.hexdigest() != sha256:
            from lks.data import DataChecksumError

            raise DataChecksumError(f"downloaded {url} has sha256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def data_file(relpath: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of a benchmark data file, verified against its pinned SHA-256.

    Known files (``KNOWN_FILES``) are checked against the hash pinned here; other files (the MMLU
    csvs) against a ``SHA256SUMS`` in their folder or a parent, when there is one. A verified
    result is cached per (path, mtime, size) for the life of the process. A missing known file with
    a public URL is downloaded (atomically, 15 s timeout) unless ``download`` is false or
    ``$LKS_OFFLINE`` is set.

    Raises:
        FileNotFoundError: the file is missing and could not be downloaded; the message names the
            file, the directory searched, ``LKS_DATA_DIR`` and where to get it.
        DataChecksumError: the file (or the download) does not match its pinned hash.
    """
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"relpath must be relative to the data directory, got {relpath!r}")
    root = _resolve_dir(data_dir)
    path = root.joinpath(*rel.parts)
    if path.is_file():
        _verify(path, rel, root)
        return path
    info = KNOWN_FILES.get(str(rel))
    failure = ""
    if download and info is not None and info.url and not os.environ.get("LKS_OFFLINE"):
        try:
            _download(info.url, path, info.sha256)
            _verify(path, rel, root)
            return path
        except (OSError, urllib.error.URLError, TimeoutError) as e:
            failure = f"\nDownloading it from {info.url} failed: {e}"
    where = info.source if info else next((s for p, s in _PREFIX_SOURCES.items() if str(rel).startswith(p)),
                                          "see the lks README, section 'Data'")
    raise FileNotFoundError(
        f"data file {str(rel)!r} not found in the data directory {root} (looked for {path}).\n"
        f"Put the file there, or point ${ENV_DATA_DIR} (or data_dir=...) at the directory that holds it.\n"
        f"Where to get it: {where}{failure}")
