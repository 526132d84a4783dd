"""Dense encoders: shapes, norms, pooling under padding, layer truncation, static encoder, loss, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from dense.config import ConfigError, EncoderConfig, TrainConfig
from dense.encoder import BiEncoder, build_encoder, load_encoder
from dense.pooling import first_token_pool, last_token_pool, mean_pool
from dense.static_encoder import StaticEmbeddingEncoder
from dense_fixtures import (
    make_tiny_bert_dir,
    make_tiny_encoder_dir,
    make_tiny_llama_dir,
    tiny_encoder_config,
    train_wordpiece_tokenizer,
)

TEXTS = ["what is the climate of oslo", "paris", "the weather of tokyo is well known and tokyo also has a price"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {"bert": make_tiny_bert_dir(root), "llama": make_tiny_llama_dir(root)}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("model, pooling", [("bert", "mean"), ("bert", "cls"), ("llama", "last"), ("llama", "mean")])
def test_encodings_have_shape_and_norm(backbones: dict[str, Path], model: str, pooling: str, normalize: bool) -> None:
    encoder = BiEncoder.build(tiny_encoder_config(backbones[model], pooling=pooling, normalize=normalize), "cpu")
    q = encoder.encode_queries(TEXTS, batch_size=2)
    p = encoder.encode_passages(TEXTS[:2])
    assert q.shape == (3, 32) and p.shape == (2, 32) and q.dtype == np.float32
    norms = np.linalg.norm(q, axis=1)
    if normalize:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.abs(norms - 1.0).max() > 1e-3
    assert encoder.encode_passages([]).shape == (0, 32)


@pytest.mark.parametrize(
    "model, pooling, attention",
    [("bert", "mean", "causal"), ("bert", "cls", "causal"), ("llama", "last", "causal"), ("llama", "mean", "causal"),
     ("llama", "mean", "bidirectional"), ("llama", "last", "bidirectional")],
)
def test_encoding_does_not_depend_on_batch_padding(
    backbones: dict[str, Path], model: str, pooling: str, attention: str
) -> None:
    encoder = BiEncoder.build(tiny_encoder_config(backbones[model], pooling=pooling, attention=attention), "cpu")
    alone = encoder.encode_passages([TEXTS[1]])
    padded = encoder.encode_passages(TEXTS, batch_size=3)[1:2]  # batched with longer texts, so padded
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_last_token_pooling_picks_the_appended_eos(backbones: dict[str, Path]) -> None:
    encoder = BiEncoder.build(tiny_encoder_config(backbones["llama"], pooling="last", normalize=False), "cpu")
    batch = encoder.tokenize_passages(TEXTS)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < batch["input_ids"].shape[1], "the batch must contain padding for this test"
    eos = encoder.tokenizer.eos_token_id
    assert all(batch["input_ids"][i, n - 1] == eos for i, n in enumerate(lengths.tolist()))
    with torch.no_grad():
        hidden = encoder.backbone(**batch).last_hidden_state
        pooled = encoder.encode_passage(batch)
    expected = torch.stack([hidden[i, n - 1] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(pooled, expected)


def test_pooling_handles_left_and_right_padding() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token_pool(hidden, right)[0], hidden[0, 1])
    torch.testing.assert_close(last_token_pool(hidden, left)[0], hidden[0, 3])
    torch.testing.assert_close(first_token_pool(hidden, left)[0], hidden[0, 2])
    torch.testing.assert_close(mean_pool(hidden, left)[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(last_token_pool(hidden, right)[1], hidden[1, 3])


def test_num_layers_keeps_the_first_layers(backbones: dict[str, Path]) -> None:
    encoder = BiEncoder.build(tiny_encoder_config(backbones["llama"], pooling="last", num_layers=1), "cpu")
    full = AutoModel.from_pretrained(backbones["llama"])
    assert len(encoder.backbone.layers) == 1 and encoder.backbone.config.num_hidden_layers == 1
    torch.testing.assert_close(
        encoder.backbone.layers[0].mlp.up_proj.weight, full.layers[0].mlp.up_proj.weight, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="has only 2 layers"):
        BiEncoder.build(tiny_encoder_config(backbones["llama"], num_layers=5), "cpu")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    directory = make_tiny_encoder_dir(tmp_path)
    config = json.loads((directory / "encoder_config.json").read_text())
    assert config["kind"] == "transformer" and not any(tmp_path.glob("*.tmp-*"))
    first, second = load_encoder(directory, device="cpu"), load_encoder(directory, device="cpu")
    assert isinstance(first, BiEncoder) and first.dim == 32 and first.device.type == "cpu"
    np.testing.assert_array_equal(first.encode_queries(TEXTS), second.encode_queries(TEXTS))
    first.save(directory)  # overwriting an existing model directory works and stays loadable
    np.testing.assert_array_equal(load_encoder(directory).encode_queries(TEXTS), second.encode_queries(TEXTS))


def _first_token_states(encoder: BiEncoder, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encoder.backbone(**encoder.tokenize_passages(texts)).last_hidden_state[:, 0]


@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_attention_lets_early_tokens_see_later_ones(backbones: dict[str, Path], padded: bool) -> None:
    # two texts that differ only in their last word; with padded=True a longer third text pads both, so a padding
    # mask is built, without it no mask is built and the kernel's is_causal argument decides
    texts = ["the climate of oslo", "the climate of rome"] + (["a much longer text " * 3] if padded else [])
    causal = BiEncoder.build(tiny_encoder_config(backbones["llama"]), "cpu")
    bidirectional = BiEncoder.build(tiny_encoder_config(backbones["llama"], attention="bidirectional"), "cpu")
    batch = causal.tokenize_passages(texts)
    ids = batch["input_ids"]
    assert ids.shape[1] > 2 and not torch.equal(ids[0], ids[1]), "the texts must differ in a later token"
    assert bool(batch["attention_mask"].eq(0).any()) == padded, "the batch must be padded exactly when asked"
    first = _first_token_states(causal, texts)
    torch.testing.assert_close(first[0], first[1])  # causal: the first token cannot see the last word
    first = _first_token_states(bidirectional, texts)
    assert (first[0] - first[1]).abs().max() > 1e-4
    # the same weights: only the mask differs
    torch.testing.assert_close(
        bidirectional.backbone.layers[0].mlp.up_proj.weight, causal.backbone.layers[0].mlp.up_proj.weight
    )


def test_bidirectional_attention_is_saved_with_the_model(backbones: dict[str, Path], tmp_path: Path) -> None:
    encoder = BiEncoder.build(tiny_encoder_config(backbones["llama"], attention="bidirectional"), "cpu")
    encoder.save(tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc", device="cpu")
    assert loaded.config.attention == "bidirectional"
    assert all(not m.is_causal for m in loaded.backbone.modules() if hasattr(m, "is_causal"))
    np.testing.assert_allclose(loaded.encode_passages(TEXTS), encoder.encode_passages(TEXTS), atol=1e-6)
    causal = BiEncoder.build(tiny_encoder_config(backbones["llama"]), "cpu")
    assert not np.allclose(causal.encode_passages(TEXTS), encoder.encode_passages(TEXTS), atol=1e-4)


def test_prefixes_change_the_encoding(backbones: dict[str, Path]) -> None:
    config = tiny_encoder_config(backbones["bert"], query_prefix="query: ", passage_prefix="passage: ")
    encoder = BiEncoder.build(config, "cpu")
    assert not np.allclose(encoder.encode_queries(TEXTS[:1]), encoder.encode_passages(TEXTS[:1]))


def test_static_encoder_is_the_mean_of_table_rows() -> None:
    tokenizer = train_wordpiece_tokenizer()
    table = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0))
    config = EncoderConfig(model_name_or_path="table", kind="static", normalize=False)
    encoder = StaticEmbeddingEncoder.from_embedding_table(table, tokenizer, config, device="cpu")
    got = encoder.encode_passages(TEXTS)
    for text, row in zip(TEXTS, got, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(row, table[ids].mean(0).numpy(), atol=1e-5)
    normalized = StaticEmbeddingEncoder.from_embedding_table(table, tokenizer, config.replace(normalize=True))
    np.testing.assert_allclose(np.linalg.norm(normalized.encode_queries(TEXTS), axis=1), 1.0, atol=1e-5)
    reduced = StaticEmbeddingEncoder.from_embedding_table(table, tokenizer, config.replace(embed_dim=4))
    assert reduced.dim == 4 and reduced.encode_passages(TEXTS).shape == (3, 4)


def test_static_encoder_builds_from_an_lm_and_round_trips(backbones: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_encoder_config(backbones["llama"], kind="static", learned_token_weights=True)
    encoder = build_encoder(config, device="cpu")
    lm_table = AutoModel.from_pretrained(backbones["llama"]).get_input_embeddings().weight
    torch.testing.assert_close(encoder.embedding.weight, lm_table, rtol=0, atol=0)
    batch = encoder.tokenize_queries(TEXTS)
    encoder.encode_query(batch).sum().backward()
    assert encoder.token_weight is not None and encoder.token_weight.grad is not None
    assert encoder.token_weight.grad.abs().sum() > 0
    loaded = load_encoder(encoder.save(tmp_path / "static"), device="cpu")
    assert isinstance(loaded, StaticEmbeddingEncoder)
    np.testing.assert_array_equal(loaded.encode_passages(TEXTS), encoder.encode_passages(TEXTS))


def test_loss_is_infonce_over_the_passage_layout(backbones: dict[str, Path]) -> None:
    encoder = BiEncoder.build(tiny_encoder_config(backbones["bert"], temperature=0.5), "cpu")
    scores = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.5, 0.0, 4.0, 1.0]])  # 2 queries x [pos, neg] each
    expected = F.cross_entropy(scores / 0.5, torch.tensor([0, 2]))
    torch.testing.assert_close(encoder.loss(scores), expected)
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    exclude[1, 0] = True  # passage 0 is also a positive of query 1: not a negative for it
    masked = F.cross_entropy(torch.tensor([[3.0, 1.0, 0.0, 2.0], [-1e30, 0.0, 4.0, 1.0]]) / 0.5, torch.tensor([0, 2]))
    torch.testing.assert_close(encoder.loss(scores, exclude=exclude), masked)
    with pytest.raises(ValueError, match="multiple"):
        encoder.loss(torch.zeros(2, 3))


def test_configs_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['pooling_mode'\] in dense.toml \[encoder\]"):
        EncoderConfig.from_dict({"model_name_or_path": "x", "pooling_mode": "mean"}, where="dense.toml [encoder]")
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="pooling"):
        EncoderConfig.from_dict({"model_name_or_path": "x", "pooling": "max"})
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": "32"})
    with pytest.raises(ConfigError, match="model_name_or_path"):
        EncoderConfig.from_dict({"pooling": "mean"})
    with pytest.raises(ConfigError, match="attention"):
        EncoderConfig.from_dict({"model_name_or_path": "x", "attention": "full"})
    with pytest.raises(ConfigError, match="transformer"):
        EncoderConfig.from_dict({"model_name_or_path": "x", "kind": "static", "attention": "bidirectional"})
    config = TrainConfig.from_dict({"lr": 1, "max_steps": 10})  # an int where a float is expected is fine
    assert config.lr == 1.0 and TrainConfig.from_dict(config.to_dict()) == config


def test_cpu_bf16_autocasts_on_a_cpu_and_keeps_float32_weights(backbones: dict[str, Path], tmp_path: Path) -> None:
    plain = BiEncoder.build(tiny_encoder_config(backbones["llama"]), "cpu")
    bf16 = BiEncoder.build(tiny_encoder_config(backbones["llama"], cpu_bf16=True), "cpu")
    assert not torch.is_autocast_enabled("cpu")
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with bf16.autocast(enabled=False), plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    want, got = plain.encode_passages(TEXTS), bf16.encode_passages(TEXTS)
    assert got.dtype == np.float32
    # the same weights: close (bf16 keeps ~3 significant digits), not equal
    np.testing.assert_allclose(got, want, atol=0.05)
    assert not np.array_equal(got, want)
    # the flag is saved with the model, so search-time query encoding runs as training did
    bf16.save(tmp_path / "enc")
    assert load_encoder(tmp_path / "enc", device="cpu").config.cpu_bf16
