"""The output vocabulary of merges whose experts' tokenizers differ, against mergekit 0.1.5 run in-process:
``build_vocabulary`` gives mergekit's token -> id map, a linear / task-arithmetic combination of ``input_rows``
gives mergekit's embed_tokens and lm_head, ``write_tokenizer`` writes a tokenizer that encodes as mergekit's."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_merge import mergekit_merge, rel_diff
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from mergescale.errors import SpecError
from mergescale.orchestrator.vocab import build_vocabulary, input_rows, resolve_chat_template, write_tokenizer
from mergescale.zoo.synthetic import qwen2_tensors
from mergescale.zoo.tokenizer import build_tokenizer

SHAPE = {"hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 12, "num_attention_heads": 2,
         "num_key_value_heads": 1}  # fmt: skip
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def write_model(path: Path, seed: int, added=(), special=(), extra_vocab=(), padding_rows=0) -> Path:
    """A random fp32 Qwen2-layout model whose tokenizer is the zoo's with ``extra_vocab`` in its WordLevel
    vocabulary and ``added`` / ``special`` added tokens; its vocabulary tensors have one row per token (plus
    ``padding_rows``)."""
    tok = build_tokenizer()
    if extra_vocab:
        data = json.loads(tok.backend_tokenizer.to_str())
        for t in extra_vocab:
            data["model"]["vocab"][t] = len(data["model"]["vocab"])
        tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.save_pretrained(path)
    cfg = {**SHAPE, "vocab_size": len(tok) + padding_rows}
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=gen) for n, s in qwen2_tensors(cfg).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "float32", **cfg}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> SimpleNamespace:
    """base: zoo + <eot>, two padding rows; a: + <eot> <think> <tool>; b: 'é' in its vocabulary + <tool> <sql>
    and the special <im_end>.  So <think> is a's alone, <tool> the experts' only, <eot> the base's and a's."""
    root = tmp_path_factory.mktemp("vocab")
    return SimpleNamespace(
        base=write_model(root / "base", 1, added=["<eot>"], padding_rows=2),
        a=write_model(root / "a", 2, added=["<eot>", "<think>", "<tool>"]),
        b=write_model(root / "b", 3, added=["<tool>", "<sql>"], special=["<im_end>"], extra_vocab=["é"]),
    )


def mergekit_order(config: dict) -> list[Path]:
    """The models in the order mergekit's union meets them: its referenced_models(), a set's order (the same
    within this process as in the run_merge below)."""
    from mergekit.config import MergeConfiguration

    return [Path(m.model.path) for m in MergeConfiguration.model_validate(config).referenced_models()]


def check(config: dict, out: Path, combine) -> tuple:
    """Run mergekit on ``config``; check our vocabulary's token -> id map and vocabulary tensors against its
    output (``combine(rows: dict[Path, Tensor]) -> Tensor``).  Returns (vocabulary, worst relative difference)."""
    config = {**config, "dtype": "float32"}
    mergekit_merge(config, out)
    block = config.get("tokenizer") or {"source": config["tokenizer_source"]}
    base = Path(config["base_model"]) if config.get("base_model") else None
    vocab = build_vocabulary(
        mergekit_order(config), base, block.get("source", "union"), block.get("tokens"), block.get("pad_to_multiple_of")
    )
    theirs = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert theirs == {t: j for j, t in enumerate(vocab.tokens)}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab.size
    merged = load_file(out / "model.safetensors")
    worst = 0.0
    for name in VOCAB_TENSORS:
        tensors = [load_file(m / "model.safetensors")[name] for m in vocab.models]
        rows = {m: input_rows(vocab, i, tensors)[0] for i, m in enumerate(vocab.models)}
        assert merged[name].shape == (vocab.size, SHAPE["hidden_size"])
        worst = max(worst, rel_diff(combine(rows), merged[name]))
    assert worst <= 1e-5
    return vocab, worst


def linear(weights: dict[Path, float]):
    return lambda rows: sum(w * rows[m] for m, w in weights.items()) / sum(weights.values())


@pytest.mark.parametrize("source", ["union", "base", "b"])
def test_linear_with_base_agrees_with_mergekit(trio, tmp_path, source):
    weights = {trio.base: 0.5, trio.a: 1.0, trio.b: 2.0}
    config = {
        "merge_method": "linear", "base_model": str(trio.base),
        "tokenizer_source": str(trio.b) if source == "b" else source,
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in weights.items()],
    }  # fmt: skip
    vocab, _ = check(config, tmp_path / "mk", linear(weights))
    expected = {"union": ["<eot>", "é", "<think>", "<tool>", "<sql>", "<im_end>"], "base": ["<eot>"]}
    extra = vocab.tokens[67:]
    if source == "b":
        assert extra == ["é", "<tool>", "<sql>", "<im_end>"]
    else:
        assert sorted(extra) == sorted(expected[source]) and extra[:2] == expected[source][:2]
    # the rows each input really has: <think> only in a; <eot> in base and a
    ids = {t: j for j, t in enumerate(vocab.tokens)}
    present = {m: input_rows(vocab, i, [load_file(x / "model.safetensors")[VOCAB_TENSORS[0]] for x in vocab.models])[1]
               for i, m in enumerate(vocab.models)}  # fmt: skip
    if source == "union":
        assert [bool(present[m][ids["<think>"]]) for m in (trio.base, trio.a, trio.b)] == [False, True, False]
        assert [bool(present[m][ids["<eot>"]]) for m in (trio.base, trio.a, trio.b)] == [True, True, False]


def test_task_arithmetic_union_agrees_with_mergekit(trio, tmp_path):
    config = {
        "merge_method": "task_arithmetic", "base_model": str(trio.base), "tokenizer_source": "union",
        "models": [{"model": str(trio.a), "parameters": {"weight": 1.0}},
                   {"model": str(trio.b), "parameters": {"weight": 0.5}}],
    }  # fmt: skip

    def combine(rows):
        return rows[trio.base] + 1.0 * (rows[trio.a] - rows[trio.base]) + 0.5 * (rows[trio.b] - rows[trio.base])

    vocab, _ = check(config, tmp_path / "mk", combine)
    # <tool>: base lacks it, both experts have it -> the base gets their mean
    tool = vocab.tokens.index("<tool>")
    assert len(vocab.fills[tool]) == 2


def test_linear_without_base_agrees_with_mergekit(trio, tmp_path):
    """No base_model: the tokenizer base is the first referenced model, and no base row is preferred (<eot>,
    which base and a have and b lacks, gets their mean in b)."""
    weights = {trio.base: 1.0, trio.a: 1.0, trio.b: 1.0}
    config = {
        "merge_method": "linear", "tokenizer_source": "union",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in weights.items()],
    }  # fmt: skip
    vocab, _ = check(config, tmp_path / "mk", linear(weights))
    assert len(vocab.fills[vocab.tokens.index("<eot>")]) == 2


def test_tokenizer_block_agrees_with_mergekit(trio, tmp_path):
    """Per-token sources (zero, another token's row, a forced model row), a new token, padding, a chat template."""
    weights = {trio.base: 0.5, trio.a: 1.0, trio.b: 2.0}
    tokens = {
        "<think>": {"source": {"kind": "zero"}},
        "<new>": {"source": {"kind": "model_token", "model": str(trio.a), "token": "<tool>"}},
        "<sql>": {"source": str(trio.b), "force": True},
        "a": {"source": {"kind": "model_token", "model": str(trio.b), "token_id": 5}, "force": True},
    }
    config = {
        "merge_method": "linear", "base_model": str(trio.base), "chat_template": TEMPLATE,
        "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 16},
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in weights.items()],
    }  # fmt: skip
    vocab, _ = check(config, tmp_path / "mk", linear(weights))
    assert vocab.tokens[-1] == "<new>" and vocab.size == 80
    mine = tmp_path / "mine"
    write_tokenizer(vocab, mine, chat_template=resolve_chat_template(TEMPLATE, vocab.models))
    chat = [{"role": "user", "content": "ab"}]
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path / "mk"), AutoTokenizer.from_pretrained(mine)
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    assert ours("ab<new>c<think>")["input_ids"] == theirs("ab<new>c<think>")["input_ids"]


