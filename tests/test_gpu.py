"""The GPU paths of the A10G recipe: faiss-gpu flat index, bf16 training, corpus encoding, query generation and
query-likelihood scoring on CUDA. Each test runs where a CUDA device is present and is skipped otherwise, with the
reason; the same code on CPU is covered by the rest of the suite, and tests/test_full_recipe.py runs the whole
recipe on a GPU too (with bf16 on) when there is one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dense_fixtures import tiny_encoder_config, toy_corpus, toy_pairs, toy_records_and_passages
from recipe_models import bf16_available, tiny_bert, tiny_chat_lm

NO_CUDA = "no CUDA device: the GPU paths (faiss-gpu, bf16 autocast, CUDA generation and scoring) cannot run here"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
needs_bf16 = pytest.mark.skipif(not bf16_available(), reason=NO_CUDA if not torch.cuda.is_available() else
                                "this CUDA device has no bf16 (the recipe's dense.train.bf16 needs Ampere or newer)")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(toy_corpus(), tmp_path_factory.mktemp("gpu") / "tiny-bert")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_lm(toy_corpus(), tmp_path_factory.mktemp("gpu") / "tiny-chat-lm")


# --- faiss-gpu ---------------------------------------------------------------------------------------------------
def test_faiss_has_gpu_support_where_cuda_is() -> None:
    from dense.faiss_index import gpu_available

    assert gpu_available(), "CUDA is present but faiss has no GPU support: `make install FAISS=gpu`"


def test_gpu_flat_index_finds_what_the_cpu_flat_index_finds(tmp_path: Path) -> None:
    from dense.faiss_index import IndexConfig, build_index, is_gpu_index, load_index, save_index

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((5000, 64)).astype(np.float16)
    queries = rng.standard_normal((50, 64)).astype(np.float32)
    cpu = build_index(corpus, IndexConfig(kind="flat"), progress=False)
    gpu = build_index(corpus, IndexConfig(kind="flat"), use_gpu=True, progress=False)
    assert is_gpu_index(gpu) and not is_gpu_index(cpu)
    cpu_scores, cpu_ids = cpu.search(queries, 10)
    gpu_scores, gpu_ids = gpu.search(queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu_ids, gpu_ids, strict=True)])
    assert overlap >= 0.95  # float16 storage on the GPU reorders near-ties only
    np.testing.assert_allclose(gpu_scores[:, 0], cpu_scores[:, 0], rtol=1e-2, atol=5e-2)

    manifest = {"model_fingerprint": "m", "encoder_config": None, "corpus_sha256": "c", "dim": 64, "count": 5000,
                "kind": "flat", "metric": "ip", "params": {}}
    save_index(gpu, tmp_path, manifest)  # written from the GPU, read back on either
    reloaded, _ = load_index(tmp_path, use_gpu=True)
    assert is_gpu_index(reloaded)
    np.testing.assert_array_equal(reloaded.search(queries, 10)[1][:, 0], gpu_ids[:, 0])


# --- bf16 training -----------------------------------------------------------------------------------------------
@needs_bf16
def test_bf16_autocast_is_on_for_cuda_encoders(bert_dir: Path) -> None:
    from dense.encoder import build_encoder

    encoder = build_encoder(tiny_encoder_config(bert_dir, pooling="cls", normalize=False), device="cuda")
    batch = encoder.to_device(encoder.tokenize_passages(["a short text", "another one"]))
    with encoder.autocast(True):
        assert torch.is_autocast_enabled("cuda")
        out = encoder.encode_passage(batch)
    assert out.dtype == torch.float32  # pooled in bf16, returned as float32 for the loss
    with encoder.autocast(False):
        assert not torch.is_autocast_enabled("cuda")


@needs_bf16
def test_bf16_grad_cache_step_matches_the_full_batch_step(bert_dir: Path) -> None:
    from dense.config import TrainConfig
    from dense.encoder import build_encoder
    from dense.training import TrainingBatches, full_batch_loss, grad_cache_loss

    records, passages = toy_records_and_passages()
    encoder = build_encoder(tiny_encoder_config(bert_dir, pooling="cls", normalize=False, temperature=1.0),
                            device="cuda")
    encoder.eval()  # no dropout, so both ways see the same network
    results = []
    for chunk, step in ((None, full_batch_loss), (5, grad_cache_loss)):
        train = TrainConfig(batch_size=8, hard_negatives=3, grad_cache_chunk=chunk, bf16=True)
        batch = TrainingBatches(records, passages.__getitem__, encoder, train)[0]
        encoder.zero_grad()
        loss = step(encoder, batch, True)
        results.append((loss, torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])))
    (full_loss, full), (cached_loss, cached) = results
    assert np.isfinite(full_loss) and cached_loss == pytest.approx(full_loss, rel=2e-2)
    # bf16 rounds one full-batch forward and chunked forwards differently; the direction must still agree
    assert torch.nn.functional.cosine_similarity(full, cached, dim=0) > 0.98


@needs_bf16
def test_bf16_training_on_cuda_writes_a_model(bert_dir: Path, tmp_path: Path) -> None:
    import json

    from dense.config import TrainConfig
    from dense.training import train

    records, passages = toy_records_and_passages()
    config = tiny_encoder_config(bert_dir, pooling="cls", normalize=False, temperature=1.0)
    train_config = TrainConfig(batch_size=8, hard_negatives=3, grad_cache_chunk=8, max_steps=4, checkpoint_every=2,
                               bf16=True, num_workers=0)
    model_dir = train(config, train_config, records, passages, tmp_path)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["device"].startswith("cuda") and np.isfinite(manifest["final_loss"])


# --- encoding, generation and scoring on CUDA -------------------------------------------------------------------
def test_passage_encoding_on_cuda_agrees_with_cpu(bert_dir: Path) -> None:
    from dense.encoder import build_encoder

    torch.manual_seed(0)
    cpu = build_encoder(tiny_encoder_config(bert_dir), device="cpu")
    gpu = build_encoder(tiny_encoder_config(bert_dir), device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    texts = toy_corpus()
    on_cpu, on_gpu = cpu.encode_passages(texts), gpu.encode_passages(texts, batch_size=7)
    cosine = np.sum(on_cpu * on_gpu, axis=1) / np.linalg.norm(on_cpu, axis=1) / np.linalg.norm(on_gpu, axis=1)
    assert cosine.min() > 0.99  # bf16 autocast on the GPU, float32 on the CPU


def test_prefix_cached_generation_runs_on_cuda_and_repeats_itself(lm_dir: Path) -> None:
    from dense.querygen.generator import GenerationConfig
    from dense.querygen.prefix_generator import PrefixCachedGenerator
    from dense.querygen.prompt import FewShotExample, PromptBuilder, PromptConfig

    pairs = toy_pairs()
    examples = [FewShotExample(f"q{i}", query, f"e{i}", passage) for i, (query, passage) in enumerate(pairs[:6])]
    builder = PromptBuilder(examples, PromptConfig(num_examples=2, num_prefixes=2, max_passage_tokens=24))
    passages = [(f"p{i}", passage) for i, (_, passage) in enumerate(pairs[6:20])]
    config = GenerationConfig(max_new_tokens=8, batch_size=4, seed=3)
    runs = []
    for _ in range(2):
        generator = PrefixCachedGenerator(lm_dir, builder, config=config, device="cuda")
        assert next(generator.model.parameters()).device.type == "cuda"
        runs.append(generator.generate_batch(passages))
    assert [r.pid for r in runs[0]] == [pid for pid, _ in passages]
    assert [r.raw for r in runs[0]] == [r.raw for r in runs[1]]  # per-row seeded sampling: the same on a rerun


def test_query_likelihood_scores_on_cuda_are_finite_and_repeatable(lm_dir: Path) -> None:
    from fusion.query_likelihood import QueryLikelihoodConfig, QueryLikelihoodScorer

    scorer = QueryLikelihoodScorer.from_dir(lm_dir, QueryLikelihoodConfig(max_passage_tokens=32))
    assert scorer.device.type == "cuda"
    passages = toy_corpus()[:5]
    first, second = scorer.score("the history of rome", passages), scorer.score("the history of rome", passages)
    assert first.shape == (5,) and np.isfinite(first).all()
    np.testing.assert_allclose(first, second, rtol=1e-5)


def test_the_cached_gpu_memory_goes_back_to_the_device_after_a_stage() -> None:
    import torch

    from hybrid.pipeline import release_gpu_cache

    x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # 64 MiB through the caching allocator
    del x
    assert torch.cuda.memory_reserved() >= 64 << 20
    release_gpu_cache()
    assert torch.cuda.memory_reserved() < 64 << 20
