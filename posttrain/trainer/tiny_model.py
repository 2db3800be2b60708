"""Build a tiny, random Llama model with a real tokenizer and chat template, fully offline.

Tests, demos and smoke checks need a model folder that behaves like a Hugging Face checkpoint
(``AutoModelForCausalLM`` / ``AutoTokenizer`` load it, it has a chat template, ``generate`` runs)
but there is no model hub here. So we train a byte-level BPE tokenizer on a small built-in corpus
and save a randomly initialised ``LlamaForCausalLM`` next to it. It learns toy tasks in seconds on
a CPU, which is all the tests need.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"  # noqa: S105 - special tokens, not passwords
EOS_TOKEN = "<|eot_id|>"  # noqa: S105
PAD_TOKEN = "<|pad|>"  # noqa: S105
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, HEADER_START, HEADER_END]

# Llama-3 style: every turn (the assistant's included) ends with <|eot_id|>, which is also the eos
# token, so a rendered assistant turn ends with eos and a trained model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the model", "a bird",
             "the child", "this user", "the assistant", "the system", "a farmer", "the sky", "grass"]
_VERBS = ["sees", "likes", "paints", "answers", "finds", "writes", "reads", "wants", "knows", "has"]
_OBJECTS = ["a red apple", "the blue sea", "green leaves", "a yellow sun", "white snow",
            "the question", "a short story", "the answer", "black coffee", "an orange",
            "purple flowers", "the brown box", "a grey stone", "pink shoes"]
_QUESTIONS = ["What is the colour of {}?", "Where is {}?", "Who has {}?", "Why does {} matter?",
              "How big is {}?", "Can you describe {}?", "Tell me about {}.", "Is {} good?"]
_ANSWERS = ["It is red.", "It is blue.", "It is green.", "Yes, of course.", "No, not really.",
            "I do not know.", "It is here.", "The answer is simple.", "Thank you for asking.",
            "One, two, three, four, five.", "Hello! How can I help you today?"]


def build_corpus(*, seed: int = 0, size: int = 600) -> list[str]:
    """Return a few hundred varied English lines: statements, questions, answers, chat words."""
    rng = random.Random(seed)
    lines = [f"{s} {v} {o}." .capitalize() for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    rng.shuffle(lines)
    lines = lines[: size // 2]
    for _ in range(size // 2):
        question = rng.choice(_QUESTIONS).format(rng.choice(_OBJECTS + _SUBJECTS))
        lines.append(f"user: {question} assistant: {rng.choice(_ANSWERS)}")
    lines += ["system user assistant", "You are a helpful assistant.", "0 1 2 3 4 5 6 7 8 9 10"]
    return lines


def _train_tokenizer(*, vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(build_corpus(seed=seed), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Plain text gets a leading bos, like Llama; chat rendering adds its own and encodes with
    # add_special_tokens=False, as transformers' apply_chat_template does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def create_tiny_model(
    path: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-init fp32 Llama model + BPE tokenizer with a chat template to ``path``.

    ``vocab_size`` is the BPE target (at least the 256 byte symbols plus the special tokens); the
    model's embedding matrix is sized to the tokenizer actually trained. Returns the folder.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size=vocab_size, seed=seed),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
