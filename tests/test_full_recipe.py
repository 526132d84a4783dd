"""The A10G recipe (configs/a10g-full.toml) run end to end at toy size, before anyone pays for a GPU.

Only sizes change (queries, steps, batch, shards, depths of the evaluation), plus what cannot be had here: the data
comes from a local HTTP server serving a toy MS MARCO in the official archives, names and formats (with a passage
holding a carriage return, as the real collection does); ``bert-base-uncased`` and SmolLM2 are replaced by tiny
random models of the same architectures, saved as local directories (tests/recipe_models.py); bf16 is off where the
machine has none (this CPU). Every stage runs, with the config's own pooling, lengths, GradCache, hard negatives,
DataLoader workers, encoding batch, HNSW parameters, LLM synthetic queries with the prefix-cached generator, rerank
depth and time budget, and k=1000 evaluation. Then ``Retriever()`` answers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from official_msmarco import FileServer, OfficialData, served_at_official_names, toy_resources
from recipe_models import bf16_available, tiny_bert, tiny_chat_lm
from retriever_fixture import ATTRIBUTES, FILLER, SUBJECTS

from hybrid.config import PipelineConfig, load_config

pytestmark = pytest.mark.full_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "a10g-full.toml"
N_TRAIN, N_HOLDOUT, N_DEV = 110, 30, 12
SYNTHETIC_PASSAGES, TRAIN_STEPS, CHECKPOINT_EVERY = 30, 6, 3
CR_PID = "7000005"  # the passage with a carriage return inside (the official collection has one)
CR_TEXT = "the climate of paris\ris mild, a carriage return inside the passage as in the official file"


def toy_msmarco(seed: int = 0) -> OfficialData:
    """One passage per (subject, attribute) with random filler; train/dev/TREC DL queries asking for one of them."""
    rng = random.Random(seed)
    passages, pairs = {}, []
    for i, subject in enumerate(SUBJECTS):
        for j, attribute in enumerate(ATTRIBUTES):
            pid = str(7_000_000 + i * len(ATTRIBUTES) + j)
            words = " ".join(rng.choice(FILLER) for _ in range(rng.randint(10, 40)))
            passages[pid] = f"the {attribute} of {subject} {words} and its {rng.choice(ATTRIBUTES)} too"
            pairs.append((pid, subject, attribute))
    passages[CR_PID] = CR_TEXT
    passages["7000006"] = passages["7000006"].replace("the ", "theâ€™s ", 1)  # mis-decoded, kept byte for byte
    rng.shuffle(pairs)
    cr_pair = next(p for p in pairs if p[0] == CR_PID)
    pairs.remove(cr_pair)
    pairs.insert(0, cr_pair)  # a train positive: trained on, indexed, retrieved

    def question(subject: str, attribute: str) -> str:
        return f"what is the {attribute} of {subject}"

    train = pairs[:N_TRAIN]
    dev = pairs[N_TRAIN : N_TRAIN + N_DEV + 4]  # queries.dev.tsv; the first N_DEV are dev.small (judged)
    dl = pairs[N_TRAIN + N_DEV + 4 :]
    dl19_topics, dl20_topics = dl[:6], dl[6:11]

    def graded(topics: list[tuple[str, str, str]], judged: int) -> dict[str, dict[str, int]]:
        # NIST qrels: several graded passages per judged topic, 0 (not relevant) to 3 (perfect)
        return {str(900 + n): {pid: 3, str(int(pid) + 1): rng.choice([0, 1, 2])}
                for n, (pid, _, _) in enumerate(topics[:judged])}

    return OfficialData(
        passages=passages,
        train_queries={str(100 + n): question(s, a) for n, (_, s, a) in enumerate(train)},
        train_qrels={str(100 + n): {pid: 1} for n, (pid, _, _) in enumerate(train)},
        dev_queries={str(500 + n): question(s, a) for n, (_, s, a) in enumerate(dev)},
        dev_qrels={str(500 + n): {pid: 1} for n, (pid, _, _) in enumerate(dev[:N_DEV])},
        dl19_queries={str(900 + n): question(s, a) for n, (_, s, a) in enumerate(dl19_topics)},
        dl19_qrels=graded(dl19_topics, 4),
        dl20_queries={str(900 + n): f"how is the {a} of {s}" for n, (_, s, a) in enumerate(dl20_topics)},
        dl20_qrels=graded(dl20_topics, 3),
    )


def toy_overrides(urls: dict[str, str], bert: Path, lm: Path) -> list[str]:
    """Everything that differs from configs/a10g-full.toml: sizes, the local mirror and models, bf16."""
    table = ", ".join(f'"{name}" = "{url}"' for name, url in urls.items())
    return [
        f"data.download_urls={{{table}}}",
        'sparse.heap="1g"',
        f"synthetic.max_passages={SYNTHETIC_PASSAGES}",
        f'synthetic.llm_model="{lm}"',
        f'dense.base_model="{bert}"',
        "dense.encode_shard_size=100",
        "dense.train.batch_size=8",
        "dense.train.grad_cache_chunk=16",
        f"dense.train.max_steps={TRAIN_STEPS}",
        f"dense.train.checkpoint_every={CHECKPOINT_EVERY}",
        "dense.train.log_every=2",
        *([] if bf16_available() else ["dense.train.bf16=false"]),  # the CPU has none; on a GPU it stays on
        f"fusion.holdout_queries={N_HOLDOUT}",
        # the recipe's cross-encoder, trained by the rerank stage from the tiny BERT for a few steps
        f'rerank.cross_encoder.base_model="{bert}"',
        "rerank.cross_encoder.train.max_steps=4",
        "rerank.cross_encoder.train.groups_per_step=4",
        "eval.latency_queries=5",
    ]


@dataclass(frozen=True)
class RecipeRun:
    root: Path
    config: PipelineConfig
    data: OfficialData
    done: dict[str, dict]
    requests: list[tuple[str, str | None]]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecipeRun]:
    from hybrid import download
    from hybrid.pipeline import Pipeline

    base = tmp_path_factory.mktemp("a10g-toy")
    data = toy_msmarco()
    files = data.files()
    texts = list(data.passages.values())
    bert, lm = tiny_bert(texts, base / "tiny-bert"), tiny_chat_lm(texts, base / "tiny-chat-lm")
    for server in FileServer(served_at_official_names(files)).serve():
        resources = toy_resources(server, files)
        with pytest.MonkeyPatch.context() as patch:
            # the toy files have their own sizes and md5 sums; everything else about the resources is official
            for name, resource in resources.items():
                patch.setitem(download.MSMARCO_V1_RESOURCES, name, resource)
            config = load_config(CONFIG, toy_overrides({n: r.url for n, r in resources.items()}, bert, lm))
            root = base / "artifacts"
            done = Pipeline(config, root).run()
        yield RecipeRun(root, config, data, done, list(server.requests))


def test_every_stage_of_the_a10g_recipe_ran(recipe: RecipeRun) -> None:
    from hybrid.pipeline import STAGES

    assert list(recipe.done) == list(STAGES)
    assert recipe.config.name == "a10g-full" and recipe.config.dense.encoder["pooling"] == "cls"
    tables = recipe.done["evaluate"]["tables"]
    assert set(tables) == {"dev", "dl19", "dl20"}
    assert all("| rerank |" in table and "| hybrid |" in table for table in tables.values())
    assert recipe.done["rerank"]["scorer"] == "cross_encoder" and recipe.done["rerank"]["depth"] == 100
    trained = json.loads((recipe.root / "rerank" / "cross_encoder" / "model" / "cross_encoder.json").read_text())
    assert trained["steps"] == 4 and trained["records"] == N_TRAIN - N_HOLDOUT


def test_data_came_from_the_official_archives(recipe: RecipeRun) -> None:
    from hybrid.msmarco import MsMarcoDir, read_collection
    from hybrid.passage_store import PassageStore

    fetched = {path for path, _ in recipe.requests}
    assert fetched == set(served_at_official_names(recipe.data.files()))
    data = MsMarcoDir(recipe.root / "msmarco")
    assert dict(read_collection(data.collection_path)) == recipe.data.passages
    assert PassageStore.open(recipe.root / "passages").get(CR_PID) == CR_TEXT
    assert set(data.queries("dev")) == set(recipe.data.dev_qrels)  # dev is dev.small
    assert set(data.queries("dl19")) == set(recipe.data.dl19_qrels)  # judged TREC DL topics only
    assert recipe.done["data"]["passages"] == len(recipe.data.passages)


def test_llm_synthetic_queries_came_from_the_prefix_cached_generator(recipe: RecipeRun) -> None:
    manifest = json.loads((recipe.root / "synthetic" / "llm" / "manifest.json").read_text())
    assert manifest["generator"] == "llm" and manifest["generation"]["engine"] == "prefix-cached-v1"
    assert manifest["counts"]["passages"] == manifest["counts"]["generated_passages"] == SYNTHETIC_PASSAGES
    assert recipe.done["dense_train"]["synthetic_queries"] == manifest["counts"]["kept_pairs"]


def test_dense_training_used_the_recipe_settings(recipe: RecipeRun) -> None:
    manifest = json.loads((recipe.root / "dense_model" / "model" / "manifest.json").read_text())
    train = manifest["train_config_full"]
    assert manifest["steps"] == TRAIN_STEPS and train["bf16"] == bf16_available()
    assert (train["grad_cache_chunk"], train["hard_negatives"], train["num_workers"]) == (16, 7, 4)
    assert manifest["encoder_config"]["passage_max_len"] == 128 and manifest["encoder_config"]["pooling"] == "cls"
    assert recipe.done["dense_train"]["real_queries"] == N_TRAIN - N_HOLDOUT
    checkpoints = sorted(p.name for p in (recipe.root / "dense_model" / "checkpoints").iterdir())
    assert checkpoints == [f"step-{CHECKPOINT_EVERY:08d}"]


def test_corpus_encoded_in_shards_into_an_hnsw_index(recipe: RecipeRun) -> None:
    embeddings = json.loads((recipe.root / "dense_index" / "embeddings" / "manifest.json").read_text())
    index = json.loads((recipe.root / "dense_index" / "faiss" / "index_manifest.json").read_text())
    assert embeddings["count"] == len(recipe.data.passages) and embeddings["shard_size"] == 100
    assert index["kind"] == "hnsw" and index["params"] == {"hnsw_m": 32, "ef_construction": 200, "ef_search": 256}


def test_retriever_answers_from_the_recipe_artifacts(recipe: RecipeRun) -> None:
    from hybrid import Result, Retriever

    retriever = Retriever(artifacts_dir=recipe.root)
    assert retriever.mode == "rerank"  # rerank.default = true in the recipe
    queries = ["what is the climate of paris", "tiger speed", "how old is the comet"]
    for query, results in zip(queries, retriever.batch_search(queries, 10), strict=True):
        assert 1 <= len(results) <= 10 and all(isinstance(r, Result) for r in results)
        assert all(r.document_text == recipe.data.passages[r.document_id] for r in results)
        assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
        assert len({r.document_id for r in results}) == len(results)
        single = retriever.search(query, 10)  # one query alone: the same checks (batch padding may break near-ties)
        assert 1 <= len(single) <= 10 and all(r.document_text == recipe.data.passages[r.document_id] for r in single)
    hybrid = Retriever(mode="hybrid", artifacts_dir=recipe.root)
    assert all(hybrid.search(q, 10) == hybrid.search(q, 1000)[:10] for q in queries)  # answers do not depend on k
    sparse = Retriever(mode="sparse", artifacts_dir=recipe.root).search("climate of paris carriage return", 1)
    assert [(r.document_id, r.document_text) for r in sparse] == [(CR_PID, CR_TEXT)]


def test_a_download_mirror_is_not_an_input_of_any_stage(tmp_path: Path) -> None:
    from hybrid.pipeline import Pipeline

    official = load_config(CONFIG, [f'data.dir="{tmp_path}"'])
    mirrored = load_config(CONFIG, [f'data.dir="{tmp_path}"', 'data.download_urls={queries = "http://mirror/q.tgz"}'])
    assert mirrored.data.download_urls == {"queries": "http://mirror/q.tgz"}
    moved = load_config(CONFIG, [f'data.dir="{tmp_path / "elsewhere"}"'])
    data_fingerprint = {name: Pipeline(config, tmp_path).inputs_fingerprint("data")
                        for name, config in (("official", official), ("mirrored", mirrored), ("moved", moved))}
    assert data_fingerprint["mirrored"] == data_fingerprint["official"] != data_fingerprint["moved"]
