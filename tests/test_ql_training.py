"""QL reranker fine-tuning: it moves the positive up, touches only the top layers, and saves a loadable model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fusion.ql_training import QLTrainConfig, TrainGroup, save_scorer_model, train_query_likelihood
from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer
from tests.dense_fixtures import train_bpe_tokenizer

GROUPS = [
    TrainGroup("where is paris", "paris is the capital of france", ("the cat sat on the mat", "dogs bark at night")),
    TrainGroup("cat on a mat", "the cat sat on the mat", ("paris is the capital of france", "dogs bark at night")),
]


def tiny_scorer(layers: int = 3) -> QueryLikelihoodScorer:
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=True)
    return QueryLikelihoodScorer(LlamaForCausalLM(config).eval(), tokenizer, QueryLikelihoodConfig(max_passage_tokens=16))


def margins(scorer: QueryLikelihoodScorer) -> list[float]:
    out = []
    for g in GROUPS:
        s = scorer.score(g.query, [g.positive, *g.negatives])
        out.append(float(s[0] - s[1:].max()))
    return out


def test_training_raises_the_positive_and_updates_only_the_top_layers(tmp_path) -> None:
    scorer = tiny_scorer()
    before = margins(scorer)
    frozen = {n: p.detach().clone() for n, p in scorer.model.named_parameters()}
    record = train_query_likelihood(scorer, GROUPS, QLTrainConfig(trainable_layers=1, negatives=2, epochs=15,
                                                                    lr=3e-3), progress=False)
    after = margins(scorer)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert record["steps"] == 30 and len(record["epoch_losses"]) == 15
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]
    changed = {n for n, p in scorer.model.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(n.startswith(("model.layers.2.", "model.norm.")) for n in changed), changed
    assert not any(p.requires_grad for p in scorer.model.parameters()) and not scorer.model.training
    # scoring after training uses a prefix cache recomputed with the new weights
    seqs, n = scorer.sequences(GROUPS[0].query, [GROUPS[0].positive])
    with torch.no_grad():
        fresh = float(scorer.mean_logprob(seqs, n, cached_prefix=False)[0])
    assert scorer.score(GROUPS[0].query, [GROUPS[0].positive])[0] == pytest.approx(fresh, abs=1e-4)

    out = save_scorer_model(scorer, tmp_path / "ft", record)
    assert (out / "train.json").is_file() and not list(tmp_path.glob("ft.tmp-*"))
    loaded = QueryLikelihoodScorer.from_dir(out, scorer.config)
    np.testing.assert_allclose(margins(loaded), after, rtol=1e-4, atol=1e-4)


def test_bad_training_input_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        train_query_likelihood(tiny_scorer(1), [TrainGroup("q", "p", ())], progress=False)
    with pytest.raises(ValueError):
        QLTrainConfig(trainable_layers=0)
    with pytest.raises(ValueError):
        QLTrainConfig(lr=0)


def test_bfloat16_autocast_learns_with_float32_weights_and_reports_windows() -> None:
    scorer = tiny_scorer()
    before = margins(scorer)
    record = train_query_likelihood(scorer, GROUPS, QLTrainConfig(trainable_layers=1, negatives=2, epochs=60, lr=3e-3,
                                                                    autocast="bfloat16"), progress=False)
    assert all(a > b for a, b in zip(margins(scorer), before))
    assert all(p.dtype == torch.float32 for p in scorer.model.parameters())
    # 120 steps: one full window of 100 and the last 20
    assert len(record["window_losses"]) == 2 and len(record["window_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in record["window_accuracy"])
    assert record["time_budget_hit"] is False


def test_time_budget_stops_training_early() -> None:
    record = train_query_likelihood(tiny_scorer(1), GROUPS, QLTrainConfig(negatives=2, epochs=50, max_seconds=1e-9),
                                    progress=False)
    assert record["steps"] == 1 and record["time_budget_hit"] is True and len(record["epoch_losses"]) == 1


def test_sampled_negatives_use_more_than_the_first_ones(monkeypatch) -> None:
    group = TrainGroup("where is paris", "paris is the capital of france",
                       ("the cat sat on the mat", "dogs bark at night", "rain falls in spain", "an apple a day"))

    def negatives_seen(sample: bool) -> set[str]:
        scorer, seen = tiny_scorer(1), set()
        original = scorer.sequences

        def spy(query, passages):
            seen.update(passages[1:])
            return original(query, passages)

        monkeypatch.setattr(scorer, "sequences", spy)
        train_query_likelihood(scorer, [group], QLTrainConfig(negatives=1, epochs=20, sample_negatives=sample),
                               progress=False)
        return seen

    assert len(negatives_seen(True)) > 1
    assert negatives_seen(False) == {group.negatives[0]}


def test_training_refuses_a_bfloat16_scorer_and_bad_options() -> None:
    tokenizer_scorer = tiny_scorer(1)
    bf16 = QueryLikelihoodScorer(tokenizer_scorer.model, tokenizer_scorer.tokenizer,
                                 QueryLikelihoodConfig(max_passage_tokens=16, dtype="bfloat16"))
    with pytest.raises(ValueError, match="float32"):
        train_query_likelihood(bf16, GROUPS, progress=False)
    with pytest.raises(ValueError):
        QLTrainConfig(autocast="float16")
    with pytest.raises(ValueError):
        QLTrainConfig(max_seconds=0)
