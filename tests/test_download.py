"""MS MARCO download against a local HTTP server serving small archives in the official formats."""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator

import pytest
from official_msmarco import FileServer, served_at_official_names, tar_gz, toy_resources, tsv

from hybrid.download import (
    MSMARCO_V1_RESOURCES,
    ChecksumError,
    DownloadError,
    Resource,
    download_file,
    download_msmarco,
)
from hybrid.msmarco import MsMarcoDir, read_collection

_rng = random.Random(0)
# random words so the archive does not compress to a few hundred bytes: resume tests need something to cut
PASSAGES = {
    str(i): f"passage {i}\twith a tab, â€™ as in the real file: "
    + " ".join(f"w{_rng.randrange(10**6)}" for _ in range(30))
    for i in range(300)
}
TRAIN_QUERIES = {"1": "train one", "2": "train two", "3": "train three"}
DEV_QUERIES = {"10": "dev one", "11": "dev two", "12": "dev three"}
DEV_SMALL = {"10": "dev one", "12": "dev three"}
DL19_QUERIES = {"100": "dl19 judged", "101": "dl19 unjudged", "102": "dl19 judged too"}
DL20_QUERIES = {"200": "dl20 judged", "201": "dl20 unjudged"}


# File contents by resource name, in the formats of the official files (member names as in the real archives).
OFFICIAL_FILES: dict[str, bytes] = {
    "collectionandqueries": tar_gz(
        {
            "collection.tsv": tsv(PASSAGES),
            "queries.train.tsv": tsv(TRAIN_QUERIES),
            "queries.dev.tsv": tsv(DEV_QUERIES),
            "queries.dev.small.tsv": tsv(DEV_SMALL),
            "queries.eval.tsv": tsv({"50": "eval"}),
            "qrels.train.tsv": b"1\t0\t5\t1\n2\t0\t6\t1\n",
            "qrels.dev.small.tsv": b"10\t0\t7\t1\n12\t0\t8\t1\n",
        }
    ),
    "queries": tar_gz(
        {
            "queries.train.tsv": tsv(TRAIN_QUERIES),
            "queries.dev.tsv": tsv(DEV_QUERIES),
            "queries.eval.tsv": tsv({"50": "eval"}),
        }
    ),
    "qrels.train": b"1\t0\t5\t1\n2\t0\t6\t1\n",
    "dl19.queries": gzip.compress(tsv(DL19_QUERIES)),
    "dl19.qrels": b"100 Q0 1 3\n100 Q0 2 0\n102 Q0 3 2\n",
    "dl20.queries": gzip.compress(tsv(DL20_QUERIES)),
    "dl20.qrels": b"200 Q0 4 1\n",
}


@pytest.fixture
def official_server() -> Iterator[FileServer]:
    yield from FileServer(served_at_official_names(OFFICIAL_FILES)).serve()


def local_resources(server: FileServer, **md5_overrides: str) -> dict[str, Resource]:
    """The official resource table pointed at the test server, with this data's sizes and md5 sums."""
    return toy_resources(server, OFFICIAL_FILES, **md5_overrides)


def test_download_and_convert(official_server, tmp_path):
    out = download_msmarco(tmp_path / "marco", local_resources(official_server), progress=False)
    assert isinstance(out, MsMarcoDir)
    assert out.splits() == ["train", "dev", "dl19", "dl20"]
    assert dict(read_collection(out.collection_path)) == PASSAGES
    assert out.queries("train") == TRAIN_QUERIES
    assert out.queries("dev") == DEV_SMALL  # dev is dev.small
    assert out.queries("dl19") == {"100": "dl19 judged", "102": "dl19 judged too"}  # judged topics only
    assert out.queries("dl20") == {"200": "dl20 judged"}
    assert out.qrels_path("dl19").read_text() == "100 0 1 3\n100 0 2 0\n102 0 3 2\n"  # canonical 'qid 0 pid grade'
    assert out.qrels("train") == {"1": {"5": 1}, "2": {"6": 1}}
    summary = out.validate(progress=False)
    assert summary.passages == len(PASSAGES)
    assert summary.splits["dev"].judged_passages_missing == 0
    assert (out.root / "manifest.json").is_file()

    before = len(official_server.requests)
    download_msmarco(tmp_path / "marco", local_resources(official_server), progress=False)
    assert len(official_server.requests) == before  # everything done already: no request at all