@pytest.mark.parametrize("source", ["union", "base", "b"])
def test_written_tokenizer_encodes_as_mergekits(trio, tmp_path, source):
    """Our tokenizer files load with AutoTokenizer (alone, and beside the merged config.json) and encode as
    mergekit's output tokenizer does; the added tokens keep their flags (<im_end> special)."""
    config = {
        "merge_method": "linear", "base_model": str(trio.base), "dtype": "float32",
        "tokenizer_source": str(trio.b) if source == "b" else source,
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (trio.base, trio.a, trio.b)],
    }  # fmt: skip
    mergekit_merge(config, tmp_path / "mk")
    vocab = build_vocabulary(mergekit_order(config), trio.base, config["tokenizer_source"])
    write_tokenizer(vocab, tmp_path / "mine")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "mk")
    beside = tmp_path / "beside"
    write_tokenizer(vocab, beside)
    (beside / "config.json").write_text((tmp_path / "mk" / "config.json").read_text())
    texts = ["ab<think>c", "xy<tool>z<sql>:=<im_end>", "<eot>q"]
    known = [t for t in texts if all(w in vocab.tokens for w in re.findall(r"<[^>]*>|.", t))]
    assert len(known) == {"union": 3, "base": 1, "b": 1}[source]
    for ours, cases in ((AutoTokenizer.from_pretrained(tmp_path / "mine"), known), (beside_tok(beside), texts)):
        for text in cases:
            assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.get_vocab() == theirs.get_vocab()
    if source == "base":  # '<' is no token: our WordLevel says <unk>, transformers 5's Qwen2Tokenizer drops it
        assert AutoTokenizer.from_pretrained(tmp_path / "mine")("a<")["input_ids"] == [3, 2]
        assert theirs("a<")["input_ids"] == [3]
    added = Tokenizer.from_file(str(tmp_path / "mine" / "tokenizer.json")).get_added_tokens_decoder()
    flags = {t.content: t.special for t in added.values()}
    if source != "base":
        assert flags["<im_end>"] and not flags["<tool>"]


