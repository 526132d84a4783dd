"""Full-scale times and sizes extrapolated from throughput measured on the 43k pool (``hybrid.gpu_smoke``).

Pure arithmetic, stated per row: training time is the config's steps over the measured step rate; encoding and
index building scale with the passage count; an exact (flat) search scans every vector, so its per-query cost
scales with the passage count too, except for query encoding, which does not; reranking costs the same per query at
any corpus size (a fixed number of candidates); query generation scales with the passages the config generates for.
"""

from __future__ import annotations

from dataclasses import dataclass

MSMARCO_PASSAGES = 8_841_823  # MS MARCO passage v1 collection.tsv
DEV_SMALL_QUERIES = 6_980  # the official dev small set the pipeline evaluates on
FLOAT16_BYTES = 2


@dataclass(frozen=True)
class FullScale:
    """What the extrapolation scales to."""

    train_steps: int  # the config's dense.train.max_steps
    dim: int  # embedding width of the trained encoder
    passages: int = MSMARCO_PASSAGES
    eval_queries: int = DEV_SMALL_QUERIES
    synthetic_passages: int = 0  # the config's synthetic.max_passages: passages the LLM writes queries for


@dataclass(frozen=True)
class Measured:
    """Throughput measured on one device over a pool of ``pool_passages``; ``None`` where a phase did not run."""

    device: str
    pool_passages: int
    train_steps_per_s: float | None = None
    encode_passages_per_s: float | None = None
    index_vectors_per_s: float | None = None  # building (and saving) the flat index
    query_encode_ms: float | None = None  # one query through the encoder
    search_ms: float | None = None  # one dense search at depth 1000: query encoding + flat scan of the pool
    rerank_ms: float | None = None  # reranking one query's top ``rerank_depth``
    rerank_depth: int = 0
    generate_passages_per_s: float | None = None  # LLM query generation, the synthetic stage's settings
    generation_model: str = ""
    skipped: tuple[tuple[str, str], ...] = ()  # (phase, why it did not run)


@dataclass(frozen=True)
class Row:
    what: str
    measured: str
    full_scale: str


def duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def flat_search_ms(measured: Measured, passages: int) -> float:
    """Per-query dense search time over ``passages``: encoding as measured, the scan scaled linearly."""
    if measured.search_ms is None or measured.query_encode_ms is None:
        raise ValueError("flat_search_ms needs a measured search_ms and query_encode_ms")
    scan = max(measured.search_ms - measured.query_encode_ms, 0.0)
    return measured.query_encode_ms + scan * passages / measured.pool_passages


def extrapolate(measured: Measured, full: FullScale) -> list[Row]:
    """One row per measured phase, with its full-scale time; phases that did not run say why."""
    rows: list[Row] = []
    skipped = dict(measured.skipped)
    m = measured
    if m.train_steps_per_s is not None:
        rows.append(Row("dense training", f"{m.train_steps_per_s:.3f} steps/s",
                        f"{duration(full.train_steps / m.train_steps_per_s)} for {full.train_steps:,} steps"))
    if m.encode_passages_per_s is not None:
        rows.append(Row("corpus encoding", f"{m.encode_passages_per_s:,.0f} passages/s",
                        f"{duration(full.passages / m.encode_passages_per_s)} for {full.passages:,} passages"))
    if m.index_vectors_per_s is not None:
        gigabytes = full.passages * full.dim * FLOAT16_BYTES / 1e9
        rows.append(Row("flat index build + save", f"{m.index_vectors_per_s:,.0f} vectors/s",
                        f"{duration(full.passages / m.index_vectors_per_s)}; {gigabytes:.1f} GB of float16 on the GPU"))
    if m.search_ms is not None and m.query_encode_ms is not None:
        rows.append(Row("dense search, k=1000 (flat)",
                        f"{m.search_ms:.1f} ms/query ({m.query_encode_ms:.1f} encoding) at {m.pool_passages:,}",
                        f"{flat_search_ms(m, full.passages):.0f} ms/query at {full.passages:,}"))
    if m.rerank_ms is not None:
        rows.append(Row(f"rerank, depth {m.rerank_depth}", f"{m.rerank_ms:.1f} ms/query",
                        f"{m.rerank_ms:.1f} ms/query; {duration(full.eval_queries * m.rerank_ms / 1000)} for "
                        f"{full.eval_queries:,} dev queries"))
    if m.generate_passages_per_s is not None:
        at_scale = (f"{duration(full.synthetic_passages / m.generate_passages_per_s)} for "
                    f"{full.synthetic_passages:,} passages" if full.synthetic_passages else "-")
        rows.append(Row(f"LLM query generation ({m.generation_model})", f"{m.generate_passages_per_s:,.1f} passages/s",
                        at_scale))
    rows.extend(Row(phase, f"not measured: {why}", "-") for phase, why in skipped.items())
    return rows


def render_table(rows: list[Row], device: str, pool_passages: int) -> str:
    """Markdown table: measured on ``device`` over the pool, and the extrapolated full-scale figure."""
    lines = [f"| phase | measured ({device}, {pool_passages:,} passages) | full scale (extrapolated) |",
             "| --- | ---: | ---: |"]
    lines += [f"| {r.what} | {r.measured} | {r.full_scale} |" for r in rows]
    return "\n".join(lines)
