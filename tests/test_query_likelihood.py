"""Query-likelihood scorer: equals a plain full forward pass, independent of batching and padding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer
from tests.dense_fixtures import train_bpe_tokenizer

PASSAGES = ["the cat sat on the mat", "dogs bark at night and sleep all day long", "x", "paris is in france"]


@pytest.fixture(scope="module")
def tiny_lm():
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval(), tokenizer


def naive_score(scorer: QueryLikelihoodScorer, query: str, passage: str) -> float:
    before, after = scorer._prompt_ids
    q = scorer._query_ids(query)
    ids = torch.tensor([before + scorer._ids(passage)[: scorer.config.max_passage_tokens] + after + q])
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model(input_ids=ids).logits[0].float(), dim=-1)
    n = ids.shape[1]
    return float(np.mean([logp[t - 1, ids[0, t]].item() for t in range(n - len(q), n)]))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_a_plain_forward_pass_whatever_the_batching(tiny_lm, batch_size: int) -> None:
    model, tok = tiny_lm
    scorer = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(batch_size=batch_size, max_passage_tokens=8))
    got = scorer.score("where is paris", PASSAGES)
    want = [naive_score(scorer, "where is paris", p) for p in PASSAGES]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert got.shape == (4,) and np.all(got < 0)


def test_scores_are_log_probabilities_of_the_query_only(tiny_lm) -> None:
    model, tok = tiny_lm
    scorer = QueryLikelihoodScorer(model, tok)
    a = scorer.score("cat", ["the cat sat", "the cat sat"])
    assert a[0] == pytest.approx(a[1])
    assert scorer.score("cat", []).shape == (0,)
    with pytest.raises(ValueError, match="no tokens"):
        scorer.score("   ", ["a"])


def test_token_logprobs_are_the_per_token_terms_of_the_score(tiny_lm) -> None:
    model, tok = tiny_lm
    scorer = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(max_passage_tokens=8, batch_size=3))
    tokens = scorer.token_logprobs("where is paris", PASSAGES)
    assert tokens.shape == (len(PASSAGES), scorer.query_length("where is paris")) and tokens.dtype == np.float64
    assert (tokens <= 0).all()
    np.testing.assert_allclose(tokens.mean(axis=1), scorer.score("where is paris", PASSAGES), rtol=1e-6, atol=1e-6)
    # an empty passage: the query's log-probabilities after the prompt alone, one token at a time
    alone = scorer.token_logprobs("where is paris", [""])
    assert alone.shape == (1, tokens.shape[1]) and not np.allclose(alone[0], tokens[0])


def test_query_length_is_what_the_mean_is_taken_over(tiny_lm) -> None:
    model, tok = tiny_lm
    scorer = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(max_query_tokens=3))
    long_query = "where is the city of paris in france"
    assert scorer.query_length(long_query) == scorer.sequences(long_query, ["x"])[1] == 3
    assert scorer.query_length("cat") == len(scorer._query_ids("cat")) >= 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        QueryLikelihoodConfig(batch_size=0)


# SmolLM2's template in miniature: with no system message it inserts its own (a default system turn)
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("system_prompt", [None, "", "be brief"])
def test_chat_prompt_system_turn_and_cached_prefix(tiny_lm, system_prompt) -> None:
    model, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    scorer = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(system_prompt=system_prompt))
    before, after = scorer._prompt_texts()
    assert ("You are a helpful assistant" in before) == (system_prompt is None)
    assert before.startswith("<|im_start|>system\n" + (system_prompt or ""))
    assert after.endswith("<|im_start|>assistant\n")
    # the prompt prefix is cached once; scores still equal a full forward pass over prefix + passage + query
    assert scorer._prefix_kv[0][0].shape[2] == len(scorer._prompt_ids[0])
    got = scorer.score("where is paris", PASSAGES)
    np.testing.assert_allclose(got, [naive_score(scorer, "where is paris", p) for p in PASSAGES], rtol=1e-4, atol=1e-4)


DEMOS = (("the eiffel tower stands in paris , the capital of france", "eiffel tower city"),
         ("cats sleep most of the day", "how long do cats sleep"))


@pytest.mark.parametrize("chat", [False, True])
def test_few_shot_demonstrations_are_earlier_turns_of_the_cached_prefix(tiny_lm, chat: bool) -> None:
    model, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE if chat else None
    zero = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(max_passage_tokens=4))
    few = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(max_passage_tokens=4, examples=DEMOS))
    zero_before, zero_after = zero._prompt_texts()
    before, after = few._prompt_texts()
    # the demonstrations sit before the scored passage, each query whole, each passage cut like a scored one;
    # what follows the passage is unchanged, and so is the prompt's start
    assert after == zero_after and before.endswith(zero_before[-len("Passage: "):])
    assert before.index("eiffel tower city") < before.index("how long do cats sleep")
    cut = tok.decode(tok(DEMOS[0][0], add_special_tokens=False)["input_ids"][:4], skip_special_tokens=True).strip()
    assert f"Passage: {cut}" in before and "capital of france" not in before
    assert before.count("Passage: ") == 3 and (before.count("<|im_start|>assistant") == 2) == chat
    # cached prefix, scores equal a full forward pass, and the demonstrations change them
    assert few._prefix_kv[0][0].shape[2] == len(few._prompt_ids[0]) > len(zero._prompt_ids[0])
    got = few.score("where is paris", PASSAGES)
    np.testing.assert_allclose(got, [naive_score(few, "where is paris", p) for p in PASSAGES], rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, zero.score("where is paris", PASSAGES))


@pytest.mark.parametrize("examples", [(("passage", ""),), (("only one",),), (("p", "q", "r"),)])
def test_demonstrations_must_be_pairs_of_text(examples) -> None:
    with pytest.raises(ValueError, match="pairs"):
        QueryLikelihoodConfig(examples=examples)


def test_num_layers_keeps_the_first_layers_of_the_given_model() -> None:
    tokenizer = train_bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    first = model.model.layers[0]
    scorer = QueryLikelihoodScorer(model, tokenizer, QueryLikelihoodConfig(num_layers=2))
    assert len(scorer.model.model.layers) == 2 and scorer.model.model.layers[0] is first
    assert scorer.model.config.num_hidden_layers == 2
    np.testing.assert_allclose(scorer.score("cat", PASSAGES[:2]), [naive_score(scorer, "cat", p) for p in PASSAGES[:2]],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="only 2 layers"):
        QueryLikelihoodScorer(model, tokenizer, QueryLikelihoodConfig(num_layers=5))
    with pytest.raises(ValueError):
        QueryLikelihoodConfig(num_layers=0)


def test_bfloat16_runs_the_decoder_in_bf16_and_the_head_in_float32(tiny_lm) -> None:
    model, tok = tiny_lm
    want = QueryLikelihoodScorer(model, tok, QueryLikelihoodConfig(max_passage_tokens=8)).score("where is paris",
                                                                                               PASSAGES)
    scorer = QueryLikelihoodScorer(copy.deepcopy(model), tok,
                                   QueryLikelihoodConfig(max_passage_tokens=8, dtype="bfloat16", batch_size=3))
    assert scorer.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in scorer.decoder().parameters())
    assert scorer._head is not None and scorer._head[0].dtype == torch.float32
    assert scorer._prefix_kv is not None and scorer._prefix_kv[0][0].dtype == torch.bfloat16
    got = scorer.score("where is paris", PASSAGES)
    assert got.dtype == np.float64 and got.shape == (4,)
    # bf16 keeps ~3 significant digits: close to float32, not equal
    np.testing.assert_allclose(got, want, atol=0.05)
    assert not np.array_equal(got, want)


def test_eager_attention_gives_the_sdpa_scores_with_padding_and_the_cached_prefix(tiny_lm) -> None:
    model, tok = tiny_lm
    sdpa = QueryLikelihoodScorer(copy.deepcopy(model), tok, QueryLikelihoodConfig(max_passage_tokens=8, batch_size=3))
    assert sdpa.attention == "sdpa" and sdpa.model.config._attn_implementation == "sdpa"
    scorer = QueryLikelihoodScorer(copy.deepcopy(model), tok,
                                   QueryLikelihoodConfig(max_passage_tokens=8, batch_size=3, attention="eager"))
    assert scorer.attention == "eager" and scorer.model.config._attn_implementation == "eager"
    # rows of different lengths in one batch (right padding) and the prompt prefix from the cache
    assert len({len(s) for s in scorer.sequences("where is paris", PASSAGES)[0]}) > 1
    np.testing.assert_allclose(scorer.score("where is paris", PASSAGES), sdpa.score("where is paris", PASSAGES),
                               rtol=1e-5, atol=1e-5)


def test_attention_must_be_a_known_kernel() -> None:
    with pytest.raises(ValueError, match="attention"):
        QueryLikelihoodConfig(attention="flash")


def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_native_bf16(monkeypatch) -> None:
    import fusion.query_likelihood as ql

    assert isinstance(ql.cpu_has_native_bf16(), bool)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(ql, "cpu_has_native_bf16", lambda: True)
    assert ql.resolve_dtype("auto", cpu) == "bfloat16"
    assert ql.resolve_dtype("auto", cuda) == "float32"
    monkeypatch.setattr(ql, "cpu_has_native_bf16", lambda: False)
    assert ql.resolve_dtype("auto", cpu) == "float32"
    assert ql.resolve_dtype("bfloat16", cpu) == "bfloat16" and ql.resolve_dtype("float32", cpu) == "float32"
    with pytest.raises(ValueError, match="dtype"):
        QueryLikelihoodConfig(dtype="float16")
