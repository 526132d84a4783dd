"""Corpus encoding: order, fidelity, resume after a kill, refusal to resume with another model or corpus."""

from __future__ import annotations

import json
import numpy as np
import pytest

from dense.corpus_encoding import EncodedCorpus, encode_corpus, read_pids
from dense.interfaces import EncodingResumeError, IncompleteArtifactError
from dense_fakes import DIM, HashingEncoder, SimulatedKill

FP16_ATOL = 2e-3  # unit vectors: float16 keeps ~3 decimal digits


def make_corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(300)]
    return [
        (str(7000 + 13 * i), " ".join(rng.choice(vocab, size=int(rng.integers(1, 40)))))
        for i in range(n)
    ]


def encode(encoder, corpus, out_dir, **kw):
    options = {"batch_size": 8, "shard_size": 20, "model_fingerprint": "model-a", "progress": False} | kw
    return encode_corpus(encoder, corpus, out_dir, **options)


def test_embeddings_equal_direct_encoding_in_corpus_order(tmp_path):
    corpus = make_corpus(70)
    encoder = HashingEncoder()
    result = encode(encoder, corpus, tmp_path, shard_size=25)

    texts = [text for _, text in corpus]
    assert result.pids == [pid for pid, _ in corpus]
    assert result.embeddings.dtype == np.float16 and result.embeddings.shape == (70, DIM)
    np.testing.assert_allclose(result.embeddings, HashingEncoder().encode_passages(texts), atol=FP16_ATOL, rtol=0)
    # Each call saw a batch sorted longest first, and the sorting really reordered the corpus.
    for call in encoder.calls:
        assert [len(t) for t in call] == sorted((len(t) for t in call), reverse=True)
    assert [t for call in encoder.calls for t in call] != texts
    assert sum(len(call) for call in encoder.calls) == len(corpus)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == 70 and manifest["dim"] == DIM and manifest["dtype"] == "float16"
    assert manifest["model_fingerprint"] == "model-a" and manifest["passages_per_second"] > 0
    assert not (tmp_path / "progress.json").exists()
    reopened = EncodedCorpus.open(tmp_path, expected={"model_fingerprint": "model-a"})
    assert reopened.count == 70 and reopened.dim == DIM
    np.testing.assert_array_equal(reopened.embeddings, result.embeddings)


def test_fp32_storage_and_one_shot_iterator(tmp_path):
    corpus = make_corpus(30)
    result = encode(HashingEncoder(), iter(corpus), tmp_path, fp16=False)
    assert result.embeddings.dtype == np.float32 and (tmp_path / "embeddings.f32.npy").exists()
    np.testing.assert_array_equal(result.embeddings, HashingEncoder().encode_passages([t for _, t in corpus]))


def test_resume_after_kill_skips_finished_shards_and_equals_uninterrupted_run(tmp_path):
    corpus = make_corpus(70)  # shard_size 20 -> 4 shards; batch_size 8 -> calls per shard: 3, 3, 3, 2
    reference = encode(HashingEncoder(), corpus, tmp_path / "reference")

    with pytest.raises(SimulatedKill):
        encode(HashingEncoder(fail_on_call=7), corpus, tmp_path / "run")  # call 7 = first batch of shard 2
    with pytest.raises(IncompleteArtifactError, match="2 of 4 shards"):
        EncodedCorpus.open(tmp_path / "run")

    resumed_encoder = HashingEncoder()
    resumed = encode(resumed_encoder, corpus, tmp_path / "run")

    assert len(resumed_encoder.calls) == 3 + 2  # shards 2 and 3 only
    first_two_shards = {text for _, text in corpus[:40]}
    assert not first_two_shards & {t for call in resumed_encoder.calls for t in call}
    assert resumed.pids == reference.pids
    np.testing.assert_array_equal(resumed.embeddings, reference.embeddings)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["shards_resumed"] == 2


def test_resume_with_other_model_is_refused_unless_overwrite(tmp_path):
    corpus = make_corpus(50)
    with pytest.raises(SimulatedKill):
        encode(HashingEncoder(fail_on_call=4), corpus, tmp_path)
    with pytest.raises(EncodingResumeError, match="model_fingerprint: was 'model-a', now 'model-b'"):
        encode(HashingEncoder(), corpus, tmp_path, model_fingerprint="model-b")

    encoder = HashingEncoder()
    result = encode(encoder, corpus, tmp_path, model_fingerprint="model-b", overwrite=True)
    assert sum(len(call) for call in encoder.calls) == len(corpus)  # started over
    assert result.manifest["model_fingerprint"] == "model-b"


def test_resume_with_changed_corpus_is_refused(tmp_path):
    corpus = make_corpus(50)
    with pytest.raises(SimulatedKill):
        encode(HashingEncoder(fail_on_call=4), corpus, tmp_path)
    changed = list(corpus)
    changed[3] = (changed[3][0], changed[3][1] + " edited")
    with pytest.raises(EncodingResumeError, match="corpus_sha256: was"):
        encode(HashingEncoder(), changed, tmp_path)


def test_finished_encoding_is_reused_and_guarded(tmp_path):
    corpus = make_corpus(30)
    encode(HashingEncoder(), corpus, tmp_path)
    again = HashingEncoder()
    result = encode(again, corpus, tmp_path)
    assert again.calls == [] and result.count == 30
    with pytest.raises(EncodingResumeError, match="finished encoding"):
        encode(HashingEncoder(), corpus, tmp_path, model_fingerprint="model-b")
    with pytest.raises(Exception, match="'model_fingerprint' is 'model-a' in the saved corpus encoding but 'x'"):
        EncodedCorpus.open(tmp_path, expected={"model_fingerprint": "x"})


def test_float16_overflow_names_the_passage(tmp_path):
    corpus = make_corpus(10)
    with pytest.raises(ValueError, match=rf"passage '{corpus[0][0]}'.*fp16=False"):
        encode(HashingEncoder(scale=1e6), corpus, tmp_path)


@pytest.mark.parametrize(
    ("corpus", "error"),
    [([], "empty"), ([("1", "a"), ("2\t3", "b")], "pid '2\\\\t3'")],
)
def test_bad_corpus_is_rejected(tmp_path, corpus, error):
    with pytest.raises(ValueError, match=error):
        encode(HashingEncoder(), corpus, tmp_path)


def test_read_pids_round_trip(tmp_path):
    (tmp_path / "pids.txt").write_text("a\nb\n")
    assert read_pids(tmp_path / "pids.txt") == ["a", "b"]
    (tmp_path / "pids.txt").write_text("")
    assert read_pids(tmp_path / "pids.txt") == []
