"""Query-likelihood scorer: equals a plain full forward pass, independent of batching and padding."""

from __future__ import annotations

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
    before, after = scorer._pieces()
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


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        QueryLikelihoodConfig(batch_size=0)
