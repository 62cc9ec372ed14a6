"""Shared test fixtures: offline environment, a tiny chat model built in-process, the ../shared folder.

Everything here is built from code (no hub downloads) so the suite runs offline in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

# Set before transformers/datasets/evaluate are imported anywhere in the test session: they read these
# once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NLTK_DATA is left as the user has it: IFEval's punkt_tab ships with the package, so tests see what a
# new user sees.
_SHARED = Path(__file__).resolve().parents[2] / "shared"

import pytest  # noqa: E402

# The tiny model's chat template. `{% generation %}` marks assistant content so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` works for SFT-style masking.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _tiny_corpus() -> list[str]:
    """A few hundred short, varied strings: enough for a byte-level BPE with real merges."""
    subjects = ["the cat", "a dog", "my friend", "the capital", "an apple", "the answer", "our team", "Paris"]
    verbs = ["is", "was", "likes", "sees", "has", "makes", "writes", "finds"]
    objects = ["red", "blue", "a list", "three words", "the end", "JSON", "no commas", "France", "42"]
    corpus = [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    corpus += [f"What is {a} plus {b}? It is {a + b}." for a in range(6) for b in range(6)]
    corpus += ["Write a short poem.", "Answer in lowercase letters only.", "Do not use any commas."]
    return corpus


def build_tiny_lm(seed: int = 0):
    """(model, tokenizer): byte-level BPE (~300 tokens) + random 2-layer Llama, hidden 32. < 2 s on CPU."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def write_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A minimal PDF with one text line per item, one list per page (Helvetica; no PDF library needed)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]  # the page tree is filled in once the pages are known
    font = 3 + 2 * len(pages)
    kids = []
    for lines in pages:
        text = " 0 -16 Td ".join("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj"
                                  for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td {text} ET".encode("latin-1")
        kids.append(f"{len(objects) + 1} 0 R")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects) + 2} 0 R "
                       f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="session")
def tiny_lm():
    """Session-scoped (model, tokenizer). Tests must not train it in place; copy.deepcopy(model) to mutate."""
    return build_tiny_lm()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder next to the repo (official IFEval file, NLTK data); skip when absent."""
    if not _SHARED.is_dir():
        pytest.skip(f"{_SHARED} not present (optional shared data)")
    return _SHARED


def free_port() -> int:
    """A free TCP port on the loopback address, for a launcher's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
