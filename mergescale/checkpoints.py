"""Reading and writing Hugging Face model directories.  Knows nothing of merge methods.

Reading is lazy: a ``ModelDir`` learns names, shapes and dtypes from the safetensors headers and
reads a tensor only when asked for it, with positioned reads (``os.preadv``) straight into the
tensor's memory — no memory map.  Pickled checkpoints (refused unless ``allow_pickle``) are the
exception: ``torch.load(mmap=True)`` memory-maps each file when the directory is opened.  Writing
is atomic: shards go to a staging directory next to the destination; ``publish`` writes the index,
config, tokenizer files and model card, then renames the staging directory into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mergescale import files
from mergescale.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# Every dtype of the safetensors format (0.8) and the torch dtype that holds it; None: torch has none.
_DTYPES: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.float4_e2m1fn_x2,  # packed, two values a byte: see _PACKED
    "F6_E2M3": None, "F6_E3M2": None,
    "C64": torch.complex64,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items() if dtype is not None}
# A safetensors header counts F4 values; torch's float4_e2m1fn_x2 counts bytes (value pairs) in the last dimension.
_PACKED = {torch.float4_e2m1fn_x2: 2}


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]  # torch's shape (for F4: the header's last dimension halved)
    begin: int  # byte offsets in the data section
    end: int


class SafetensorsFile:
    """One safetensors file: its header parsed and checked once, tensors (or ranges of their rows) read with
    positioned reads straight into the tensor's memory — no memory map, so reading a model does not
    leave its pages in the process's resident set, and no page faults per 4 KB."""

    MAX_HEADER = 100 * 2**20

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise ModelError(
                f"{self.path}: truncated: {size} bytes, shorter than a safetensors header; re-download or re-save it"
            )
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= self.MAX_HEADER:
                raise ModelError(
                    f"{self.path}: not a safetensors file (bad header length {n}); re-save or re-download it"
                )
            if n > size - 8:
                raise ModelError(
                    f"{self.path}: truncated: the header says it has {n} bytes but the file has {size}; "
                    "re-download or re-save it"
                )
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ModelError(
                    f"{self.path}: corrupt safetensors header (not JSON); re-save or re-download it"
                ) from None
        if not isinstance(header, dict):
            raise ModelError(
                f"{self.path}: corrupt safetensors header (JSON {type(header).__name__}, not an object); "
                "re-save or re-download it"
            )
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, _Entry] = {name: self._entry(name, e, size) for name, e in header.items()}
        spans = sorted((e.begin, e.end, name) for name, e in self.entries.items() if e.end > e.begin)
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise ModelError(f"{self.path}: tensors {a} and {b} overlap in the file; re-save or re-download it")

    def _entry(self, name: str, e: object, size: int) -> _Entry:
        bad = f"{self.path}: tensor {name}"
        fix = "re-save or re-download it"
        e = e if isinstance(e, dict) else {}
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
        if missing:
            raise ModelError(f"{bad}: corrupt header entry (no {', '.join(missing)}); {fix}")
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in _DTYPES:
            raise ModelError(f"{bad} has dtype {code!r}, which is not a safetensors dtype; {fix}")
        dtype = _DTYPES[code]
        if dtype is None:
            raise ModelError(
                f"{bad} has dtype {code}, which torch {torch.__version__} has no dtype for; "
                "dequantize the checkpoint (e.g. to BF16) and merge that"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ModelError(f"{bad} has shape {shape!r}, not a list of non-negative integers; {fix}")
        pack = _PACKED.get(dtype, 1)
        if pack > 1:
            if not shape or shape[-1] % pack:
                raise ModelError(
                    f"{bad} has dtype {code} and shape {shape}: torch packs {pack} values a byte along the last "
                    f"dimension, so it must be a multiple of {pack}; re-save it with such a shape"
                )
            shape = [*shape[:-1], shape[-1] // pack]
        pair = isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
        if not pair or offsets[0] > offsets[1]:
            raise ModelError(f"{bad} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end; {fix}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ModelError(
                f"{bad}: data_offsets {offsets} span {end - begin} bytes but shape {e['shape']} of {code} "
                f"needs {nbytes}; {fix}"
            )
        if self.data_start + end > size:
            raise ModelError(
                f"{self.path}: truncated: tensor {name} ends at byte {self.data_start + end} but the file has "
                f"{size} bytes; re-download or re-save it"
            )
        return _Entry(dtype, tuple(shape), begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of the tensor ``read`` returns (for F4, torch's: the header's last dimension halved)."""
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its rows ``start:stop`` (dimension 0, clamped to the tensor)."""
        e = self.entries[name]
        shape, begin, end = list(e.shape), e.begin, e.end
        if (start is not None or stop is not None) and shape:
            stop = min(stop if stop is not None else shape[0], shape[0])
            start = min(max(start or 0, 0), stop)
            row = (end - begin) // shape[0] if shape[0] else 0
            begin, end, shape[0] = begin + start * row, begin + stop * row, stop - start
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view = memoryview(out.numpy())
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], self.data_start + begin + got)
                    if n <= 0:
                        raise ModelError(f"{self.path}: tensor {name}: the file ended early; re-download it")
                    got += n
            finally:
                os.close(fd)
        return out.view(e.dtype).reshape(shape)


class ModelDir:
    """A Hugging Face model directory.  Safetensors weights are read lazily (headers when a file is first
    needed, tensors when asked for); a pickled checkpoint is memory-mapped whole when the directory is opened."""

    def __init__(self, path: Path | str, allow_pickle: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelError(f"{self.path}: not a Hugging Face model directory (no config.json); check the path")
        self.config: dict = _json(self.path / "config.json")
        self._files: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if (self.path / INDEX).is_file():
            self.weight_map: dict[str, str] = _weight_map(self.path / INDEX)
        elif (self.path / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._file(SINGLE).entries, SINGLE)
        elif (self.path / PICKLE_SINGLE).is_file() or (self.path / PICKLE_INDEX).is_file():
            if not allow_pickle:
                raise ModelError(
                    f"{self.path}: pickled checkpoint (pytorch_model.bin) refused, it can run code when loaded; "
                    "convert it to safetensors or pass --allow-pickle if you trust it"
                )
            self._pickled = self._load_pickled()
            self.weight_map = {name: PICKLE_SINGLE for name in self._pickled}
        else:
            raise ModelError(f"{self.path}: no model.safetensors or {INDEX}; is this a model directory?")
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _load_pickled(self) -> dict[str, torch.Tensor]:
        files = [PICKLE_SINGLE]
        if (self.path / PICKLE_INDEX).is_file():
            files = sorted(set(_weight_map(self.path / PICKLE_INDEX).values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(torch.load(self.path / f, map_location="cpu", weights_only=True, mmap=True))
        return out

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            if not (self.path / file).is_file():
                raise ModelError(f"{self.path}: {file} is listed in {INDEX} but missing; re-download the model")
            self._files[file] = SafetensorsFile(self.path / file)
        return self._files[file]

    def _info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            if self._pickled is not None:
                t = self._pickled[name]
                self._meta[name] = (tuple(t.shape), t.dtype)
            else:
                f = self._file(self.weight_map[name])
                if name not in f.entries:
                    raise ModelError(f"{f.path}: tensor {name} is listed in {INDEX} but not in the file")
                self._meta[name] = (f.shape(name), f.dtype(name))
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)[1]

    def file_of(self, name: str) -> Path:
        return self.path / self.weight_map[name]

    def source_name(self, name: str) -> str:
        """The tensor's name in the files (a model seen through a layer range renames its layers)."""
        return name

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ModelError(f"{self.path}: tensor {name} is missing; is this model of the same architecture?")
        if self._pickled is not None:
            return self._pickled[name]
        self._info(name)
        return self._file(self.weight_map[name]).read(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (dimension 0), reading only those bytes."""
        if name not in self.weight_map:
            raise ModelError(f"{self.path}: tensor {name} is missing; is this model of the same architecture?")
        if self._pickled is not None:
            return self._pickled[name][start:stop]
        self._info(name)
        return self._file(self.weight_map[name]).read(name, start, stop)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:
        raise ModelError(f"{path}: not valid JSON ({e}); re-download or re-save the model") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: holds a JSON {type(data).__name__}, not an object; re-download or re-save the model")
    return data


def _weight_map(path: Path) -> dict[str, str]:
    weight_map = _json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ModelError(f'{path}: no "weight_map" of tensor name to file name; re-download or re-save the model')
    return weight_map


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardInfo:
    file: str
    names: tuple[str, ...]
    sha256: str
    nbytes: int


def staging_dir(out: Path) -> Path:
    """A fresh staging directory beside ``out`` (same filesystem, so publishing is one rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def write_shard(staging: Path, file: str, tensors: dict[str, torch.Tensor]) -> ShardInfo:
    """Write one safetensors shard and return its name, tensors and sha256.

    The bytes are deterministic (tensors in name order, header as compact sorted JSON) and are
    written straight from the tensors' memory while hashing, so a shard is never copied whole
    into a buffer first (``safetensors.save_file`` does that).  Written under a hidden temporary
    name, then renamed: a writer that fails removes its temporary file, a killed one leaves only
    that hidden name (``publish`` removes it), never a file under ``file``.
    """
    path = Path(staging) / file
    names = sorted(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise ModelError(
                f"{path}: tensor {name} has dtype {t.dtype}, which safetensors cannot store; "
                "cast it to a dtype safetensors has (e.g. torch.float32) before writing"
            )
        shape = list(t.shape)
        pack = _PACKED.get(t.dtype, 1)
        if pack > 1:
            if not shape:
                raise ModelError(
                    f"{path}: tensor {name} is a 0-dimensional {t.dtype}, which safetensors cannot store; "
                    "reshape it to [1] before writing"
                )
            shape[-1] *= pack
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with files.atomic_path(path) as partial, open(partial, "wb") as f:
        for chunk in (len(text).to_bytes(8, "little"), text):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
    return ShardInfo(file=file, names=tuple(names), sha256=digest.hexdigest(), nbytes=path.stat().st_size)


def shard_file(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def copy_tokenizer(source: Path, directory: Path) -> None:
    """A model directory's tokenizer files, copied as they are."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(directory) / name)


def publish(
    staging: Path,
    out: Path,
    shards: list[ShardInfo],
    config: dict,
    tokenizer_from: Path | None,
    card: str,
    extra_files_from: Path | None = None,
) -> Path:
    """Write index, config, tokenizer files and model card into ``staging``, then rename it to ``out``."""
    staging, out = Path(staging), Path(out)
    for stray in staging.glob(".*.tmp-*"):  # left by a shard writer that was killed and retried
        stray.unlink()
    weight_map = {name: s.file for s in shards for name in s.names}
    total = sum(s.nbytes for s in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if extra_files_from is not None and (Path(extra_files_from) / "generation_config.json").is_file():
        shutil.copy2(Path(extra_files_from) / "generation_config.json", staging / "generation_config.json")
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, staging)
    (staging / "README.md").write_text(card)
    if out.exists():
        if any(out.iterdir()):
            raise ModelError(f"{out} appeared while merging and is not empty; nothing was overwritten")
        out.rmdir()
    os.rename(staging, out)
    return out


def weights_sha256(path: Path | str) -> str:
    """A content hash of a model directory's weights: sha256 over its safetensors files' own sha256s, in
    name order (the same bytes give the same hash whatever the directory is called)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights; pass a Hugging Face model directory")
    outer = hashlib.sha256()
    for file in files:
        inner = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                inner.update(chunk)
        outer.update(f"{file.name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()
