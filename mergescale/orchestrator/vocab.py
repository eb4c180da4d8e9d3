"""The output vocabulary of a merge whose inputs' tokenizers differ: mergekit 0.1.5's ``tokenizer_source:
base | union | <model>`` and ``tokenizer:`` block (``docs/ALGORITHMS.md#merged-vocabularies`` states the rules).

Planning only: which token has which id, which row of which input each output row comes from, and the
merged tokenizer's files.  Tokenizers are read from ``tokenizer.json`` with the ``tokenizers`` library
(``AutoTokenizer``'s conversion only where a model has no ``tokenizer.json``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from mergescale.errors import ModelError, SpecError

LOG = logging.getLogger(__name__)
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_PLAIN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Vocabulary:
    """The merge's output vocabulary and, per input, where its rows come from."""

    models: list[Path]  # the inputs, in the order their tensors are given to ``input_rows``
    tokens: list[str]  # output tokens in id order
    sources: list[list[int]]  # per input, its row of each output token; -1 where it lacks the token
    fills: dict[int, tuple[tuple[int, int], ...]]  # id -> the (input, row) pairs whose mean is the fill; () = 0
    forced: frozenset[int]  # ids whose fill replaces every input's row (``force: true``)
    size: int  # rows of the output tensors (the token count rounded up to ``pad_to_multiple_of``)
    template: Path  # the model whose tokenizer files the output's are made from
    template_count: int  # ids below this are the template's own tokens
    added: list[dict]  # tokenizer.json ``added_tokens`` entries of ids template_count..len(tokens)-1


@dataclass
class _Tok:
    path: Path
    data: dict  # tokenizer.json, parsed
    vocab: dict[str, int]
    added: dict[int, dict]  # id -> tokenizer.json added_tokens entry
    rows: int  # vocab_size from config.json (the rows of the vocabulary tensors)


def _rows(path: Path, fallback: int) -> int:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return fallback
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) and size > 0 else fallback


def _load(path: Path) -> _Tok | None:
    """A model's tokenizer (None when it has none that loads)."""
    file = path / "tokenizer.json"
    if not path.is_dir():
        return None
    try:
        if file.is_file():
            text = file.read_text()
        else:
            from transformers import AutoTokenizer

            text = AutoTokenizer.from_pretrained(path, use_fast=True).backend_tokenizer.to_str()
        tok = Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - any tokenizer that does not load counts as absent, as in mergekit
        LOG.warning("%s: no tokenizer loads (%s)", path, e)
        return None
    vocab, data = tok.get_vocab(with_added_tokens=True), json.loads(text)
    added = {e["id"]: e for e in data.get("added_tokens", [])}
    return _Tok(path, data, vocab, added, _rows(path, len(vocab)))


