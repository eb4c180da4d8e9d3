"""The zoo's character-level tokenizer, saved as ordinary Hugging Face tokenizer files."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mergescale.zoo.tasks import ALPHABET

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; no BOS; ``</s>`` ends an answer; left padding for batched generation."""
    tok = Tokenizer(models.WordLevel(vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(directory: Path) -> None:
    build_tokenizer().save_pretrained(directory)
