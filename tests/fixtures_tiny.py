"""A tiny random Llama model folder shared by the trainer tests (built once per test session)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(tmp_path_factory) -> Path:
    """Build (or reuse, within this pytest session) a tiny model + tokenizer folder.

    Built under a temporary name and renamed, so a half-written folder is never reused.
    """
    from posttrain.trainer.tiny_model import create_tiny_model

    return _built_once(tmp_path_factory, "tiny-llama", create_tiny_model)


def _built_once(tmp_path_factory, name: str, create) -> Path:
    """``create(folder)`` once per pytest session, under a temporary name renamed into place."""
    path = tmp_path_factory.getbasetemp() / name
    if not path.exists():
        staging = tmp_path_factory.mktemp(f"{name}-build")
        create(staging / "model")
        (staging / "model").rename(path)
    return path


GPT2_EOS = "<|endoftext|>"


def create_tiny_gpt2(path: Path, *, vocab_size: int = 384, seed: int = 0) -> Path:
    """A random-init GPT-2 (``Conv1D`` ``c_attn``/``c_proj`` layers, ``model_type`` gpt2) with a
    byte-level BPE tokenizer trained offline on the tiny Llama's corpus, shaped like distilgpt2's:
    one special token, ``<|endoftext|>``, as bos and eos, no pad token and no chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from posttrain.trainer.tiny_model import build_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(build_corpus(seed=seed), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[GPT2_EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                                        model_max_length=256, clean_up_tokenization_spaces=False)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_gpt2(tmp_path_factory) -> Path:
    """Build (or reuse, within this pytest session) a tiny GPT-2 model + tokenizer folder."""
    return _built_once(tmp_path_factory, "tiny-gpt2", create_tiny_gpt2)