def beside_tok(path: Path):
    """Loaded beside a qwen2 config.json, transformers 5 rebuilds the tokenizer as a Qwen2Tokenizer (byte-level
    BPE with the same vocabulary), exactly as it does mergekit's inputs and output."""
    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    return tok


def test_chat_template_auto_and_errors(trio, tmp_path):
    assert resolve_chat_template(None, [trio.a]) is None
    assert resolve_chat_template("auto", [trio.a, trio.b]) is None  # the zoo's tokenizers have none
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "chat_template.jinja").write_text(TEMPLATE + "\n")
    assert resolve_chat_template("auto", [trio.a, tmp_path / "m"]) == TEMPLATE
    assert "im_start" in resolve_chat_template("chatml", [])
    with pytest.raises(SpecError, match="chat_template"):
        resolve_chat_template("nosuchname", [])


def test_errors_name_the_key(trio, tmp_path):
    models = [trio.a, trio.b]
    with pytest.raises(SpecError, match="tokenizer_source"):
        build_vocabulary(models, trio.base, str(tmp_path / "missing"))
    with pytest.raises(SpecError, match=r"tokenizer\.tokens\.<x>\.source"):
        build_vocabulary(models, trio.base, "union", {"<x>": {"force": False}})
    with pytest.raises(SpecError, match="not one of the merged models"):
        build_vocabulary(models, trio.base, "union", {"<x>": {"source": str(tmp_path)}})
    with pytest.raises(SpecError, match="lacks '<think>'"):
        build_vocabulary(models, trio.base, "union", {"<think>": {"source": str(trio.b)}})
    with pytest.raises(SpecError, match="has no token"):
        build_vocabulary(models, trio.base, "union", {"<x>": {"source": {"kind": "model_token", "model": str(trio.a),
                                                                         "token": "<sql>"}}})  # fmt: skip


def shrink(model: Path, rows: int) -> None:
    """Cut the model's vocabulary tensors and config.json's vocab_size to ``rows`` (its last tokens out of range)."""
    config = json.loads((model / "config.json").read_text())
    tensors = load_file(model / "model.safetensors")
    tensors = {k: v[:rows].clone() if k in VOCAB_TENSORS else v for k, v in tensors.items()}
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))


