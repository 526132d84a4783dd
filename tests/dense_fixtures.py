"""Tiny dense models for tests: BERT-style and Llama-style backbones with tokenizers trained here, no downloads.

Other test modules may import ``make_tiny_encoder_dir`` to get a saved bi-encoder that ``dense.encoder.load_encoder``
opens in well under a second.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from dense.config import EncoderConfig
from dense.encoder import BiEncoder
from dense.training_data import TrainingRecord

SUBJECTS = [
    "paris", "london", "tokyo", "berlin", "madrid", "rome", "cairo", "lima", "oslo", "dublin", "vienna", "prague",
    "salmon", "tiger", "eagle", "maple", "copper", "violin", "tennis", "coffee", "glacier", "desert", "volcano",
    "comet",
]
ATTRIBUTES = [
    "population", "history", "climate", "weather", "price", "size", "color", "origin", "age", "speed", "weight", "food",
]


def toy_pairs() -> list[tuple[str, str]]:
    """(query, passage) pairs whose passage repeats the query's words, so a tiny model can learn to match them."""
    pairs = []
    for i, subject in enumerate(SUBJECTS):
        attribute = ATTRIBUTES[i % len(ATTRIBUTES)]
        other = ATTRIBUTES[(i * 5 + 3) % len(ATTRIBUTES)]
        query = f"what is the {attribute} of {subject}"
        passage = f"the {attribute} of {subject} is well known and {subject} also has a {other} worth reading about"
        pairs.append((query, passage))
    return pairs


def toy_records_and_passages() -> tuple[list[TrainingRecord], dict[str, str]]:
    """Training records over ``toy_pairs`` (3 hard negatives each) and their ``{pid: text}``."""
    pairs = toy_pairs()
    passages = {f"p{i}": passage for i, (_, passage) in enumerate(pairs)}
    records = [
        TrainingRecord(f"q{i}", query, (f"p{i}",), tuple(f"p{(i + k) % len(pairs)}" for k in (1, 2, 3)), "toy")
        for i, (query, _) in enumerate(pairs)
    ]
    return records, passages


def toy_teacher_groups(n: int = 6, size: int = 5, shift: int = 0):
    """Teacher groups over the toy passages: query i's teacher strongly prefers passage p{i + shift} (with shift 0
    its true match), then the next ones in order."""
    from dense.teacher_data import TeacherGroup

    records, passages = toy_records_and_passages()
    groups = []
    for i in range(n):
        pids = [f"p{(i + shift + k) % len(passages)}" for k in range(size)]
        scores = [-1.0 if k == 0 else -3.0 - 0.1 * k for k in range(size)]
        groups.append(TeacherGroup(f"t{i}", records[i].query, tuple(pids), tuple(scores), 4))
    return groups


def toy_corpus() -> list[str]:
    return [text for pair in toy_pairs() for text in pair] + ["a short text", "another one"]


def train_wordpiece_tokenizer(texts: list[str] | None = None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], [PAD] = 0) built from ``texts``.

    The vocabulary is built here, not by ``WordPieceTrainer``: the trainer breaks frequency ties in hash order, so
    its vocabulary (and every tiny model on it) changed from one process to the next and made tests flaky. Here it
    is the special tokens, every character (alone and as a ``##`` continuation), then the most frequent words,
    ties broken alphabetically: the same vocabulary in every run."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts or toy_corpus():
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for word in counts for c in word})
    tokens = specials + chars + ["##" + c for c in chars]
    taken = set(tokens)
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in taken]
    tokens += words[: max(0, vocab_size - len(tokens))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )


def train_bpe_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A decoder-style byte-level BPE tokenizer with an EOS token and no pad token (like most LLMs)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts or toy_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", model_max_length=64)


def make_tiny_bert_dir(tmp_path: Path, seed: int = 0, dropout: float = 0.1, init_std: float = 0.02) -> Path:
    """A plain HF directory with a 2-layer, 32-wide BERT (random weights) and its tokenizer.

    ``dropout`` (BERT's default 0.1) is both the hidden and the attention dropout; 0 makes training steps
    independent of the RNG (for comparisons across process layouts, which draw dropout masks differently).
    ``init_std`` is BERT's initializer range: at the default 0.02 a random 32-wide model maps every input to nearly
    the same [CLS] vector, which a score head on it cannot tell apart until many steps have passed."""
    out = Path(tmp_path) / "tiny-bert"
    tokenizer = train_wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, initializer_range=init_std,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_llama_dir(tmp_path: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """A plain HF directory with a tiny Llama decoder (random weights) and a BPE tokenizer with EOS."""
    out = Path(tmp_path) / "tiny-llama"
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
    )
    LlamaModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_encoder_config(model_dir: Path, **changes: object) -> EncoderConfig:
    """An ``EncoderConfig`` for the tiny backbones: short lengths, mean pooling, a high-ish temperature."""
    base = {"model_name_or_path": str(model_dir), "query_max_len": 16, "passage_max_len": 32, "temperature": 0.1}
    return EncoderConfig.from_dict({**base, **changes})


def make_tiny_encoder_dir(tmp_path: Path) -> Path:
    """Build and save a tiny BERT-style bi-encoder (mean pooling, normalised); return its directory."""
    backbone = make_tiny_bert_dir(tmp_path)
    out = Path(tmp_path) / "tiny-encoder"
    BiEncoder.build(tiny_encoder_config(backbone), device="cpu").save(out)
    return out
