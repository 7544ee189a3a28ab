"""Instruction tokenizers.

A real tokenizer is loaded with ``AutoTokenizer.from_pretrained(path_or_id)``. For the default tiny
models the project ships its own word-level tokenizer (``vla_ray/assets/tokenizer``), trained with
the ``tokenizers`` library on the task vocabulary, so nothing is downloaded at run time.

Regenerate the shipped tokenizer with ``python -m vla_ray.tokenizer``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<image>"]

# Words of every task the project ships: LangReach, PushT, locomotion, driving, and the synthetic
# VLM captions/questions. Unknown words map to [UNK], so paraphrases outside it still encode.
TASK_CORPUS = [
    "reach the red target",
    "go to the green ball",
    "move to the blue goal",
    "touch the yellow one",
    "navigate to the purple marker",
    "put the gripper on the orange object",
    "head for the cyan dot",
    "get to the white sphere",
    "drive the arm towards the black point",
    "please move over to that target",
    "push the t onto the target",
    "run forward as fast as you can",
    "walk forward without falling",
    "hop forward",
    "stand up",
    "keep the lane and avoid collisions",
    "drive safely and follow the route",
    "turn left turn right stop",
    "a red circle at the top left of the image",
    "a green square at the bottom right",
    "a blue triangle in the center",
    "what color is the shape on the left ?",
    "where is the red shape ? it is on the right .",
    "how many shapes are there ? there are two three four",
    "describe the image in one sentence",
    "yes no there is a small big large tiny",
    "above below next near far between corner middle side upper lower",
    "picture photo scene shows contains with and of on in is are",
]


def default_corpus() -> list[str]:
    """The task sentences plus every sentence shape of the synthetic VLM data
    (``vla_ray.pretrain.data``: captions and questions about LangReach scenes)."""
    from vla_ray.pretrain.data import vlm_corpus

    return TASK_CORPUS + vlm_corpus()


def build_task_tokenizer(corpus: list[str] | None = None):
    """Train a lower-cased word-level tokenizer on ``corpus`` and wrap it for ``transformers``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        additional_special_tokens=["<image>"],
        padding_side="right",
        truncation_side="right",
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(path_or_id: str | None = None):
    """Load a tokenizer: the shipped task tokenizer when ``path_or_id`` is None, else AutoTokenizer."""
    from transformers import AutoTokenizer

    src = str(DEFAULT_TOKENIZER_DIR) if path_or_id is None else str(path_or_id)
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def encode_instructions(
    texts: list[str], max_length: int, tokenizer=None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int64) and attention mask (int64), each ``(len(texts), max_length)``, right-padded.

    Instructions longer than ``max_length`` tokens are truncated.
    """
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    enc = tok(
        list(texts),
        max_length=max_length,
        padding="max_length",
        truncation=True,
        add_special_tokens=False,
        return_attention_mask=True,
    )
    return (
        np.asarray(enc["input_ids"], dtype=np.int64),
        np.asarray(enc["attention_mask"], dtype=np.int64),
    )


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)`` without the padding and truncation that an
    earlier padded call (e.g. :func:`encode_instructions`) left on a fast tokenizer's backend:
    a saved ``tokenizer.json`` must encode an instruction as itself, not padded to the last
    call's length. The tokenizer's own state is left as it was."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        tokenizer.save_pretrained(str(directory))
        return
    padding, truncation = backend.padding, backend.truncation
    backend.no_padding()
    backend.no_truncation()
    try:
        tokenizer.save_pretrained(str(directory))
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


if __name__ == "__main__":
    build_task_tokenizer().save_pretrained(str(DEFAULT_TOKENIZER_DIR))
    print(f"wrote {DEFAULT_TOKENIZER_DIR}")
