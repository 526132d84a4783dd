"""Download MS MARCO passage v1 and the TREC DL 2019/2020 judgments into the canonical layout.

What comes from where (URLs, sizes and md5 sums as listed by ir_datasets):

| canonical file | official source |
| --- | --- |
| collection.tsv | ``collection.tsv`` in collectionandqueries.tar.gz (1.06 GB) |
| queries.train.tsv | ``queries.train.tsv`` in queries.tar.gz |
| qrels.train.txt | qrels.train.tsv |
| queries.dev.tsv / qrels.dev.txt | ``queries.dev.small.tsv`` / ``qrels.dev.small.tsv`` in collectionandqueries.tar.gz |
| queries.dl19.tsv / qrels.dl19.txt | msmarco-test2019-queries.tsv.gz / NIST 2019qrels-pass.txt |
| queries.dl20.tsv / qrels.dl20.txt | msmarco-test2020-queries.tsv.gz / NIST 2020qrels-pass.txt |

``dev`` is the official dev *small* set (6,980 queries). The TREC DL query files hold 200 topics each but only
43 (2019) and 54 (2020) were judged; with ``judged_only`` (the default) the others are dropped, as evaluation
tools would ignore them anyway. Passage text is kept byte for byte, including the collection's mis-decoded
characters (``â€™``), as Anserini/Pyserini index it.

Robustness: each file downloads to ``<name>.part`` and resumes with an HTTP Range request after a broken
connection (retried here) or a killed process (on the next call). A finished file is checked against its known
size and md5; on a mismatch the bad file is *deleted* (resuming a complete but corrupt file cannot repair it) and
:class:`ChecksumError` says to run again. Files already downloaded or converted are skipped, so a rerun after
any failure continues where it stopped.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from tqdm import tqdm

from dense.atomic import atomic_file
from hybrid.artifacts import write_json_atomic
from hybrid.msmarco import (
    MANIFEST_FILE,
    SPLITS,
    DataFormatError,
    MsMarcoDir,
    parse_qrels_lines,
    parse_tsv_lines,
    read_qrels,
)

logger = logging.getLogger(__name__)

MSMARCO_BASE = "https://msmarco.z22.web.core.windows.net/msmarcoranking/"
TREC_DEEP_BASE = "https://trec.nist.gov/data/deep/"
# The MS MARCO blob host serves Range requests on large files reliably with a recent storage API version.
_MS_HEADERS = (("X-Ms-Version", "2019-12-12"),)
_USER_AGENT = "hybrid-msmarco/0.1 (+urllib)"


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and what to do."""


class ChecksumError(DownloadError):
    """A downloaded file has the wrong size or md5 (and was deleted)."""


@dataclass(frozen=True)
class Resource:
    """One remote file: where it is, the local file name, and its size/md5 when known."""

    url: str
    filename: str
    md5: str | None = None
    size: int | None = None
    headers: tuple[tuple[str, str], ...] = ()


MSMARCO_V1_RESOURCES: dict[str, Resource] = {
    "collectionandqueries": Resource(
        MSMARCO_BASE + "collectionandqueries.tar.gz",
        "collectionandqueries.tar.gz",
        md5="31644046b18952c1386cd4564ba2ae69",
        size=1_057_717_952,
        headers=_MS_HEADERS,
    ),
    "queries": Resource(
        MSMARCO_BASE + "queries.tar.gz",
        "queries.tar.gz",
        md5="c177b2795d5f2dcc524cf00fcd973be1",
        size=18_882_551,
        headers=_MS_HEADERS,
    ),
    "qrels.train": Resource(
        MSMARCO_BASE + "qrels.train.tsv",
        "qrels.train.tsv",
        md5="733fb9fe12d93e497f7289409316eccf",
        size=10_589_532,
        headers=_MS_HEADERS,
    ),
    "dl19.queries": Resource(
        MSMARCO_BASE + "msmarco-test2019-queries.tsv.gz",
        "msmarco-test2019-queries.tsv.gz",
        md5="eda71eccbe4d251af83150abe065368c",
        size=4_276,
        headers=_MS_HEADERS,
    ),
    "dl19.qrels": Resource(
        TREC_DEEP_BASE + "2019qrels-pass.txt",
        "2019qrels-pass.txt",
        md5="2f4be390198da108f6845c822e5ada14",
        size=187_092,
    ),
    "dl20.queries": Resource(
        MSMARCO_BASE + "msmarco-test2020-queries.tsv.gz",
        "msmarco-test2020-queries.tsv.gz",
        md5="00a406fb0d14ed3752d70d1e4eb98600",
        size=4_131,
        headers=_MS_HEADERS,
    ),
    "dl20.qrels": Resource(
        TREC_DEEP_BASE + "2020qrels-pass.txt",
        "2020qrels-pass.txt",
        md5="0355ccee7509ac0463e8278186cdd8d1",
        size=218_617,
    ),
}


