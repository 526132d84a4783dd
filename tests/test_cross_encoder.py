"""Cross-encoder reranker: LCE training learns a toy set, resumes exactly after a kill, scores like the QL scorer,
and the pipeline's rerank stage trains one that ``Retriever(mode="rerank")`` loads."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dense_fixtures import make_tiny_bert_dir, make_tiny_llama_dir, toy_records_and_passages
from dense.msmarco_files import read_collection
from fusion.cross_encoder import CrossEncoderConfig, CrossEncoderScorer
from fusion.cross_encoder_training import (
    CrossEncoderTrainConfig,
    CrossEncoderTrainingError,
    TrainingGroups,
    lce_loss,
    train_cross_encoder,
)

REPO = Path(__file__).resolve().parents[1]
RECORDS, PASSAGES = toy_records_and_passages()  # the positive repeats the query's words; 3 other passages each
SCORER = CrossEncoderConfig(max_length=48)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a busy 2-core box: a second thread only spin-waits (one thread is several times faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # init_std 0.2: at BERT's 0.02 a random 32-wide model gives every pair the same [CLS] vector (see dense_fixtures)
    return make_tiny_bert_dir(tmp_path_factory.mktemp("ce-bert"), dropout=0.0, init_std=0.2)


def _config(**changes: object) -> CrossEncoderTrainConfig:
    base = {"lr": 5e-3, "max_steps": 100, "groups_per_step": 8, "group_size": 4, "warmup_ratio": 0.1, "seed": 13,
            "log_every": 10, "checkpoint_every": 100}
    return CrossEncoderTrainConfig.from_dict({**base, **changes})


def _groups() -> list[list[str]]:
    return [[PASSAGES[p] for p in (*r.positives, *r.negatives)] for r in RECORDS]


def _evaluate(scorer: CrossEncoderScorer) -> tuple[float, int]:
    """Mean LCE over every toy group (positive first) in eval mode, and how many groups rank the positive first."""
    scorer.model.eval()
    with torch.no_grad():
        loss = float(lce_loss(scorer, [r.query for r in RECORDS], _groups()))
    first = sum(int(np.argmax(scorer.score(r.query, g)) == 0) for r, g in zip(RECORDS, _groups(), strict=True))
    return loss, first


def test_training_lowers_the_loss_and_ranks_the_positive_first(bert: Path, tmp_path: Path) -> None:
    # the tiny tokenizer's vocabulary order varies between runs (ties in its trainer), so the margins are wide: 100
    # steps reach a loss below 0.001 in every run seen, 60 steps anywhere between 0.01 and 0.2
    before, first_before = _evaluate(CrossEncoderScorer.build(bert, SCORER, seed=13))  # the head training starts from
    model_dir = train_cross_encoder(bert, SCORER, _config(), RECORDS, PASSAGES.__getitem__, tmp_path, progress=False)
    after, first_after = _evaluate(CrossEncoderScorer.from_dir(model_dir))
    assert before > 1.2 and first_before < 12  # ~ln 4 and chance: nothing was known before training
    assert after < 0.1 * before and first_after == len(RECORDS), (before, after, first_before, first_after)
    saved = json.loads((model_dir / "cross_encoder.json").read_text())
    assert saved["steps"] == 100 and saved["records"] == len(RECORDS) and saved["config"]["max_length"] == 48
    assert saved["loss_curve"][-1]["loss"] < saved["loss_curve"][0]["loss"]
    # the same run again is up to date; another one in the same directory is refused
    assert train_cross_encoder(bert, SCORER, _config(), RECORDS, PASSAGES.__getitem__, tmp_path) == model_dir
    with pytest.raises(CrossEncoderTrainingError, match="train_config differs"):
        train_cross_encoder(bert, SCORER, _config(lr=1e-3), RECORDS, PASSAGES.__getitem__, tmp_path)


class _Killed(Exception):
    pass


def test_killed_and_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    bert_with_dropout = make_tiny_bert_dir(tmp_path / "bert", init_std=0.2)  # dropout on: the RNG is resumed too
    config = _config(max_steps=10, checkpoint_every=4)
    straight = train_cross_encoder(bert_with_dropout, SCORER, config, RECORDS, PASSAGES.__getitem__,
                                   tmp_path / "straight", progress=False)
    lookups = 0

    def dying_lookup(pid: str) -> str:  # dies fetching step 7: checkpoint at 4, steps 5-6 lost
        nonlocal lookups
        lookups += 1
        if lookups > 6 * config.groups_per_step * config.group_size:
            raise _Killed
        return PASSAGES[pid]

    run = tmp_path / "killed"
    with pytest.raises(_Killed):
        train_cross_encoder(bert_with_dropout, SCORER, config, RECORDS, dying_lookup, run, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    with pytest.raises(CrossEncoderTrainingError, match="resume"):
        train_cross_encoder(bert_with_dropout, SCORER, config, RECORDS, PASSAGES.__getitem__, run)
    resumed = train_cross_encoder(bert_with_dropout, SCORER, config, RECORDS, PASSAGES.__getitem__, run,
                                  resume=True, progress=False)
    a, b = CrossEncoderScorer.from_dir(straight).model, CrossEncoderScorer.from_dir(resumed).model
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)
    assert json.loads((straight / "cross_encoder.json").read_text())["loss_curve"] == \
        json.loads((resumed / "cross_encoder.json").read_text())["loss_curve"]


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_scores_do_not_depend_on_the_batch(bert: Path, tmp_path: Path, model: str) -> None:
    """Padding is masked and a decoder's head reads each pair's own last token: a pair scores the same alone and
    next to a longer one."""
    base = bert if model == "bert" else make_tiny_llama_dir(tmp_path)
    scorer = CrossEncoderScorer.build(base, SCORER)
    query, short, long = RECORDS[0].query, "paris", PASSAGES["p3"] + " " + PASSAGES["p4"]
    together = scorer.score(query, [short, long])
    assert together.dtype == np.float64 and together.shape == (2,)
    np.testing.assert_allclose(together, [scorer.score(query, [short])[0], scorer.score(query, [long])[0]],
                               rtol=0, atol=1e-5)
    assert together[0] != together[1] and scorer.score(query, []).shape == (0,)


def test_groups_are_deterministic_and_need_negatives() -> None:
    groups = TrainingGroups(RECORDS, PASSAGES.__getitem__, _config(group_size=6))  # 5 negatives from 3: repeats
    queries, passages = groups[5]
    assert len(queries) == 8 and all(len(g) == 6 for g in passages)
    assert all(g[0] == PASSAGES[next(r for r in RECORDS if r.query == q).positives[0]]
               for q, g in zip(queries, passages, strict=True))
    assert groups[5] == TrainingGroups(RECORDS, PASSAGES.__getitem__, _config(group_size=6))[5]
    with pytest.raises(CrossEncoderTrainingError, match="fewer than one step"):
        TrainingGroups([r.__class__(r.qid, r.query, r.positives) for r in RECORDS], PASSAGES.__getitem__, _config())
    with pytest.raises(ValueError, match="unknown key"):
        CrossEncoderTrainConfig.from_dict({"learning_rate": 1e-5})


# ---- the pipeline's rerank stage --------------------------------------------------------------------------------

def _pipeline(tiny_artifacts, root: Path, *changes: str):
    from hybrid.config import load_config
    from hybrid.pipeline import Pipeline

    return Pipeline(load_config(tiny_artifacts.config_path, [*tiny_artifacts.overrides, *changes]), root)


@pytest.mark.slow
def test_the_rerank_stage_trains_a_cross_encoder_that_the_retriever_loads(tiny_artifacts, bert, tmp_path) -> None:
    from hybrid.retriever import Retriever

    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, root)
    cross_encoder = ['rerank.scorer="cross_encoder"', 'rerank.model=""', f'rerank.cross_encoder.base_model="{bert}"',
                     "rerank.cross_encoder.max_length=48", "rerank.cross_encoder.negatives=3",
                     "rerank.cross_encoder.negatives_depth=10", "rerank.cross_encoder.train.max_steps=6",
                     "rerank.cross_encoder.train.groups_per_step=4", "rerank.cross_encoder.train.group_size=3",
                     "rerank.cross_encoder.train.lr=5e-3", "rerank.batch_size=2"]
    settings = _pipeline(tiny_artifacts, root, *cross_encoder).run(["rerank"])["rerank"]
    assert settings["model_dir"] == "rerank/cross_encoder/model" and settings["scorer"] == "cross_encoder"
    trained = json.loads((root / "rerank" / "cross_encoder" / "model" / "cross_encoder.json").read_text())
    assert trained["steps"] == 6 and trained["records"] == 40  # the 70 train queries less the 30 held out
    mined = [json.loads(line) for line in (root / "rerank/cross_encoder/train_records.jsonl").read_text().splitlines()]
    assert all(len(r["negatives"]) == 3 and not set(r["negatives"]) & set(r["positives"]) for r in mined)

    moved = tmp_path / "moved"
    root.rename(moved)  # the model directory is stored relative to the artifact directory
    retriever = Retriever(artifacts_dir=moved)
    assert retriever.mode == "rerank" and isinstance(retriever.searcher.scorer, CrossEncoderScorer)
    assert retriever.searcher.batch_size == 2
    query = next(iter(tiny_artifacts.dev_queries.values()))
    results = retriever.search(query, 10)
    hybrid = [pid for pid, _ in Retriever(mode="hybrid", artifacts_dir=moved).rank(query, 10)]
    assert sorted(r.document_id for r in results[:3]) == sorted(hybrid[:3])  # the top 3 reordered, the rest kept
    assert [r.document_id for r in results[3:]] == hybrid[3:]
    retriever.close()

    weights = moved / "rerank" / "cross_encoder" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    _pipeline(tiny_artifacts, moved, *cross_encoder, "rerank.depth=2").run(["rerank"])
    assert weights.stat().st_mtime_ns == stamp  # a new depth reuses the trained model


def test_the_ql_rerank_fingerprint_ignores_the_cross_encoder_settings(tiny_artifacts) -> None:
    original = _pipeline(tiny_artifacts, tiny_artifacts.root)
    assert original.up_to_date("rerank")
    same = _pipeline(tiny_artifacts, tiny_artifacts.root, "rerank.cross_encoder.negatives=5")
    assert same.inputs_fingerprint("rerank") == original.inputs_fingerprint("rerank")
    assert "scorer" not in original._rerank_section()
    at_default = _pipeline(tiny_artifacts, tiny_artifacts.root, "rerank.batch_size=1")
    assert "batch_size" not in at_default._rerank_section()
    other = _pipeline(tiny_artifacts, tiny_artifacts.root, 'rerank.scorer="cross_encoder"')
    assert other.inputs_fingerprint("rerank") != original.inputs_fingerprint("rerank")


@pytest.mark.slow
def test_the_script_trains_on_the_train_queries_and_a_checked_synthetic_file(tiny_artifacts, bert, tmp_path) -> None:
    import importlib.util

    from hybrid.synthetic_data import SyntheticDataError

    spec = importlib.util.spec_from_file_location("train_cross_encoder", REPO / "scripts" / "train_cross_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    subset = tiny_artifacts.root / "msmarco-subset" / "collection.tsv"  # the passages the pipeline indexed
    pids = [pid for pid, _ in itertools.islice(read_collection(subset), 3)]
    synthetic = tmp_path / "synthetic.jsonl"

    def record(qid: str, query: str, pid: str) -> str:
        return json.dumps({"qid": qid, "query": query, "positives": [pid], "negatives": [], "source": "llm"}) + "\n"

    lines = [record(f"s{i}", f"which passage is number {i}", pid) for i, pid in enumerate(pids)]
    lines.append(record("s9", "a passage the collection lacks", "999999999"))
    synthetic.write_text("".join(lines))
    out = tmp_path / "out"
    args = ["--config", str(tiny_artifacts.config_path), *(f"--set={o}" for o in tiny_artifacts.overrides),
            "--artifacts", str(tiny_artifacts.root), "--out", str(out), "--synthetic", str(synthetic),
            "--base-model", str(bert), "--max-length", "48", "--negatives-from", "bm25", "--negatives-depth", "10",
            "--negatives", "3", "--train", "max_steps=3", "--train", "groups_per_step=4", "--train", "group_size=3"]
    assert script.main(args) == 0
    records = [json.loads(line) for line in (out / "train_records.jsonl").read_text().splitlines()]
    assert len(records) == 40 + 3 and sum(r["source"] == "llm" for r in records) == 3  # the missing passage left out
    assert json.loads((out / "model" / "cross_encoder.json").read_text())["steps"] == 3
    assert isinstance(CrossEncoderScorer.from_dir(out / "model").score("paris", ["a", "b"]), np.ndarray)

    dev_query = next(iter(tiny_artifacts.dev_queries.values()))
    synthetic.write_text(record("x", dev_query, pids[0]))
    with pytest.raises(SyntheticDataError, match="may not be trained on"):
        script.main([*args, "--out", str(tmp_path / "leak")])


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                    reason="no CUDA device with bf16: the cross-encoder's GPU path (bf16 autocast) cannot run here")
def test_on_a_gpu_the_cross_encoder_trains_and_scores_in_bf16(bert: Path, tmp_path: Path) -> None:
    model_dir = train_cross_encoder(bert, SCORER, _config(max_steps=3), RECORDS, PASSAGES.__getitem__, tmp_path,
                                    device="cuda", progress=False)
    on_gpu = CrossEncoderScorer.from_dir(model_dir)
    on_cpu = CrossEncoderScorer.from_dir(model_dir, device="cpu")
    assert on_gpu.device.type == "cuda" and on_gpu.config.bf16
    group = _groups()[0]
    np.testing.assert_allclose(on_gpu.score(RECORDS[0].query, group), on_cpu.score(RECORDS[0].query, group),
                               rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits
