"""Reading and writing Hugging Face model directories.  Knows nothing of merge methods.

Reading is lazy: a ``ModelDir`` learns names, shapes and dtypes from the safetensors
headers and reads a tensor (memory-mapped) only when asked for it.  Writing is atomic:
shards go to a staging directory next to the destination; ``publish`` writes the index,
config, tokenizer files and model card, then renames the staging directory into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mergescale.errors import MergescaleError

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
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsFile:
    """One safetensors file: its header parsed once, tensors (or ranges of their rows) read with
    positioned reads straight into the tensor's memory — no memory map, so reading a model does not
    leave its pages in the process's resident set, and no page faults per 4 KB."""

    MAX_HEADER = 100 * 2**20

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, self.MAX_HEADER):
                raise MergescaleError(
                    f"{self.path}: not a safetensors file (bad header length); re-save or re-download it"
                )
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise MergescaleError(
                    f"{self.path}: corrupt safetensors header (not JSON); re-save or re-download it"
                ) from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, dict] = header
        for name, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise MergescaleError(
                    f"{self.path}: tensor {name} has dtype {e.get('dtype')}, which mergescale does not read"
                )
            end = self.data_start + e["data_offsets"][1]
            if end > size:
                raise MergescaleError(
                    f"{self.path}: truncated: tensor {name} ends at byte {end} but the file has {size} bytes; "
                    "re-download or re-save it"
                )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its rows ``start:stop`` (dimension 0)."""
        e = self.entries[name]
        shape = list(e["shape"])
        begin, end = e["data_offsets"]
        if start is not None and shape:
            stop = min(stop if stop is not None else shape[0], shape[0])
            row = (end - begin) // shape[0] if shape[0] else 0
            begin, end, shape[0] = begin + start * row, begin + stop * row, max(0, stop - start)
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view = memoryview(out.numpy())
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], self.data_start + begin + got)
                    if n <= 0:
                        raise MergescaleError(f"{self.path}: tensor {name}: the file ended early; re-download it")
                    got += n
            finally:
                os.close(fd)
        return out.view(self.dtype(name)).reshape(shape)


class ModelDir:
    """A Hugging Face model directory, read lazily."""

    def __init__(self, path: Path | str, allow_pickle: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise MergescaleError(f"{self.path}: not a Hugging Face model directory (no config.json); check the path")
        self.config: dict = json.loads((self.path / "config.json").read_text())
        self._files: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if (self.path / INDEX).is_file():
            self.weight_map: dict[str, str] = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._file(SINGLE).entries, SINGLE)
        elif (self.path / PICKLE_SINGLE).is_file() or (self.path / PICKLE_INDEX).is_file():
            if not allow_pickle:
                raise MergescaleError(
                    f"{self.path}: pickled checkpoint (pytorch_model.bin) refused, it can run code when loaded; "
                    "convert it to safetensors or pass --allow-pickle if you trust it"
                )
            self._pickled = self._load_pickled()
            self.weight_map = {name: PICKLE_SINGLE for name in self._pickled}
        else:
            raise MergescaleError(f"{self.path}: no model.safetensors or {INDEX}; is this a model directory?")
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _load_pickled(self) -> dict[str, torch.Tensor]:
        files = [PICKLE_SINGLE]
        if (self.path / PICKLE_INDEX).is_file():
            files = sorted(set(json.loads((self.path / PICKLE_INDEX).read_text())["weight_map"].values()))
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
                raise MergescaleError(f"{self.path}: {file} is listed in {INDEX} but missing; re-download the model")
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
                    raise MergescaleError(f"{f.path}: tensor {name} is listed in {INDEX} but not in the file")
                self._meta[name] = (f.shape(name), f.dtype(name))
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)[1]

    def file_of(self, name: str) -> Path:
        return self.path / self.weight_map[name]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise MergescaleError(f"{self.path}: tensor {name} is missing; is this model of the same architecture?")
        if self._pickled is not None:
            return self._pickled[name]
        self._info(name)
        return self._file(self.weight_map[name]).read(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (dimension 0), reading only those bytes."""
        if name not in self.weight_map:
            raise MergescaleError(f"{self.path}: tensor {name} is missing; is this model of the same architecture?")
        if self._pickled is not None:
            return self._pickled[name][start:stop]
        self._info(name)
        return self._file(self.weight_map[name]).read(name, start, stop)


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
    into a buffer first (``safetensors.save_file`` does that).  Written under a temporary name,
    then renamed: a killed writer leaves no file under ``file``.
    """
    path = Path(staging) / file
    partial = path.with_name(f".{file}.partial-{os.getpid()}")
    names = sorted(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(partial, "wb") as f:
        for chunk in (len(text).to_bytes(8, "little"), text):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
    os.replace(partial, path)
    return ShardInfo(file=file, names=tuple(names), sha256=digest.hexdigest(), nbytes=path.stat().st_size)


def shard_file(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


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
    for stray in staging.glob(".*.partial-*"):  # left by a shard writer that was killed and retried
        stray.unlink()
    weight_map = {name: s.file for s in shards for name in s.names}
    total = sum(s.nbytes for s in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if extra_files_from is not None and (Path(extra_files_from) / "generation_config.json").is_file():
        shutil.copy2(Path(extra_files_from) / "generation_config.json", staging / "generation_config.json")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, staging / name)
    (staging / "README.md").write_text(card)
    if out.exists():
        if any(out.iterdir()):
            raise MergescaleError(f"{out} appeared while merging and is not empty; nothing was overwritten")
        out.rmdir()
    os.rename(staging, out)
    return out


def weights_sha256(path: Path | str) -> str:
    """A content hash of a model directory's weights: sha256 over its safetensors files' own sha256s, in
    name order (the same bytes give the same hash whatever the directory is called)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise MergescaleError(f"{path}: no *.safetensors weights; pass a Hugging Face model directory")
    outer = hashlib.sha256()
    for file in files:
        inner = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                inner.update(chunk)
        outer.update(f"{file.name}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()
