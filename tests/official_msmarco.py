"""MS MARCO as its official hosts serve it, at toy size: archives and files in the official names, members and
formats, and a local HTTP server (with Range requests) to download them from.

Used by tests/test_download.py (the downloader alone) and tests/test_full_recipe.py (the A10G recipe end to end).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hybrid.download import MSMARCO_V1_RESOURCES, Resource

Qrels = Mapping[str, Mapping[str, int]]


def tsv(rows: Mapping[str, str]) -> bytes:
    """``id<TAB>text`` lines, as the collection and query files are."""
    return "".join(f"{k}\t{v}\n" for k, v in rows.items()).encode()


def msmarco_qrels(qrels: Qrels) -> bytes:
    """MS MARCO's own qrels format (train, dev): ``qid<TAB>0<TAB>pid<TAB>grade``."""
    return "".join(f"{q}\t0\t{p}\t{g}\n" for q, judged in qrels.items() for p, g in judged.items()).encode()


def trec_qrels(qrels: Qrels) -> bytes:
    """NIST's TREC DL qrels format: ``qid Q0 pid grade``, space separated."""
    return "".join(f"{q} Q0 {p} {g}\n" for q, judged in qrels.items() for p, g in judged.items()).encode()


def tar_gz(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass(frozen=True)
class OfficialData:
    """A toy MS MARCO passage v1 + TREC DL 19/20: what each official file holds, before packing."""

    passages: Mapping[str, str]
    train_queries: Mapping[str, str]
    train_qrels: Qrels
    dev_queries: Mapping[str, str]  # queries.dev.tsv; dev.small is the judged subset
    dev_qrels: Qrels  # qrels.dev.small.tsv
    dl19_queries: Mapping[str, str]  # all topics, judged or not, as msmarco-test2019-queries.tsv.gz holds them
    dl19_qrels: Qrels
    dl20_queries: Mapping[str, str]
    dl20_qrels: Qrels
    eval_queries: Mapping[str, str] = field(default_factory=lambda: {"9999999": "an unjudged eval query"})

    def files(self) -> dict[str, bytes]:
        """Resource name (keys of ``hybrid.download.MSMARCO_V1_RESOURCES``) -> the bytes its host serves."""
        dev_small = {q: t for q, t in self.dev_queries.items() if q in self.dev_qrels}
        queries = {
            "queries.train.tsv": tsv(self.train_queries),
            "queries.dev.tsv": tsv(self.dev_queries),
            "queries.eval.tsv": tsv(self.eval_queries),
        }
        return {
            "collectionandqueries": tar_gz({
                "collection.tsv": tsv(self.passages),
                **queries,
                "queries.dev.small.tsv": tsv(dev_small),
                "queries.eval.small.tsv": tsv(self.eval_queries),
                "qrels.train.tsv": msmarco_qrels(self.train_qrels),
                "qrels.dev.tsv": msmarco_qrels(self.dev_qrels),
                "qrels.dev.small.tsv": msmarco_qrels(self.dev_qrels),
            }),
            "queries": tar_gz(queries),
            "qrels.train": msmarco_qrels(self.train_qrels),
            "dl19.queries": gzip.compress(tsv(self.dl19_queries)),
            "dl19.qrels": trec_qrels(self.dl19_qrels),
            "dl20.queries": gzip.compress(tsv(self.dl20_queries)),
            "dl20.qrels": trec_qrels(self.dl20_qrels),
        }


@dataclass
class FileServer:
    """Serves ``files`` (URL path -> bytes) with Range support; can drop or refuse ranges to simulate failures."""

    files: dict[str, bytes]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the next response breaks
    ignore_range: bool = False
    url: str = ""

    def serve(self) -> Iterator[FileServer]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append((self.path, self.headers.get("Range")))
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                range_header = self.headers.get("Range")
                if range_header and not owner.ignore_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = owner.drop_after.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


def served_at_official_names(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """Resource name -> bytes, keyed instead by the URL path the server answers (the official file name)."""
    return {f"/{MSMARCO_V1_RESOURCES[name].filename}": data for name, data in files.items()}


def toy_resources(server: FileServer, files: Mapping[str, bytes], **md5_overrides: str) -> dict[str, Resource]:
    """The official resource table pointed at ``server``, with the toy files' sizes and md5 sums."""
    return {
        name: Resource(
            url=f"{server.url}/{MSMARCO_V1_RESOURCES[name].filename}",
            filename=MSMARCO_V1_RESOURCES[name].filename,
            md5=md5_overrides.get(name, hashlib.md5(data).hexdigest()),
            size=len(data),
        )
        for name, data in files.items()
    }
