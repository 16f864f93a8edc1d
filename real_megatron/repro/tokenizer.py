"""A small tokenizer trained on a task's own text, saved as a HF tokenizer directory.

No model hub is reachable here, so the CPU demo and the tests build their tokenizer from the
synthetic task's text. Choices, and why:

- Byte-level BPE (GPT-2/Qwen style): every string is encodable (no unknown token) and decoding is
  the exact inverse of encoding, so a sampled response decodes back to the very text the reward
  parses (``\\boxed{7}`` with its braces and backslash intact).
- Digits are split one per token before BPE, as Qwen2 does: numbers are then composed digit by
  digit, which a tiny model learns arithmetic with far more easily than arbitrary merged numbers.
- Special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and one per chat role; a minimal chat
  template (``CHAT_TEMPLATE``) so ``encode_prompt`` goes through ``apply_chat_template`` exactly as
  with a real chat model. The template puts BOS itself; ``encode_prompt`` therefore tokenises the
  rendered text without adding special tokens again.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # PAD first: id 0

# Rendered: <|bos|><|user|>3+4=? ...<|assistant|>\boxed{7}<|eos|>  (the response part is the model's)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_task_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 384, *, model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a HF tokenizer dir in ``out_dir``.

    Returns the loaded ``transformers`` fast tokenizer (the same one ``AutoTokenizer.from_pretrained
    (out_dir)`` gives). ``vocab_size`` counts the 256 byte symbols and the special tokens; the
    trainer stops early when the text has no more pairs worth merging, so the real size can be
    smaller. The directory is written to a temporary sibling and renamed into place, so a crash
    never leaves a half-written tokenizer that a later run would pick up.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise ValueError("train_task_tokenizer: no non-empty texts to train on")
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"train_task_tokenizer: vocab_size={vocab_size} is below {minimum} (256 byte symbols + "
                         f"{len(SPECIAL_TOKENS)} special tokens)")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets stay exact for the response/prompt split; nothing else is post-processed
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=list(ROLE_TOKENS), model_max_length=model_max_length,
                                 padding_side="left", clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf.save_pretrained(tmp)
    _ensure_chat_template_saved(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def _ensure_chat_template_saved(directory: Path) -> None:
    """Older/newer transformers store the template in tokenizer_config.json or chat_template.jinja; make sure
    tokenizer_config.json has it, which every version reads."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("chat_template") != CHAT_TEMPLATE:
        config["chat_template"] = CHAT_TEMPLATE
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