@dataclass(frozen=True)
class _Source:
    """Where a canonical file's content comes from: a resource, and the tar member inside it (None: the file)."""

    resource: str
    member: str | None = None


_COLLECTION_SOURCE = _Source("collectionandqueries", "collection.tsv")
# split -> (queries source, qrels source)
_SPLIT_SOURCES: dict[str, tuple[_Source, _Source]] = {
    "train": (_Source("queries", "queries.train.tsv"), _Source("qrels.train")),
    "dev": (
        _Source("collectionandqueries", "queries.dev.small.tsv"),
        _Source("collectionandqueries", "qrels.dev.small.tsv"),
    ),
    "dl19": (_Source("dl19.queries"), _Source("dl19.qrels")),
    "dl20": (_Source("dl20.queries"), _Source("dl20.qrels")),
}
JUDGED_ONLY_SPLITS = ("dl19", "dl20")


# --- one file ----------------------------------------------------------------------------------------------------


def download_file(
    resource: Resource,
    dest_dir: str | os.PathLike,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    backoff_s: float = 2.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Fetch ``resource`` into ``dest_dir`` (skipped when already there), resuming a ``.part`` file; verify size/md5."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / resource.filename
    if final.exists():
        logger.info("already downloaded: %s", final)
        return final
    part = final.with_name(final.name + ".part")
    start = time.perf_counter()
    resumed_from = part.stat().st_size if part.exists() else 0
    for attempt in range(retries + 1):
        try:
            _fetch(resource, part, timeout=timeout, chunk_size=chunk_size, progress=progress)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == retries:
                raise DownloadError(f"{resource.url}: HTTP {e.code} {e.reason}. {_what_to_do(resource, part)}") from e
            err: Exception = e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if attempt == retries:
                raise DownloadError(
                    f"{resource.url}: {e} (after {retries + 1} attempts). {_what_to_do(resource, part)}"
                ) from e
            err = e
        wait = backoff_s * 2**attempt
        logger.warning(
            "download of %s failed (%s); retry %d/%d in %.0fs", resource.url, err, attempt + 1, retries, wait
        )
        time.sleep(wait)
    _verify(resource, part, progress=progress)
    os.replace(part, final)
    size = final.stat().st_size
    elapsed = time.perf_counter() - start
    logger.info(
        "downloaded %s: %.1f MB (%.1f MB resumed) in %.1fs (%.1f MB/s)",
        final,
        size / 1e6,
        resumed_from / 1e6,
        elapsed,
        (size - resumed_from) / 1e6 / max(elapsed, 1e-9),
    )
    return final


def _what_to_do(resource: Resource, part: Path) -> str:
    have = part.stat().st_size if part.exists() else 0
    kept = f"the {have:,} bytes in {part} are kept and the next run resumes from there; " if have else ""
    return f"Check the network or the URL; {kept}pass urls={{...}} to use a mirror."


def _fetch(resource: Resource, part: Path, *, timeout: float, chunk_size: int, progress: bool) -> None:
    """Append the missing bytes of ``resource`` to ``part`` (a Range request when part has some)."""
    have = part.stat().st_size if part.exists() else 0
    if resource.size is not None and have >= resource.size:
        return  # complete (or too long: _verify deletes it)
    headers = {"User-Agent": _USER_AGENT, **dict(resource.headers)}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(resource.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is already whole
            return
        raise
    with response:
        if have and response.status != 206:
            logger.warning("%s ignored the Range request; downloading from the start", resource.url)
            have = 0
        elif have:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(f"{resource.url}: asked for bytes {have}- but got Content-Range {content_range!r}")
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = have + expected if expected is not None else resource.size
        received = 0
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=resource.filename,
                mininterval=1,
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(chunk_size):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received < expected:
        # http.client returns a short body silently when the connection drops; make it retryable.
        raise ConnectionError(f"connection closed after {have + received:,} of {have + expected:,} bytes")


def _verify(resource: Resource, part: Path, *, progress: bool) -> None:
    size = part.stat().st_size
    if resource.size is not None and size != resource.size:
        part.unlink()
        raise ChecksumError(
            f"{resource.url}: downloaded {size:,} bytes, expected {resource.size:,}; deleted {part}. "
            "Run again to download it afresh; if the server's file changed on purpose, pass its new size and md5 "
            "in a Resource via urls=."
        )
    if resource.md5 is None:
        return
    digest = hashlib.md5()
    with (
        open(part, "rb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"md5 {resource.filename}", mininterval=1, disable=not progress
        ) as bar,
    ):
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != resource.md5:
        part.unlink()
        raise ChecksumError(
            f"{resource.url}: md5 {digest.hexdigest()} does not match the expected {resource.md5}; deleted {part}. "
            "Run again to download it afresh; if the server's file changed on purpose, pass its new md5 in a "
            "Resource via urls=."
        )


# --- the whole dataset -------------------------------------------------------------------------------------------


def download_msmarco(
    out_dir: str | os.PathLike,
    urls: Mapping[str, str | Resource] | None = None,
    *,
    splits: Sequence[str] = SPLITS,
    download_dir: str | os.PathLike | None = None,
    keep_downloads: bool = True,
    judged_only: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> MsMarcoDir:
    """Download MS MARCO passage v1 + TREC DL 2019/2020 and write the canonical layout into ``out_dir``.

    ``urls`` overrides entries of :data:`MSMARCO_V1_RESOURCES` by name: a string replaces only the URL (a mirror
    of the same file, so the official md5/size still apply), a :class:`Resource` replaces everything. Archives go
    to ``download_dir`` (default ``out_dir/downloads``) and are deleted at the end unless ``keep_downloads``.
    Returns the directory; call ``.validate()`` on it for counts.
    """
    unknown = sorted(set(splits) - set(_SPLIT_SOURCES))
    if unknown:
        raise ValueError(f"cannot download splits {unknown}; known: {sorted(_SPLIT_SOURCES)}")
    resources = _resolve(urls)
    out = MsMarcoDir(Path(out_dir))
    downloads = Path(download_dir) if download_dir is not None else out.root / "downloads"
    out.root.mkdir(parents=True, exist_ok=True)

    # canonical file -> (source, kind); qrels before queries so the DL queries can be filtered by judgments.
    plan: dict[Path, tuple[_Source, str]] = {out.collection_path: (_COLLECTION_SOURCE, "passages")}
    for split in splits:
        queries_src, qrels_src = _SPLIT_SOURCES[split]
        plan[out.qrels_path(split)] = (qrels_src, "qrels")
        plan[out.queries_path(split)] = (queries_src, "queries")
    todo = {path: job for path, job in plan.items() if not path.exists()}
    for path in plan.keys() - todo.keys():
        logger.info("already converted: %s", path)

    fetched: dict[str, Path] = {}
    for name in dict.fromkeys(src.resource for src, _ in todo.values()):
        fetched[name] = download_file(resources[name], downloads, retries=retries, timeout=timeout, progress=progress)

    def converter(path: Path, kind: str) -> Callable[[IO[bytes], str], None]:
        if kind == "passages":
            return lambda stream, label: _convert_passages(stream, path, label, progress)
        if kind == "qrels":
            return lambda stream, label: _convert_qrels(stream, path, label)
        split = path.name[len("queries.") : -len(".tsv")]
        keep_judged = judged_only and split in JUDGED_ONLY_SPLITS
        return lambda stream, label: _convert_queries(
            stream, path, label, set(read_qrels(out.qrels_path(split))) if keep_judged else None
        )

    # archives: one streaming pass each, extracting every member still needed
    for name, archive in fetched.items():
        members = {
            src.member: (path, kind) for path, (src, kind) in todo.items() if src.resource == name and src.member
        }
        if members:
            _extract(archive, {m: converter(p, k) for m, (p, k) in members.items()})
    for path, (src, kind) in todo.items():
        if src.member is None:
            archive = fetched[src.resource]
            opener = gzip.open if archive.name.endswith(".gz") else open
            with opener(archive, "rb") as stream:
                converter(path, kind)(stream, archive.name)

    write_json_atomic(
        out.root / MANIFEST_FILE,
        {
            "kind": "msmarco-passage-v1",
            "splits": list(splits),
            "dev": "dev.small",
            "judged_only_splits": [s for s in splits if judged_only and s in JUDGED_ONLY_SPLITS],
            "resources": {name: {"url": r.url, "md5": r.md5, "size": r.size} for name, r in resources.items()},
        },
    )
    if not keep_downloads:  # only the files this function downloads: download_dir may be shared
        for resource in resources.values():
            (downloads / resource.filename).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            downloads.rmdir()  # when empty
    logger.info("MS MARCO passage v1 ready in %s (splits: %s)", out.root, ", ".join(splits))
    return out


def _resolve(urls: Mapping[str, str | Resource] | None) -> dict[str, Resource]:
    resources = dict(MSMARCO_V1_RESOURCES)
    for name, value in (urls or {}).items():
        if name not in resources:
            raise ValueError(f"unknown resource {name!r} in urls; known: {sorted(resources)}")
        resources[name] = value if isinstance(value, Resource) else replace(resources[name], url=value)
    return resources


def _extract(archive: Path, wanted: Mapping[str, Callable[[IO[bytes], str], None]]) -> None:
    """Stream ``archive`` (tar.gz) once, handing each wanted member (matched by base name) to its converter."""
    done: set[str] = set()
    names: list[str] = []
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            names.append(member.name)
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted and base not in done:
                logger.info("extracting %s from %s (%.1f MB)", member.name, archive.name, member.size / 1e6)
                stream = tar.extractfile(member)
                assert stream is not None  # a regular file always has a stream
                wanted[base](stream, f"{archive.name}:{member.name}")
                done.add(base)
    missing = sorted(set(wanted) - done)
    if missing:
        raise DataFormatError(
            archive,
            None,
            f"archive has no member(s) {missing}; it holds {names[:20]}",
            "The file is not the expected MS MARCO archive; delete it and download again, or check urls=.",
        )


def _convert_passages(stream: IO[bytes], dest: Path, label: str, progress: bool) -> None:
    count = 0
    start = time.perf_counter()
    with (
        atomic_file(dest) as f,
        tqdm(desc=f"write {dest.name}", unit=" passages", mininterval=2, disable=not progress) as bar,
    ):
        for _, pid, text in parse_tsv_lines(stream, label, "passage"):
            f.write(f"{pid}\t{text}\n".encode())
            count += 1
            bar.update()
    elapsed = time.perf_counter() - start
    logger.info("wrote %s: %d passages in %.1fs (%.0f/s)", dest, count, elapsed, count / max(elapsed, 1e-9))


def _convert_queries(stream: IO[bytes], dest: Path, label: str, keep: set[str] | None) -> None:
    seen: set[str] = set()
    with atomic_file(dest) as f:
        for lineno, qid, text in parse_tsv_lines(stream, label, "query"):
            if qid in seen:
                raise DataFormatError(label, lineno, f"duplicate query id {qid!r} (already on an earlier line)")
            seen.add(qid)
            if keep is None or qid in keep:
                f.write(f"{qid}\t{text}\n".encode())
    kept = len(seen) if keep is None else len(seen & keep)
    logger.info("wrote %s: %d queries%s", dest, kept, f" (the judged ones of {len(seen)})" if keep is not None else "")


def _convert_qrels(stream: IO[bytes], dest: Path, label: str) -> None:
    count = 0
    with atomic_file(dest) as f:
        for _, qid, pid, grade in parse_qrels_lines(stream, label):
            f.write(f"{qid} 0 {pid} {grade}\n".encode())
            count += 1
    logger.info("wrote %s: %d judgments", dest, count)
