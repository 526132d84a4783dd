"""Tests of dense.querygen: prompts never leak dev/DL queries, generation, resumable cache, filters, crops."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dense.querygen.cache import CacheCorruptError, QueryCache
from dense.querygen.crop import CropConfig, crop_pairs, split_sentences
from dense.querygen.filters import SanityFilterConfig, SanityFilters, consistency_filter
from dense.querygen.output import llm_pairs, read_training_records, write_output
from dense.querygen.prompt import (
    draw_examples,
    FewShotExample,
    ForbiddenExampleError,
    ForbiddenQueries,
    PromptBuilder,
    PromptConfig,
)
from dense.querygen.records import GeneratedQueries, QueryPair

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PASSAGES = {
    "p1": "The Eiffel Tower is a wrought iron lattice tower in Paris. It was built in 1889 for the World Fair.",
    "p2": "Metformin is a medicine used to treat type 2 diabetes. It lowers the amount of sugar in the blood.",
    "p3": "Carbon steel is made of iron and carbon. Plain carbon steel contains no other alloying elements.",
    "p4": "The name Lauri is a Finnish form of Laurence. It means a person from Laurentum.",
    "p5": "Photosynthesis turns light into chemical energy. Plants store that energy as sugar.",
    "p6": "A marathon is a long distance race of 42 kilometres. It is run on roads in many cities.",
}
EXAMPLES = [
    FewShotExample("101", "what is metformin used for", "p2", PASSAGES["p2"]),
    FewShotExample("102", "what is plain carbon steel made of", "p3", PASSAGES["p3"]),
    FewShotExample("103", "what does the name lauri mean", "p4", PASSAGES["p4"]),
    FewShotExample("104", "how long is a marathon", "p6", PASSAGES["p6"]),
]


class FakeTokenizer:
    """Whitespace tokenizer: enough for the prompt builder's truncation and its plain template."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str], skip_special_tokens: bool = True) -> str:
        return " ".join(ids)

    def apply_chat_template(self, conversation, **kwargs):  # pragma: no cover - plain template only
        raise AssertionError("plain template expected")


# ---------------------------------------------------------------- prompt


def test_forbidden_queries_from_files_and_builder_raises(tmp_path: Path) -> None:
    dev = tmp_path / "queries.dev.tsv"
    dev.write_text("103\twhat does the name lauri mean\n900\tHow Long is a  Marathon\n", encoding="utf-8")
    forbidden = ForbiddenQueries.from_files([dev])
    clean = [e for e in EXAMPLES if e.qid not in ("103", "104")]
    PromptBuilder(clean, PromptConfig(num_examples=2), forbidden)  # allowed
    with pytest.raises(ForbiddenExampleError, match=r"qid 103 is in .*queries\.dev\.tsv"):
        PromptBuilder(EXAMPLES[:3], PromptConfig(num_examples=2), forbidden)
    # same text under a train qid: caught by the normalized text, not only by id
    with pytest.raises(ForbiddenExampleError, match="equals a forbidden"):
        PromptBuilder([*clean, EXAMPLES[3]], PromptConfig(num_examples=2), forbidden)


def test_prompt_contains_only_train_examples_and_rotates_deterministically() -> None:
    forbidden = ForbiddenQueries(qids=frozenset({"999"}), texts=frozenset({"a dev query"}))
    cfg = PromptConfig(template="plain", num_examples=2, max_passage_tokens=6, seed=3)
    builder = PromptBuilder(EXAMPLES, cfg, forbidden)
    tok = FakeTokenizer()
    text, qids = builder.render("p2", PASSAGES["p2"], tok)
    assert "101" not in qids, "a passage must not be its own few-shot example"
    assert len(qids) == 2 and set(qids) <= {e.qid for e in EXAMPLES}
    assert "a dev query" not in text
    assert text.endswith("Passage: Metformin is a medicine used to\nQuery:")  # truncated to 6 tokens
    assert builder.render("p2", PASSAGES["p2"], tok) == (text, qids)
    assert PromptBuilder(list(reversed(EXAMPLES)), cfg, forbidden).render("p2", PASSAGES["p2"], tok)[1] == qids
    chosen = {builder.examples_for(f"x{i}")[0].qid for i in range(40)}
    assert len(chosen) > 1, "examples should rotate across passages"


