import random

from transformers import AutoTokenizer

from mergescale.zoo.tasks import ALPHABET, HELD_IN
from mergescale.zoo.tokenizer import EOS, build_tokenizer, save_tokenizer


def test_one_token_per_character_and_round_trip(tmp_path):
    tok = build_tokenizer()
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    texts = [ALPHABET] + [p + a for t in HELD_IN for p, a in t.examples("test", 20)]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        for t in (tok, loaded):
            ids = t(text).input_ids
            assert len(ids) == len(text)
            assert t.decode(ids) == text
    assert loaded.eos_token == EOS and loaded.pad_token_id is not None
    assert loaded.decode(loaded(ALPHABET).input_ids + [loaded.eos_token_id], skip_special_tokens=True) == ALPHABET


def test_batches_are_left_padded(tmp_path):
    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    enc = tok(["up:ab=", "up:abcdef="], padding=True)
    assert enc.input_ids[0][:4] == [tok.pad_token_id] * 4
    assert enc.attention_mask[0] == [0] * 4 + [1] * 6