def test_tokens_beyond_vocab_size(tmp_path):
    """A base token of id >= vocab_size is stripped (mergekit strips BPE tokenizers only; under transformers 5 it
    loads the zoo's WordLevel tokenizer as a BPE Qwen2Tokenizer, so it strips it); an expert's such token is left
    out of the union, and an input whose token is out of its range lacks it (where mergekit fails: KeyError)."""
    base = write_model(tmp_path / "base", 1, added=["<x>"])
    a = write_model(tmp_path / "a", 2, added=["<think>", "<tool>"])
    shrink(base, 67)
    shrink(a, 68)  # <tool> (id 68) out of a's range
    weights = {base: 1.0, a: 3.0}
    config = {
        "merge_method": "linear", "base_model": str(base), "tokenizer_source": "union",
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in weights.items()],
    }  # fmt: skip
    vocab, _ = check(config, tmp_path / "mk", linear(weights))
    assert vocab.tokens[66:] == ["=", "<think>"]
    write_tokenizer(vocab, tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.get_vocab(with_added_tokens=True) == {t: j for j, t in enumerate(vocab.tokens)}
    b = write_model(tmp_path / "b", 3, added=["<think>", "<tool>"])
    vocab = build_vocabulary([base, a, b], base, "union")
    tool = vocab.tokens.index("<tool>")
    assert [s[tool] for s in vocab.sources] == [-1, -1, 68] and vocab.fills[tool] == ((2, 68),)
    config["models"].append({"model": str(b), "parameters": {"weight": 1.0}})
    with pytest.raises(KeyError):
        mergekit_merge({**config, "dtype": "float32"}, tmp_path / "mk2")


# ------------------------------------------------------------------ a whole merge on the zoo


def with_added_tokens(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """A copy of a zoo model whose tokenizer adds ``tokens``, with a new embed_tokens / lm_head row for each."""
    shutil.copytree(src, dst)
    tok = build_tokenizer()
    tok.add_tokens(tokens)
    tok.save_pretrained(dst)
    tensors = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        t = tensors[name]
        tensors[name] = torch.cat([t, 0.02 * torch.randn((len(tokens), *t.shape[1:]), generator=gen)])
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": len(tok)}))
    return dst


def merge_both(config: dict, tmp_path: Path) -> tuple[dict, dict]:
    """``config`` (mergekit YAML) merged by mergekit and by `mergescale merge`; asserts the same tokens and, token
    by token, the same tensors (within 1e-4 relative).  Returns (our token ids, mergekit's)."""
    from mergescale.checkpoints import ModelDir
    from mergescale.orchestrator.merge import run_merge
    from mergescale.specs import load_merge_spec

    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    mergekit_merge(config, tmp_path / "mergekit")
    run_merge(load_merge_spec(tmp_path / "merge.yaml"), tmp_path / "ours", progress=False)
    ours_ids = Tokenizer.from_file(str(tmp_path / "ours" / "tokenizer.json")).get_vocab(with_added_tokens=True)
    their_ids = Tokenizer.from_file(str(tmp_path / "mergekit" / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert set(ours_ids) == set(their_ids) and len(ours_ids) == 70
    order = [their_ids[t] for t in sorted(ours_ids, key=ours_ids.get)]  # mergekit's rows in our token order
    ours, theirs = ModelDir(tmp_path / "ours"), load_file(tmp_path / "mergekit" / "model.safetensors")
    assert sorted(ours.names) == sorted(theirs)
    for name in ours.names:
        y = theirs[name][order] if name in VOCAB_TENSORS else theirs[name]
        assert rel_diff(ours.tensor(name), y) <= 1e-4, name
    for out in ("ours", "mergekit"):
        assert json.loads((tmp_path / out / "config.json").read_text())["vocab_size"] == 70
    return ours_ids, their_ids


@pytest.mark.zoo
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_zoo_experts_with_added_tokens_merge_as_mergekit_token_by_token(method, tiny_zoo, tmp_path):
    """Two zoo experts whose tokenizers add different tokens, merged by `mergescale merge` from an unmodified
    mergekit YAML with `tokenizer_source: union` and a chat template: mergekit's tensors token by token (its
    ids of the experts' added tokens follow a set's hash order, which changes from process to process; ours
    are base first, then the experts in the order listed), a tokenizer that encodes the added tokens, a model
    transformers runs, and the original tokens' rows those of a merge without the new tokens."""
    from transformers import AutoModelForCausalLM

    from mergescale.checkpoints import ModelDir
    from mergescale.orchestrator.merge import run_merge
    from mergescale.specs import load_merge_spec

    a = with_added_tokens(tiny_zoo.experts["upper"], tmp_path / "a", ["<think>", "<tool>"], 1)
    b = with_added_tokens(tiny_zoo.experts["rot13"], tmp_path / "b", ["<tool>", "<sql>"], 2)
    config = {
        "merge_method": method, "base_model": str(tiny_zoo.base), "tokenizer_source": "union",
        "chat_template": TEMPLATE, "dtype": "float32",
        "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 0.7}}],
    }  # fmt: skip
    if method == "linear":  # the base averaged in; it lacks <tool>, which both experts have: its row is their mean
        config["models"].insert(0, {"model": str(tiny_zoo.base), "parameters": {"weight": 0.5}})
    ours_ids, their_ids = merge_both(config, tmp_path)
    assert [t for t, _ in sorted(ours_ids.items(), key=lambda x: x[1])][67:] == ["<think>", "<tool>", "<sql>"]
    assert all(ours_ids[t] == their_ids[t] for t in ours_ids if ours_ids[t] < 67)
    ours = ModelDir(tmp_path / "ours")
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == TEMPLATE

    tok = AutoTokenizer.from_pretrained(tmp_path / "ours")
    ids = tok("ab<think>c<sql>")["input_ids"]
    assert ours_ids["<think>"] in ids and ours_ids["<sql>"] in ids and len(ids) == 5
    logits = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")(torch.tensor([ids])).logits
    assert logits.shape == (1, 5, 70) and bool(torch.isfinite(logits).all())

    plain = {**config, "tokenizer_source": None, "chat_template": None}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({k: v for k, v in plain.items() if v is not None}))
    run_merge(load_merge_spec(tmp_path / "plain.yaml"), tmp_path / "plain", progress=False)
    for name in VOCAB_TENSORS:  # every input has the 67 original tokens: their rows are the plain merge's
        assert torch.equal(ours.tensor(name)[:67], ModelDir(tmp_path / "plain").tensor(name)[:67])


@pytest.mark.zoo
@pytest.mark.parametrize("method", ["passthrough", "task_arithmetic"])
def test_a_stack_with_a_merged_vocabulary_agrees_with_mergekit(method, tiny_zoo, tmp_path):
    """`slices:` with `tokenizer_source: union`: one vocabulary over every model of the stack; the embeddings
    permuted from the first slice's sources only, lm_head from the last's (a token none of them has: zeros).
    A stack as deep as its sources, so that mergekit's own config (the template's layer_types) is valid and it
    writes its tokenizer."""
    from mergescale.checkpoints import ModelDir

    base = str(tiny_zoo.base)
    a = str(with_added_tokens(tiny_zoo.experts["upper"], tmp_path / "a", ["<think>", "<tool>"], 1))
    b = str(with_added_tokens(tiny_zoo.experts["rot13"], tmp_path / "b", ["<tool>", "<sql>"], 2))
    if method == "passthrough":
        slices = [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                  {"sources": [{"model": b, "layer_range": [2, 4]}]}]  # fmt: skip
    else:
        slices = [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]}]},
                  {"sources": [{"model": base, "layer_range": [2, 4]},
                               {"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.5}}]}]  # fmt: skip
    config = {"merge_method": method, "base_model": base, "tokenizer_source": "union", "dtype": "float32",
              "slices": slices, **({"parameters": {"weight": 1.0}} if method != "passthrough" else {})}  # fmt: skip
    ours_ids, _ = merge_both(config, tmp_path)
    ours = ModelDir(tmp_path / "ours")
    if method == "passthrough":  # <sql> is b's alone: the embeddings (from a) have zeros there, lm_head b's row
        sql = ours_ids["<sql>"]
        assert not ours.tensor("model.embed_tokens.weight")[sql].any()
        their_head = load_file(Path(b) / "model.safetensors")["lm_head.weight"]
        assert torch.equal(ours.tensor("lm_head.weight")[sql], their_head[68])