# ---------------------------------------------------------------- tiny model fixture


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Llama and a word-level tokenizer with a chat template, saved like a HF model dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    corpus = list(PASSAGES.values()) + [e.query for e in EXAMPLES] + ["user assistant system Passage Query :"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                     eos_token="<|im_end|>", bos_token="<|im_start|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id,
                         bos_token_id=hf_tok.bos_token_id)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def _generator(model_dir: Path, batch_size: int = 2, n: int = 2):
    from dense.querygen.generator import GenerationConfig, QueryGenerator

    builder = PromptBuilder(EXAMPLES, PromptConfig(num_examples=2, max_passage_tokens=12),
                            ForbiddenQueries(qids=frozenset({"999"})))
    config = GenerationConfig(max_new_tokens=6, num_queries_per_passage=n, batch_size=batch_size, seed=1)
    return QueryGenerator(model_dir, builder, config=config, device="cpu")


class CountingGenerate:
    """Wraps ``model.generate``: counts calls and raises on call ``fail_on`` (a simulated kill)."""

    def __init__(self, generate, fail_on: int | None = None):
        self.generate, self.fail_on, self.calls = generate, fail_on, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated kill")
        return self.generate(*args, **kwargs)


def test_generation_writes_records_in_training_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = _generator(tiny_model_dir)
    assert gen.template == "chat"
    prompt, _ = gen.prompt.render("p1", PASSAGES["p1"], gen.tokenizer)
    assert prompt.count("<|im_start|>user") == 3 and prompt.endswith("<|im_start|>assistant\n")
    records = list(gen.generate(list(PASSAGES.items())))
    assert sorted(r.pid for r in records) == sorted(PASSAGES)
    assert all(len(r.raw) == 2 and len(r.example_qids) == 2 for r in records)
    assert sum(len(r.queries) for r in records) > 0
    write_output(tmp_path, llm_pairs(records), {"generator": "llm"})
    rows = read_training_records(tmp_path / "train.jsonl")
    assert rows and len(rows) == sum(len(r.queries) for r in records)
    for row in rows:
        pid = row["positives"][0]
        assert row["qid"].startswith(f"llm-{pid}-") and row["negatives"] == [] and row["source"] == "llm"
        assert row["query"].strip() == row["query"] and "\n" not in row["query"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["records"] == len(rows)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_cache_resumes_after_kill_without_regenerating(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = _generator(tiny_model_dir, batch_size=2)
    real_generate = gen.model.generate
    cache_path = tmp_path / "cache.jsonl"
    passages = list(PASSAGES.items())

    gen.model.generate = CountingGenerate(real_generate, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        list(gen.generate(passages, QueryCache(cache_path, gen.fingerprint())))
    first = QueryCache(cache_path, gen.fingerprint())
    assert len(first) == 2  # batch 1 was made durable before the kill

    counter = CountingGenerate(real_generate)
    gen.model.generate = counter
    records = list(gen.generate(passages, QueryCache(cache_path, gen.fingerprint())))
    assert counter.calls == 2  # 4 remaining passages / batch size 2
    assert sorted(r.pid for r in records) == sorted(PASSAGES)
    assert [r for r in records if r.pid in first] == list(first.records())  # cached ones are returned as stored

    counter = CountingGenerate(real_generate)
    gen.model.generate = counter
    list(gen.generate(passages, QueryCache(cache_path, gen.fingerprint())))
    assert counter.calls == 0
    # another fingerprint ignores those lines and would regenerate everything
    assert len(QueryCache(cache_path, "other-fingerprint")) == 0


def test_cache_truncates_torn_last_line_and_rejects_corrupt_middle(tmp_path: Path, caplog) -> None:
    path = tmp_path / "cache.jsonl"
    cache = QueryCache(path, "fp")
    cache.append([GeneratedQueries("p1", ("q one",)), GeneratedQueries("p2", ("q two",))])
    good_size = path.stat().st_size
    with path.open("a", encoding="utf-8") as f:
        f.write('{"fingerprint": "fp", "pid": "p3", "quer')  # killed mid-write
    with caplog.at_level("WARNING"):
        reopened = QueryCache(path, "fp")
    assert "torn last line" in caplog.text
    assert len(reopened) == 2 and "p3" not in reopened and path.stat().st_size == good_size
    reopened.append([GeneratedQueries("p3", ("q three",))])
    assert [r.pid for r in QueryCache(path, "fp").records()] == ["p1", "p2", "p3"]

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{broken", lines[2]]) + "\n")
    with pytest.raises(CacheCorruptError, match=r"cache\.jsonl:2"):
        QueryCache(path, "fp")


# ---------------------------------------------------------------- filters


def test_consistency_filter_drops_unretrieved_and_counts() -> None:
    pairs = [QueryPair(f"q{i}", f"query {i}", f"p{i}", "llm") for i in range(5)]

    def fake_search(queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        # the own passage is at rank i+1 for query i: with k=3 queries 0..2 survive
        out = []
        for q in queries:
            i = int(q.split()[1])
            ranking = [(f"other{j}", 10.0 - j) for j in range(i)] + [(f"p{i}", 1.0)]
            out.append(ranking + [(f"tail{j}", 0.0) for j in range(5)])
        return out

    kept, report = consistency_filter(pairs, fake_search, k=3, batch_size=2, name="fake")
    assert [p.qid for p in kept] == ["q0", "q1", "q2"]
    assert report.input_pairs == 5 and report.kept == 3 and report.dropped("fake@3") == 2
    assert "fake@3" in report.table()


def test_sanity_filters_each_drop_what_they_should() -> None:
    passage = ("The Eiffel Tower is a wrought iron lattice tower on the Champ de Mars in Paris, "
               "named after the engineer Gustave Eiffel.")
    cases = {
        "how tall is the eiffel tower": None,
        "eiffel tower engineer": None,  # shares a short run with the passage, as real queries do
        "": "no_content",
        "?!": "no_content",
        "what is the": "no_content",
        "Sure, here is a query about the tower": "chatty",
        "What does the passage say about Paris": "chatty",
        "eiffel": "too_short",
        " ".join(["paris"] * 30): "too_long",
        "what is a road pedal? road pedals are designed for": "run_on",
        "It is not known. It is a": "run_on",
        "wrought iron lattice tower on the Champ de Mars": "copied_from_passage",
        "What Is  Metformin": "equals_forbidden_query",
    }
    filters = SanityFilters(SanityFilterConfig(min_words=2, max_words=20), forbidden_texts=["what is metformin"])
    pairs = [QueryPair(f"q{i}", q, "p", "llm") for i, q in enumerate(cases)]
    kept, report = filters.apply(pairs, {"p": passage})
    assert [p.query for p in kept] == [q for q, why in cases.items() if why is None]
    expected = {name: list(cases.values()).count(name) for name in report.to_dict()["dropped"]}
    assert report.to_dict()["dropped"] == expected
    assert report.kept == 2 and report.input_pairs == len(cases)
    skip = SanityFilters(SanityFilterConfig(skip=("copied_from_passage",)))
    copied = next(p for p in pairs if p.query.startswith("wrought"))
    assert skip.apply([copied], {"p": passage})[0] == [copied]
    with pytest.raises(ValueError, match="unknown check"):
        SanityFilterConfig(skip=("nope",))


def test_clean_query_and_dedupe() -> None:
    from dense.querygen.generator import clean_query, dedupe_queries

    assert clean_query('Query: "what is metformin"\nPassage: blah') == "what is metformin"
    assert clean_query("\n  Search query - 1. how  tall is it?  ") == "how tall is it?"
    assert dedupe_queries(["What is X", "what  is x", "", "other"]) == ("What is X", "other")


# ---------------------------------------------------------------- crop


def test_crop_is_deterministic_and_well_formed() -> None:
    cfg = CropConfig(methods=("random_crop", "inverse_cloze"), crop_min_words=3, crop_max_words=5,
                     ict_keep_sentence_prob=0.0, seed=7)
    a = list(crop_pairs(PASSAGES.items(), cfg))
    assert a == list(crop_pairs(PASSAGES.items(), cfg))
    # a passage's crops do not depend on which other passages are selected
    only_p3 = list(crop_pairs([("p3", PASSAGES["p3"])], cfg))
    assert [(p.query, p.positive_text) for p in only_p3] == [(p.query, p.positive_text) for p in a if p.pid == "p3"]
    other_seed = list(crop_pairs(PASSAGES.items(), CropConfig(crop_min_words=3, crop_max_words=5, seed=8)))
    assert [p.query for p in a] != [p.query for p in other_seed]
    for p in a:
        passage = PASSAGES[p.pid]
        if p.positive_text is None:  # random crop: a contiguous span of 3..5 words of the passage
            assert 3 <= len(p.query.split()) <= 5 and p.query in passage
        else:  # inverse cloze: the sentence is removed from its positive
            assert p.query in split_sentences(passage) and p.query not in p.positive_text
    assert len({p.qid for p in a}) == len(a) and all(p.qid.startswith(f"crop-{p.pid}-") for p in a)
    assert {p.positive_text is None for p in a} == {True, False}  # both methods produced pairs


# ---------------------------------------------------------------- pipeline and CLI


def _write_inputs(root: Path) -> tuple[Path, Path, Path, Path]:
    collection = root / "collection.tsv"
    collection.write_text("".join(f"{pid}\t{text}\n" for pid, text in PASSAGES.items()), encoding="utf-8")
    queries = root / "queries.train.tsv"
    queries.write_text("".join(f"{e.qid}\t{e.query}\n" for e in EXAMPLES) + "555\tpassage not in pool\n")
    qrels = root / "qrels.train.txt"
    qrels.write_text("".join(f"{e.qid} 0 {e.pid} 1\n" for e in EXAMPLES) + "555 0 p_missing 1\n")
    dev = root / "queries.dev.tsv"
    dev.write_text("999\twhat is a dev query\n", encoding="utf-8")
    return collection, queries, qrels, dev


def test_run_llm_end_to_end_writes_manifest_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dense.querygen.generator import GenerationConfig
    from dense.querygen.pipeline import StageInputs, run_llm

    collection, queries, qrels, dev = _write_inputs(tmp_path)
    inputs = StageInputs(collection, queries, qrels, (dev,))
    passages = {pid: PASSAGES[pid] for pid in ("p1", "p5", "p6")}
    gen = GenerationConfig(max_new_tokens=5, num_queries_per_passage=2, batch_size=2)
    searched: list[str] = []

    def own_passage_first(qs: list[str], k: int) -> list[list[tuple[str, float]]]:
        searched.extend(qs)
        return [[("p1", 1.0)] for _ in qs]  # only p1's queries survive the round trip

    out = tmp_path / "synthetic"
    sanity = SanityFilterConfig(min_words=1)
    report = run_llm(out, inputs, passages, tiny_model_dir, None, gen, PromptConfig(num_examples=2), sanity,
                     own_passage_first, k=1)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = read_training_records(out / "train.jsonl")
    assert manifest["counts"]["records"] == len(rows) == report.kept
    assert {r["positives"][0] for r in rows} <= {"p1"}
    assert sum(manifest["filters"]["dropped"].values()) + report.kept == manifest["counts"]["generated_queries"]
    assert len(searched) == report.stages[-1].dropped + report.kept
    prompt_info = manifest["generation"]["prompt"]
    assert set(prompt_info["example_qids"]) == {"101", "102", "103", "104"}  # 555 has no passage in the pool
    assert prompt_info["num_forbidden_queries"] == 1 and manifest["inputs"]["collection"]["sha256"]
    assert manifest["counts"]["newly_generated_passages"] == 3

    run_llm(out, inputs, passages, tiny_model_dir, None, gen, PromptConfig(num_examples=2), sanity,
            own_passage_first, k=1)
    again = json.loads((out / "manifest.json").read_text())
    assert again["counts"]["newly_generated_passages"] == 0 and again["counts"]["generated_passages"] == 3
    assert read_training_records(out / "train.jsonl") == rows

    # cached_only: a fourth passage is counted as not yet generated, and nothing is generated
    more = {**passages, "p2": PASSAGES["p2"]}
    run_llm(out, inputs, more, tiny_model_dir, None, gen, PromptConfig(num_examples=2), sanity,
            own_passage_first, k=1, cached_only=True)
    partial = json.loads((out / "manifest.json").read_text())["counts"]
    assert partial["generated_passages"] == 3 and partial["not_yet_generated_passages"] == 1
    assert partial["newly_generated_passages"] == 0


def test_run_llm_prefix_engine_keeps_heldout_queries_out_of_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dense.querygen.generator import GenerationConfig
    from dense.querygen.pipeline import StageInputs, run_llm

    collection, queries, qrels, dev = _write_inputs(tmp_path)
    inputs = StageInputs(collection, queries, qrels, (dev,))
    out = tmp_path / "synthetic"
    gen = GenerationConfig(max_new_tokens=5, batch_size=2)
    run_llm(out, inputs, {pid: PASSAGES[pid] for pid in ("p1", "p5")}, tiny_model_dir, None, gen,
            PromptConfig(num_examples=2, num_prefixes=2), SanityFilterConfig(min_words=1), exclude_qids={"101"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["engine"] == "prefix-cached-v1"
    assert manifest["fewshot_qids"] == ["102", "103", "104"] and manifest["excluded_fewshot_qids"] == ["101"]
    used = {q for group in manifest["generation"]["prompt"]["prefix_example_qids"] for q in group}
    assert used and "101" not in used
    cache_lines = [json.loads(line) for line in (out / "cache" / "generation.jsonl").read_text().splitlines()]
    assert all("101" not in line["example_qids"] and line["seconds"] >= 0 for line in cache_lines)
    assert manifest["generation_seconds"] >= 0 and manifest["counts"]["generated_passages"] == 2


def test_cli_crop(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_queries",
                                                  Path(__file__).parents[1] / "scripts" / "generate_queries.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    collection, _, _, dev = _write_inputs(tmp_path)
    cli.main(["--method", "crop", "--collection", str(collection), "--forbid-queries", str(dev),
              "--max-passages", "4", "--sample-seed", "2", "--out", str(tmp_path / "out"),
              "--crop-methods", "random_crop", "inverse_cloze"])
    rows = read_training_records(tmp_path / "out" / "train.jsonl")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len({r["positives"][0] for r in rows}) == manifest["counts"]["passages"] == 4
    assert all(r["source"] == "crop" for r in rows) and manifest["max_passages"] == 4
    assert manifest["crop"]["methods"] == ["random_crop", "inverse_cloze"]
    assert any("positive_texts" in r for r in rows)


# ---------------------------------------------------------------- real data (optional)


def test_real_train_examples_exclude_dev_and_dl() -> None:
    root = os.environ.get("MSMARCO_DIR")
    if not root or not Path(root, "collection.tsv").is_file():
        pytest.skip("MSMARCO_DIR is unset or has no collection.tsv")
    from dense.querygen.data import read_tsv, train_examples

    root_path = Path(root)
    examples = train_examples(read_tsv(root_path / "collection.tsv"), root_path / "queries.train.tsv",
                              root_path / "qrels.train.txt")
    forbid = [p for p in (root_path / "queries.dev.tsv", root_path / "queries.dl19.tsv",
                          root_path / "queries.dl20.tsv") if p.is_file()]
    forbidden = ForbiddenQueries.from_files(forbid)
    assert len(examples) == 383 and len({e.qid for e in examples}) == 369
    PromptBuilder(examples, PromptConfig(), forbidden)  # raises if any train example is a dev/DL query


# ---------------------------------------------------------------- prefix-cached generation (E12)

def _prefix_generator(model_dir: Path, batch_size: int = 4, n: int = 1, do_sample: bool = True,
                      max_new_tokens: int = 6):
    from dense.querygen.generator import GenerationConfig
    from dense.querygen.prefix_generator import PrefixCachedGenerator

    builder = PromptBuilder(EXAMPLES, PromptConfig(num_examples=2, max_passage_tokens=12, num_prefixes=2),
                            ForbiddenQueries(qids=frozenset({"999"})))
    config = GenerationConfig(do_sample=do_sample, max_new_tokens=max_new_tokens, num_queries_per_passage=n,
                              batch_size=batch_size, seed=1)
    return PrefixCachedGenerator(model_dir, builder, config=config, device="cpu")


def test_prompt_parts_join_to_the_whole_prompt_and_share_prefixes(tiny_model_dir: Path) -> None:
    gen = _prefix_generator(tiny_model_dir)
    tok = gen.tokenizer
    prefixes = set()
    for pid, text in PASSAGES.items():
        parts = gen.prompt.render_parts(pid, text, tok)
        whole, qids = gen.prompt.render(pid, text, tok)
        assert parts.prefix + parts.suffix == whole and parts.example_qids == qids
        ids = tok(parts.prefix, add_special_tokens=False)["input_ids"] + tok(parts.suffix, add_special_tokens=False)[
            "input_ids"]
        assert ids == tok(whole, add_special_tokens=False)["input_ids"]
        # a passage is never its own example
        assert pid not in {e.pid for e in gen.prompt.examples_for(pid)}
        prefixes.add(parts.prefix)
    # passages share one of the two fixed example sets, except one that is an example in both (its own draw)
    ids = [gen.prompt.prefix_id(pid) for pid in PASSAGES]
    own = [pid for pid, i in zip(PASSAGES, ids) if i == -1]
    assert 0 < len(own) < len(PASSAGES)
    assert all(any(e.pid == pid for e in group) for pid in own for group in gen.prompt._prefix_sets)
    assert len(prefixes) == len({i for i in ids if i >= 0}) + len(own)


def test_prefix_cached_greedy_equals_generate_on_whole_prompts(tiny_model_dir: Path) -> None:
    from dense.querygen.generator import QueryGenerator

    gen = _prefix_generator(tiny_model_dir, do_sample=False)
    passages = list(PASSAGES.items())
    ours = {r.pid: r for r in gen.generate(passages)}
    # the same prompts through transformers' generate(), one passage at a time (no padding at all)
    ref = QueryGenerator(tiny_model_dir, gen.prompt, config=gen.config, device="cpu")
    ref.model = gen.model
    for pid, text in passages:
        expected = ref.generate_batch([(pid, text)])[0].raw[0]
        got = ours[pid].raw[0]
        # ours stops at end of turn / end of line; generate() runs on to max_new_tokens
        assert expected.split()[:len(got.split())] == got.split(), (pid, got, expected)
        assert got.split(), pid


def test_prefix_cached_samples_do_not_depend_on_the_batch(tiny_model_dir: Path) -> None:
    passages = list(PASSAGES.items())
    one_batch = {r.pid: r.raw for r in _prefix_generator(tiny_model_dir, batch_size=8, n=2).generate(passages)}
    singles = {r.pid: r.raw for r in _prefix_generator(tiny_model_dir, batch_size=1, n=2).generate(passages[::-1])}
    assert one_batch == singles
    assert all(len(raw) == 2 for raw in one_batch.values())
    other_seed = _prefix_generator(tiny_model_dir, batch_size=8, n=2)
    object.__setattr__(other_seed.config, "seed", 2)
    assert {r.pid: r.raw for r in other_seed.generate(passages)} != one_batch


def test_prefix_cached_resumes_from_cache_after_a_kill(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = _prefix_generator(tiny_model_dir, batch_size=2)
    passages = list(PASSAGES.items())
    cache_path = tmp_path / "cache.jsonl"
    real, calls = gen.generate_rows, []

    def dies_on_second(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(batch)

    gen.generate_rows = dies_on_second
    with pytest.raises(KeyboardInterrupt):
        list(gen.generate(passages, QueryCache(cache_path, gen.fingerprint())))
    first = calls[0]
    assert len(QueryCache(cache_path, gen.fingerprint())) == first  # the batch before the kill is durable
    calls.clear()
    gen.generate_rows = lambda batch: calls.append(len(batch)) or real(batch)
    records = list(gen.generate(passages, QueryCache(cache_path, gen.fingerprint())))
    assert sum(calls) == len(PASSAGES) - first and sorted(r.pid for r in records) == sorted(PASSAGES)
    # the old engine's cache lines are not mistaken for this engine's
    assert gen.fingerprint() != _generator(tiny_model_dir).fingerprint()


def test_prefix_generator_needs_fixed_example_sets(tiny_model_dir: Path) -> None:
    from dense.querygen.prefix_generator import PrefixCachedGenerator

    builder = PromptBuilder(EXAMPLES, PromptConfig(num_examples=2), ForbiddenQueries(qids=frozenset({"9"})))
    with pytest.raises(ValueError, match="num_prefixes"):
        PrefixCachedGenerator(tiny_model_dir, builder, device="cpu")


def test_forbidden_queries_cover_every_evaluation_split_ignoring_case_and_punctuation(tmp_path: Path) -> None:
    (tmp_path / "queries.train.tsv").write_text("1\twhat is a train query\n")
    (tmp_path / "queries.dev.tsv").write_text("2\tWhat is metformin?\n")
    (tmp_path / "queries.dl19.tsv").write_text("3\thow long is a marathon\n")
    (tmp_path / "queries.dl20.tsv").write_text("4\tcarbon steel: made of what\n")
    (tmp_path / "queries.heldout-extra.tsv").write_text("5\tlauri name meaning\n")
    forbidden = ForbiddenQueries.from_data_dir(tmp_path)
    assert forbidden.qids == {"2", "3", "4", "5"}
    assert forbidden.why_forbidden("x", "what is METFORMIN") is not None
    assert forbidden.why_forbidden("x", "Carbon steel made of what?!") is not None
    assert forbidden.why_forbidden("x", "lauri, name; meaning.") is not None
    assert forbidden.why_forbidden("1", "what is a train query") is None
    assert SanityFilters(SanityFilterConfig(), forbidden.texts).apply(
        [QueryPair("q", "How long is a marathon?", "p6", "llm")], PASSAGES)[1].dropped("equals_forbidden_query") == 1
    (tmp_path / "queries.dev.tsv").unlink(), (tmp_path / "queries.dl19.tsv").unlink()
    (tmp_path / "queries.dl20.tsv").unlink(), (tmp_path / "queries.heldout-extra.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="evaluation query"):
        ForbiddenQueries.from_data_dir(tmp_path)


def test_fewshot_examples_leave_out_the_heldout_queries(tmp_path: Path) -> None:
    from dense.querygen.pipeline import StageInputs, fewshot_examples
    from dense.splits import holdout_split

    (tmp_path / "collection.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in PASSAGES.items()))
    (tmp_path / "queries.train.tsv").write_text("".join(f"{e.qid}\t{e.query}\n" for e in EXAMPLES))
    (tmp_path / "qrels.train.txt").write_text("".join(f"{e.qid} 0 {e.pid} 1\n" for e in EXAMPLES))
    inputs = StageInputs(tmp_path / "collection.tsv", tmp_path / "queries.train.tsv", tmp_path / "qrels.train.txt")
    train, held = holdout_split([e.qid for e in EXAMPLES], 2, seed=13)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == sorted(e.qid for e in EXAMPLES)
    assert holdout_split(reversed([e.qid for e in EXAMPLES]), 2, seed=13) == (train, held)
    assert sorted(e.qid for e in fewshot_examples(inputs, held)) == train
    with pytest.raises(ValueError, match="no few-shot example"):
        fewshot_examples(inputs, [e.qid for e in EXAMPLES])


def test_a_train_query_equal_to_a_dev_query_is_left_out_of_the_fewshot_pool_not_fatal(tmp_path: Path) -> None:
    """MS MARCO's splits share some query strings: at full scale a few train queries equal a dev one. They must be
    left out of the few-shot pool, not stop the stage (PromptBuilder refuses any forbidden example it is given)."""
    from dense.querygen.pipeline import StageInputs, fewshot_examples

    (tmp_path / "collection.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in PASSAGES.items()))
    (tmp_path / "queries.train.tsv").write_text("".join(f"{e.qid}\t{e.query}\n" for e in EXAMPLES))
    (tmp_path / "qrels.train.txt").write_text("".join(f"{e.qid} 0 {e.pid} 1\n" for e in EXAMPLES))
    (tmp_path / "queries.dev.tsv").write_text("9001\tHow long is a Marathon?\n")  # 104's text, cased and punctuated
    inputs = StageInputs(tmp_path / "collection.tsv", tmp_path / "queries.train.tsv", tmp_path / "qrels.train.txt")
    forbidden = ForbiddenQueries.from_files([tmp_path / "queries.dev.tsv"])
    with pytest.raises(ForbiddenExampleError, match="104"):
        PromptBuilder(fewshot_examples(inputs), PromptConfig(num_examples=2), forbidden)
    pool = fewshot_examples(inputs, forbidden=forbidden)
    assert sorted(e.qid for e in pool) == ["101", "102", "103"]
    PromptBuilder(pool, PromptConfig(num_examples=2), forbidden)  # builds


def test_the_cache_key_does_not_depend_on_where_the_model_is_installed(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "elsewhere" / tiny_model_dir.name
    shutil.copytree(tiny_model_dir, moved)
    assert _prefix_generator(moved).fingerprint() == _prefix_generator(tiny_model_dir).fingerprint()
    renamed = tmp_path / "another-model"
    shutil.copytree(tiny_model_dir, renamed)
    assert _prefix_generator(renamed).fingerprint() != _prefix_generator(tiny_model_dir).fingerprint()


def test_draw_examples_is_seeded_order_free_and_skips_forbidden_and_excluded_queries() -> None:
    forbidden = ForbiddenQueries(qids=frozenset({"101"}), texts=frozenset({"what does the name lauri mean"}))
    extra = EXAMPLES + [FewShotExample("104", "how long is a marathon", "p7", "another positive of 104")]
    drawn = draw_examples(extra, 1, seed=3, forbidden=forbidden, exclude_texts=["How long is a Marathon?"])
    # 101 is forbidden by id, 103 by text, 104 excluded (a held-out text, compared normalized): only 102 is left
    assert [e.qid for e in drawn] == ["102"]
    with pytest.raises(ValueError, match="only 1 train queries are allowed"):
        draw_examples(extra, 2, seed=3, forbidden=forbidden, exclude_texts=["how long is a marathon"])
    allowed = ForbiddenQueries(qids=frozenset({"999"}))
    a = draw_examples(extra, 3, seed=5, forbidden=allowed)
    assert a == draw_examples(list(reversed(extra)), 3, seed=5, forbidden=allowed)
    assert len({e.qid for e in a}) == 3  # one pair per query
    assert [e.pid for e in a if e.qid == "104"] in ([], ["p6"])  # the first positive of a query with two
    assert len({tuple(e.qid for e in draw_examples(extra, 2, seed=s, forbidden=allowed)) for s in range(8)}) > 1


def test_benchmark_variants_parse_every_option_and_refuse_unknown_ones() -> None:
    from dense.querygen.benchmark import GenerationVariant

    v = GenerationVariant.parse("prefix-b64-e2-p96-x4-t20-n3")
    assert (v.engine, v.batch_size, v.num_examples, v.max_passage_tokens, v.num_prefixes, v.max_new_tokens,
            v.num_queries) == ("prefix", 64, 2, 96, 4, 20, 3)
    assert GenerationVariant.parse("generate").num_queries == 1
    for bad in ("prefix-q3", "prefix-n", "beam-b4"):
        with pytest.raises(ValueError):
            GenerationVariant.parse(bad)


def test_a_generated_query_equal_to_a_heldout_query_is_filtered_like_an_evaluation_query() -> None:
    """No model may train on a held-out selection query's words: a generated query equal to one (case and
    punctuation aside) is dropped, and counted with the evaluation-query matches."""
    from dense.querygen.pipeline import filter_pairs

    pairs = [QueryPair("q1", "What is Metformin used for?", "p2", "llm"), QueryPair("q2", "how long is a marathon",
                                                                                      "p6", "llm")]
    kept, report = filter_pairs(pairs, PASSAGES, SanityFilterConfig(), ForbiddenQueries(), None, 20,
                                heldout_texts=frozenset({"what is metformin used for"}))
    assert [p.qid for p in kept] == ["q2"] and report.dropped("equals_forbidden_query") == 1
    assert len(filter_pairs(pairs, PASSAGES, SanityFilterConfig(), ForbiddenQueries(), None, 20)[0]) == 2
