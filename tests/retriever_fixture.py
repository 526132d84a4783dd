"""A tiny artifact directory built once per test run by the real pipeline, so the Retriever tests need no MS MARCO.

``tiny_artifacts`` (session fixture, registered in conftest.py): a few hundred generated passages in the canonical
layout, then the pipeline's stages data (with a subset written inside the artifact directory), bm25 (a real Lucene
index through pyserini), bm25_expanded (a second index with generated queries appended to a few passages, from
``write_tiny_expansions``), synthetic (none), dense_train (a 1-layer, 32-wide BERT trained for a few steps), dense_index
(HNSW), fusion and rerank (a random 1-layer Llama as the query-likelihood model, stored under ``base_models/``
like the real SmolLM2). The directory is built under one name and then renamed, so every test that uses it also
checks that nothing in it points at where it was built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SUBJECTS = [
    "paris", "london", "tokyo", "berlin", "madrid", "rome", "cairo", "lima", "oslo", "dublin", "vienna", "prague",
    "salmon", "tiger", "eagle", "maple", "copper", "violin", "tennis", "coffee", "glacier", "desert", "volcano",
    "comet",
]
ATTRIBUTES = ["population", "history", "climate", "price", "size", "color", "origin", "age", "speed", "weight",
              "food", "music"]
FILLER = ["the", "a", "of", "and", "is", "known", "for", "its", "many", "visitors", "say", "that", "recent", "studies",
          "report", "old", "new", "large", "small", "famous", "local", "people", "often", "describe", "changes"]
N_TRAIN, N_DEV = 70, 12
SUBSET_DISTRACTORS = 150
FUSION_DEPTH = 20
RERANK_DEPTH = 3


@dataclass(frozen=True)
class TinyArtifacts:
    root: Path  # the artifact directory (renamed after the build)
    data: Path  # the canonical data directory it was built from
    built_at: Path  # where the pipeline wrote it (no longer exists)
    dev_queries: dict[str, str]
    config_path: Path  # the config file and the overrides the pipeline ran with (to run a stage again)
    overrides: tuple[str, ...]
    expanded: dict[str, str]  # pid -> the generated query appended to it in the bm25_expanded index


def write_tiny_corpus(out: Path, seed: int = 0) -> Path:
    """One passage per (subject, attribute) with random filler, train and dev queries asking for one of them."""
    rng = random.Random(seed)
    out.mkdir(parents=True)
    passages, pairs = {}, []
    for i, subject in enumerate(SUBJECTS):
        for j, attribute in enumerate(ATTRIBUTES):
            pid = str(7_000_000 + i * len(ATTRIBUTES) + j)  # MS MARCO-like numeric ids
            other = rng.choice(ATTRIBUTES)
            words = [rng.choice(FILLER) for _ in range(rng.randint(8, 20))]
            passages[pid] = f"the {attribute} of {subject} {' '.join(words)} and its {other} too"
            pairs.append((pid, subject, attribute))
    rng.shuffle(pairs)
    splits = {"train": pairs[:N_TRAIN], "dev": pairs[N_TRAIN : N_TRAIN + N_DEV]}
    with open(out / "collection.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{pid}\t{text}\n" for pid, text in passages.items())
    for split, chosen in splits.items():
        with open(out / f"queries.{split}.tsv", "w", encoding="utf-8") as f:
            f.writelines(f"{split}{n}\twhat is the {attribute} of {subject}\n"
                         for n, (_, subject, attribute) in enumerate(chosen))
        with open(out / f"qrels.{split}.txt", "w", encoding="utf-8") as f:
            f.writelines(f"{split}{n} 0 {pid} 1\n" for n, (pid, _, _) in enumerate(chosen))
    return out


# "generated queries" of made-up words no passage holds (document expansion), for the first two dev positives (which
# the subset keeps): the word "zanzibar" is in the first one's expansion only, "quokka" in both
EXPANSION_QUERIES = ("zanzibar quokka", "quokka")


def write_tiny_expansions(data: Path, out: Path) -> dict[str, str]:
    """A generation cache in the format of ``make synthetic``'s (pid, queries, example_qids) at ``out``; returns
    pid -> its generated query."""
    import json

    pids = [line.split()[2] for line in (data / "qrels.dev.txt").read_text().splitlines()][: len(EXPANSION_QUERIES)]
    expanded = dict(zip(pids, EXPANSION_QUERIES, strict=True))
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"pid": pid, "queries": [q], "example_qids": []}) + "\n" for pid, q in expanded.items())
    return expanded


def tiny_encoder_backbone(texts: list[str], out: Path) -> Path:
    import torch
    from dense_fixtures import train_wordpiece_tokenizer
    from transformers import BertConfig, BertModel

    tokenizer = train_wordpiece_tokenizer(texts)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_causal_lm(texts: list[str], out: Path) -> Path:
    """A random 1-layer Llama LM standing in for SmolLM2 (plain prompt: its tokenizer has no chat template)."""
    import torch
    from dense_fixtures import train_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_artifacts(base: Path) -> TinyArtifacts:
    """Run the pipeline (all stages but evaluate) on the tiny corpus; see the module docstring."""
    from hybrid.config import load_config
    from hybrid.msmarco import MsMarcoDir, read_collection
    from hybrid.pipeline import Pipeline

    data = write_tiny_corpus(base / "msmarco")
    texts = [text for _, text in read_collection(data / "collection.tsv")]
    built_at = base / "built-here"
    backbone = tiny_encoder_backbone(texts, base / "tiny-bert")
    lm = tiny_causal_lm(texts, built_at / "base_models" / "tiny-lm")  # inside, as smollm2_dir puts SmolLM2
    expansions = base / "expansions.jsonl"
    expanded = write_tiny_expansions(data, expansions)
    config_path = Path(__file__).resolve().parents[1] / "configs" / "cpu-marco43k.toml"
    overrides = (
        f'data.dir="{data}"',
        'data.eval_splits=["dev"]',
        f"data.subset_distractors={SUBSET_DISTRACTORS}",
        'sparse.heap="1g"',
        f'sparse.expansion.file="{expansions}"',
        'sparse.expansion.sha256=""',
        "synthetic.methods=[]",
        'synthetic.precomputed=""',  # the committed set's passages are not in this corpus
        f'dense.base_model="{backbone}"',
        "dense.base_layers=0",
        "dense.hard_negatives_depth=10",
        "dense.encode_batch_size=128",
        "dense.encode_shard_size=500",
        "dense.encoder.query_max_len=16",
        "dense.encoder.passage_max_len=32",
        "dense.train.max_steps=4",
        "dense.train.batch_size=8",
        "dense.train.checkpoint_every=2",
        "fusion.holdout_queries=30",
        f"fusion.depth={FUSION_DEPTH}",
        "rerank.enabled=true",
        f'rerank.model="{lm}"',
        f"rerank.depth={RERANK_DEPTH}",
        "rerank.max_passage_tokens=24",
        "rerank.default=true",
    )
    config = load_config(config_path, list(overrides))
    Pipeline(config, built_at).run(["data", "bm25", "bm25_expanded", "synthetic", "dense_train", "dense_index",
                                    "fusion", "rerank"])
    root = base / "artifacts"
    built_at.rename(root)
    return TinyArtifacts(root, data, built_at, MsMarcoDir(data).queries("dev"), config_path, overrides, expanded)
