"""Layer ranges of models, for stacked merges (``slices:``): a model seen through a range of its layers, and
where a slice's plan sits in the stacked output.

A slice's plan is an ordinary merge plan over :class:`LayerView` s: its sources' layers ``first .. end-1``
appear as layers ``0 .. n-1`` (so a gradient over layers runs over the slice, ``t = i / (n - 1)``, as in
mergekit), and the merged layer ``i`` is written as layer ``offset + i`` of the output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergescale.checkpoints import ModelDir
from mergescale.merge_ops.granularity import layer_of, with_layer


@dataclass(frozen=True)
class SliceOf:
    """Where a slice's plan sits in a stacked output."""

    ranges: tuple[tuple[int, int], ...]  # each source's layer range, in the plan's source order (base first)
    offset: int  # the output index of the slice's first layer
    pre: bool  # this slice also merges the tensors before the layers (the embeddings): the first slice
    post: bool  # and those after them (final norm, lm_head): the last slice

    def out_name(self, name: str) -> str:
        """A merged tensor's name in the output: a layer renumbered by the slice's offset."""
        layer = layer_of(name)
        return name if layer is None else with_layer(name, self.offset + layer)


class LayerView:
    """A model directory's layers ``first .. end-1`` as layers ``0 .. n-1``, with its other tensors as they are
    (the same reading interface as :class:`ModelDir`)."""

    def __init__(self, model: ModelDir, first: int, end: int):
        self.model, self.path, self.first = model, model.path, first
        self.config = {**model.config, "num_hidden_layers": end - first}
        self._source: dict[str, str] = {}  # this view's tensor name -> the model's
        for name in model.names:
            layer = layer_of(name)
            if layer is None:
                self._source[name] = name
            elif first <= layer < end:
                self._source[with_layer(name, layer - first)] = name
        self.weight_map = {name: model.weight_map[source] for name, source in self._source.items()}

    @property
    def names(self) -> list[str]:
        return list(self._source)

    def source_name(self, name: str) -> str:
        """The tensor's name in the model's files."""
        return self._source.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.model.shape(self.source_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.model.dtype(self.source_name(name))

    def file_of(self, name: str) -> Path:
        return self.model.file_of(self.source_name(name))

    def tensor(self, name: str) -> torch.Tensor:
        return self.model.tensor(self.source_name(name))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.model.rows(self.source_name(name), start, stop)


def open_models(paths, allow_pickle: bool, ranges=None) -> list[ModelDir | LayerView]:
    """The model directories at ``paths`` (headers are read when first needed), each seen through its layer
    range where ``ranges`` are given (a slice of a stacked merge)."""
    models = [ModelDir(p, allow_pickle=allow_pickle) for p in paths]
    return models if ranges is None else [LayerView(m, *r) for m, r in zip(models, ranges, strict=True)]