def _strip(tok: _Tok) -> _Tok:
    """The tokenizer without its tokens of id >= vocab_size (mergekit strips the base's)."""
    cut = tok.rows
    dropped = {t for t, i in tok.vocab.items() if i >= cut}
    if not dropped:
        return tok
    data = json.loads(json.dumps(tok.data))
    model = data["model"]
    if model.get("type") not in ("BPE", "WordLevel", "WordPiece"):
        raise ModelError(
            f"{tok.path}/tokenizer.json: {len(dropped)} tokens have ids >= vocab_size {cut} (config.json) and a "
            f"{model.get('type')} tokenizer cannot drop them; set vocab_size to the tokenizer's size"
        )
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < cut}
    if "merges" in model:
        model["merges"] = [m for m in model["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & dropped]
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < cut]
    text = json.dumps(data)
    vocab = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    return _Tok(tok.path, data, vocab, {e["id"]: e for e in data["added_tokens"]}, cut)


def _in_order(tok: _Tok) -> list[str]:
    tokens = sorted(tok.vocab, key=tok.vocab.__getitem__)
    if [tok.vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ModelError(f"{tok.path}/tokenizer.json: token ids are not 0..{len(tokens) - 1}; re-save the tokenizer")
    return tokens


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _index(models: list[Path], model: object, key: str) -> int:
    for i, m in enumerate(models):
        if isinstance(model, str | Path) and _same(m, Path(model)):
            return i
    raise SpecError(f"{key}: {model!r} is not one of the merged models; name one of {[str(m) for m in models]}")


def build_vocabulary(
    models: list[Path],
    base: Path | None,
    source: str,
    tokens: dict | None = None,
    pad_to_multiple_of: int | None = None,
    inputs: tuple[list[Path], Path | None] | None = None,
) -> Vocabulary:
    """The output vocabulary for ``source`` (``"base"``, ``"union"`` or a model directory) over ``models`` (every
    input, in tensor order; a ``base`` not among them is appended).  ``tokens`` is mergekit's ``tokenizer.tokens``
    mapping: ``{token: {"source": <model path> | {"kind": "zero"} | {"kind": "model_token", "model": <path>,
    "token": str} | {... "token_id": int}, "force": bool}}``.  ``inputs``: (the models of the tensors to permute,
    their base) where these are not all of ``models`` — a slice of a stack, whose embeddings are merged from its
    own sources only: the output's tokens come from every model, the rows and fills from these inputs."""
    models = [Path(m) for m in models]
    if base is not None and not any(_same(base, m) for m in models):
        models.append(Path(base))
    if not models:
        raise SpecError("models: no model to build a vocabulary from; name at least one")
    head = models[_index(models, base, "base_model")] if base is not None else models[0]
    order = [head] + [m for m in models if not _same(m, head)]  # base first: the union's order
    loaded = {m: _load(m) for m in order}
    if loaded[head] is None:
        raise ModelError(f"{head}: no tokenizer (tokenizer.json or tokenizer.model); add the base's tokenizer files")
    loaded[head] = _strip(loaded[head])
    for m in order:
        if loaded[m] is None:
            LOG.warning("%s: assuming the tokenizer of %s", m, head)
            loaded[m] = _Tok(m, loaded[head].data, loaded[head].vocab, loaded[head].added, _rows(m, loaded[head].rows))

    if source in ("base", "union"):
        template = loaded[head]
    else:
        template = _load(Path(source)) if Path(source).is_dir() else None  # unstripped, even when it is the base
        if template is None:
            raise SpecError(
                f"tokenizer_source: {source!r} is neither base, union nor a model directory with a tokenizer; "
                "fix the path"
            )
    out = _in_order(template)
    known = set(out)
    added: list[dict] = []
    if source == "union":
        plain: dict[str, None] = {}  # model-vocabulary tokens, in first-met order
        added_as: dict[str, dict] = {}  # added tokens, with the settings of the first model that adds them
        for m in order:
            tok = loaded[m]
            for t in sorted(tok.vocab, key=tok.vocab.__getitem__):
                i = tok.vocab[t]
                if i >= tok.rows:
                    continue
                if i in tok.added:
                    added_as.setdefault(t, tok.added[i])
                else:
                    plain.setdefault(t)
        extra = [(t, _PLAIN) for t in plain if t not in added_as and t not in known]
        extra += [(t, e) for t, e in added_as.items() if t not in known]
        for t, e in extra:
            added.append({"content": t, **{k: bool(e.get(k, _PLAIN[k])) for k in _FLAGS}})
            out.append(t)
            known.add(t)
    tokens = dict(tokens or {})
    for t in tokens:
        if t not in known:
            added.append({"content": t, **_PLAIN})
            out.append(t)
            known.add(t)

    if inputs is not None:
        models, base = [Path(m) for m in inputs[0]], inputs[1]
    sources = []
    for m in models:
        tok = loaded[next(o for o in order if _same(o, m))]
        sources.append([tok.vocab[t] if tok.vocab.get(t, tok.rows) < tok.rows else -1 for t in out])
    fills, forced = _fills(models, base, loaded, order, out, sources, tokens)
    size = len(out)
    if pad_to_multiple_of:
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise SpecError(f"tokenizer.pad_to_multiple_of: {pad_to_multiple_of!r}; give a positive integer")
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    return Vocabulary(
        models=models,
        tokens=out,
        sources=sources,
        fills=fills,
        forced=frozenset(forced),
        size=size,
        template=template.path,
        template_count=len(out) - len(added),
        added=added,
    )


def _fills(models, base, loaded, order, out, sources, tokens):
    """Per output id that some input lacks (or that is forced): the rows whose mean fills it."""
    fills: dict[int, tuple[tuple[int, int], ...]] = {}
    forced = set()
    base_i = _index(models, base, "base_model") if base is not None else None
    for j, t in enumerate(out):
        have = [i for i, s in enumerate(sources) if s[j] >= 0]
        cfg = tokens.get(t)
        if cfg is not None:
            cfg = cfg if isinstance(cfg, dict) else {"source": cfg}
            if cfg.get("force"):
                forced.add(j)
            elif len(have) == len(models):
                continue
            fills[j] = _configured(models, loaded, order, sources, t, j, cfg)
        elif len(have) == len(models):
            continue
        elif len(have) == 1:
            fills[j] = ((have[0], sources[have[0]][j]),)
        elif not have:
            LOG.warning("token %r is in no model's tokenizer: its rows are zero", t)
            fills[j] = ()
        elif base_i is not None and sources[base_i][j] >= 0:
            fills[j] = ((base_i, sources[base_i][j]),)
        else:
            fills[j] = tuple((i, sources[i][j]) for i in have)
    return fills, forced


def _configured(models, loaded, order, sources, t, j, cfg) -> tuple[tuple[int, int], ...]:
    key = f"tokenizer.tokens.{t}.source"
    src = cfg.get("source")
    if src is None:
        raise SpecError(f"{key}: missing, and some model lacks {t!r} (or force is set); give a source")
    if isinstance(src, dict) and src.get("kind") == "zero":
        return ()
    if isinstance(src, dict) and src.get("kind") == "model_token":
        i = _index(models, src.get("model"), key + ".model")
        tok = loaded[next(o for o in order if _same(o, models[i]))]
        if ("token" in src) == ("token_id" in src):
            raise SpecError(f"{key}: give exactly one of token and token_id")
        row = src["token_id"] if "token_id" in src else tok.vocab.get(src["token"], -1)
        if not isinstance(row, int) or not 0 <= row < tok.rows:
            raise SpecError(f"{key}: {models[i]} has no token {src.get('token', row)!r}; name one it has")
        return ((i, row),)
    if isinstance(src, dict):
        raise SpecError(f"{key}: kind {src.get('kind')!r}; use zero, model_token or a model path")
    i = _index(models, src, key)
    if sources[i][j] < 0:
        raise SpecError(f"{key}: {models[i]} lacks {t!r}; name a model that has it, or use model_token")
    return ((i, sources[i][j]),)


def input_rows(vocab: Vocabulary, i: int, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ``i``'s vocabulary tensor permuted into the output vocabulary (rows on dim 0), and which rows are its
    own.  ``tensors`` holds every input's tensor in ``vocab.models`` order (fills read other inputs' rows); the
    result is in their promoted dtype.  Rows it lacks get the token's fill; padding rows, the mean of its rows."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    n, x = len(vocab.tokens), tensors[i]
    src = torch.tensor(vocab.sources[i], dtype=torch.long, device=x.device)
    present = src >= 0
    if vocab.forced:
        present[list(vocab.forced)] = False
    out = torch.zeros((vocab.size, *x.shape[1:]), dtype=dtype, device=x.device)
    out[:n][present] = x[src[present]].to(dtype)
    for j in (~present).nonzero().flatten().tolist():
        rows = vocab.fills[j]
        if rows:
            acc = torch.zeros(x.shape[1:], dtype=dtype, device=x.device)
            for m, r in rows:
                acc = acc + tensors[m][r]
            out[j] = acc / len(rows)
    if vocab.size > n:
        out[n:] = out[:n].mean(dim=0)
    return out, torch.cat([present, present.new_zeros(vocab.size - n)])


def _template_text(path: Path) -> str | None:
    files = {p.name: p for p in path.iterdir()} if path.is_dir() else {}
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].read_text()
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        if name in files:
            value = json.loads(files[name].read_text()).get(key)
            if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
                value = next((v.get("template") for v in value if v.get("name") == "default"), None)
            if isinstance(value, dict):
                value = value.get("default")
            if value:
                return value
    return None


def resolve_chat_template(value: str | None, models: list[Path]) -> str | None:
    """mergekit's ``chat_template:``: ``auto`` (the most common template of ``models``), a bundled name
    (mergekit's own files, when mergekit is installed) or a literal Jinja template."""
    if not value:
        return None
    if value == "auto":
        found = [t.strip() for t in (_template_text(Path(m)) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        try:
            from importlib.resources import files

            from mergekit._data import chat_templates

            file = files(chat_templates).joinpath(value + ".jinja")
            if file.is_file():
                return file.read_text()
        except ImportError:
            pass
    if len(value) < 20 or "{" not in value:
        raise SpecError(f"chat_template: {value!r} is neither auto, a known name nor a Jinja template; give one")
    return value


def write_tokenizer(vocab: Vocabulary, out_dir: Path, chat_template: str | None = None) -> None:
    """The merged tokenizer's files in ``out_dir``: the template's tokenizer with ``vocab``'s tokens appended, its
    tokenizer_config.json / special_tokens_map.json, and the chat template (``chat_template``, a resolved
    template text, replaces the template's)."""
    src = Path(vocab.template)
    tok = _load(src)
    if tok is None:
        raise ModelError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model); add its tokenizer files")
    tok.rows = vocab.template_count
    tok = _strip(tok)
    tokenizer = Tokenizer.from_str(json.dumps(tok.data))
    tokenizer.add_tokens([AddedToken(e["content"], **{k: e[k] for k in _FLAGS}) for e in vocab.added])  # one call
    wrong = [(t, j) for j, t in enumerate(vocab.tokens) if tokenizer.token_to_id(t) != j]
    if wrong:
        raise ModelError(
            f"{src}/tokenizer.json: token {wrong[0][0]!r} gets id {tokenizer.token_to_id(wrong[0][0])}, not "
            f"{wrong[0][1]}; the template's vocabulary is not the one the vocabulary was built from"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    for name in _CONFIG_FILES:
        if (src / name).is_file():
            data = json.loads((src / name).read_text())
            if name == "tokenizer_config.json":
                _update_config(data, vocab)
            (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if not (out_dir / "tokenizer_config.json").exists():
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if chat_template is not None:
        set_chat_template(out_dir, chat_template)
    elif (src / "chat_template.jinja").is_file():
        shutil.copyfile(src / "chat_template.jinja", out_dir / "chat_template.jinja")


def set_chat_template(directory: Path, template: str) -> None:
    """Give the tokenizer files in ``directory`` another chat template (``chat_template.jinja``, which the
    tokenizer_config.json's own entry would otherwise shadow in older transformers)."""
    config = Path(directory) / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (Path(directory) / "chat_template.jinja").write_text(template)


def _update_config(data: dict, vocab: Vocabulary) -> None:
    """tokenizer_config.json of the output: its added_tokens_decoder (transformers 4's) over the output's added
    tokens."""
    decoder = data.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        kept = {k: v for k, v in decoder.items() if int(k) < vocab.template_count}
        for j, e in enumerate(vocab.added, start=vocab.template_count):
            kept[str(j)] = {"content": e["content"], **{k: e[k] for k in _FLAGS}}
        data["added_tokens_decoder"] = kept
