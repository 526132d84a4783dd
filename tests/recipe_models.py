"""Tiny random stand-ins for the A10G recipe's models, same architectures, saved as local directories in seconds:
``tiny_bert`` for bert-base-uncased (the dense encoder), ``tiny_chat_lm`` for SmolLM2-Instruct (query generation and
query-likelihood reranking). Used by tests/test_full_recipe.py and tests/test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (  # SmolLM2-Instruct's turn markers
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bf16_available() -> bool:
    """A CUDA device with bf16 (what the recipe's ``dense.train.bf16 = true`` needs)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def tiny_bert(texts: list[str], out: Path) -> Path:
    """bert-base-uncased's architecture and tokenizer kind (lowercasing WordPiece, 512 positions), 2 x 32 wide."""
    import torch
    from dense_fixtures import train_wordpiece_tokenizer
    from transformers import BertConfig, BertModel

    tokenizer = train_wordpiece_tokenizer(texts)
    tokenizer.model_max_length = 512
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_chat_lm(texts: list[str], out: Path) -> Path:
    """A random 1-layer Llama with a byte-level BPE tokenizer and SmolLM2's chat turns (for generation and QL)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*texts, "user assistant system Passage Query :\n"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