def test_download_subset_of_splits_without_keeping_archives(official_server, tmp_path):
    shared = tmp_path / "shared-downloads"
    shared.mkdir()
    (shared / "unrelated.bin").write_bytes(b"not ours")
    out = download_msmarco(
        tmp_path / "marco",
        local_resources(official_server),
        splits=["dev"],
        download_dir=shared,
        keep_downloads=False,
        progress=False,
    )
    assert out.splits() == ["dev"]
    assert [p.name for p in shared.iterdir()] == ["unrelated.bin"]  # only our archives are removed
    assert {path for path, _ in official_server.requests} == {"/collectionandqueries.tar.gz"}


def test_resume_after_truncated_part(official_server, tmp_path):
    resource = local_resources(official_server)["collectionandqueries"]
    data = OFFICIAL_FILES["collectionandqueries"]
    half = len(data) // 2
    (tmp_path / f"{resource.filename}.part").write_bytes(data[:half])
    path = download_file(resource, tmp_path, progress=False)
    assert path.read_bytes() == data
    assert official_server.requests == [(f"/{resource.filename}", f"bytes={half}-")]
    assert not (tmp_path / f"{resource.filename}.part").exists()


def test_retry_resumes_a_dropped_connection(official_server, tmp_path):
    resource = local_resources(official_server)["collectionandqueries"]
    cut = len(OFFICIAL_FILES["collectionandqueries"]) // 3
    official_server.drop_after[f"/{resource.filename}"] = cut
    path = download_file(resource, tmp_path, backoff_s=0, progress=False)
    assert path.read_bytes() == OFFICIAL_FILES["collectionandqueries"]
    assert [r for _, r in official_server.requests] == [None, f"bytes={cut}-"]


def test_server_ignoring_range_restarts_cleanly(official_server, tmp_path):
    official_server.ignore_range = True
    resource = local_resources(official_server)["qrels.train"]
    (tmp_path / f"{resource.filename}.part").write_bytes(b"garbage!")
    assert download_file(resource, tmp_path, progress=False).read_bytes() == OFFICIAL_FILES["qrels.train"]


def test_checksum_mismatch_is_an_error_and_deletes_the_file(official_server, tmp_path):
    resources = local_resources(official_server, **{"dl19.qrels": "0" * 32})
    with pytest.raises(ChecksumError, match=r"md5 .* does not match the expected 0{32}.*Run again") as excinfo:
        download_msmarco(tmp_path / "marco", resources, splits=["dl19"], progress=False)
    assert resources["dl19.qrels"].url in str(excinfo.value)
    downloads = tmp_path / "marco" / "downloads"
    assert not (downloads / "2019qrels-pass.txt").exists()
    assert not (downloads / "2019qrels-pass.txt.part").exists()
    assert not (tmp_path / "marco" / "qrels.dl19.txt").exists()


def test_wrong_size_and_http_errors(official_server, tmp_path):
    good = local_resources(official_server)["qrels.train"]
    with pytest.raises(ChecksumError, match="expected 99"):
        download_file(Resource(good.url, good.filename, size=99), tmp_path, progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(Resource(f"{official_server.url}/missing.tsv", "missing.tsv"), tmp_path, progress=False)


def test_url_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown resource 'corpus'"):
        download_msmarco(tmp_path, {"corpus": "http://127.0.0.1:9/x"}, progress=False)
    with pytest.raises(ValueError, match="cannot download splits"):
        download_msmarco(tmp_path, splits=["eval"], progress=False)


def test_official_table_is_complete():
    for name, resource in MSMARCO_V1_RESOURCES.items():
        assert resource.url.startswith("https://") and resource.url.endswith(resource.filename), name
        assert resource.md5 is not None and len(resource.md5) == 32 and resource.size, name
