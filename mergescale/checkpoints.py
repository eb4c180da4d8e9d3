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
from safetensors import safe_open
from safetensors.torch import save_file

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


class ModelDir:
    """A Hugging Face model directory, read lazily."""

    def __init__(self, path: Path | str, allow_pickle: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise MergescaleError(f"{self.path}: not a Hugging Face model directory (no config.json); check the path")
        self.config: dict = json.loads((self.path / "config.json").read_text())
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if (self.path / INDEX).is_file():
            self.weight_map: dict[str, str] = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            with safe_open(self.path / SINGLE, framework="pt") as f:
                self.weight_map = {name: SINGLE for name in f.keys()}
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

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file]

    def _info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            if self._pickled is not None:
                t = self._pickled[name]
                self._meta[name] = (tuple(t.shape), t.dtype)
            else:
                sl = self._handle(self.weight_map[name]).get_slice(name)
                self._meta[name] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
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
        return self._handle(self.weight_map[name]).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (dimension 0), reading only those bytes."""
        if name not in self.weight_map:
            raise MergescaleError(f"{self.path}: tensor {name} is missing; is this model of the same architecture?")
        if self._pickled is not None:
            return self._pickled[name][start:stop]
        return self._handle(self.weight_map[name]).get_slice(name)[start:stop]


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
    """Write one safetensors shard (deterministic bytes) and return its name, tensors and sha256."""
    path = Path(staging) / file
    partial = path.with_name(f".{file}.partial-{os.getpid()}")  # a killed writer leaves no file under `file`
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return ShardInfo(file=file, names=tuple(tensors), sha256=digest.hexdigest(), nbytes=path.stat().st_size)


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
