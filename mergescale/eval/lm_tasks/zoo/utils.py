"""Helpers the zoo's lm-eval task YAMLs name with ``!function``: local data and per-document metrics."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from mergescale.eval.greedy import char_accuracy

DATA = Path(__file__).parent / "data"


def load_zoo_task(zoo_task: str, **_metadata) -> datasets.DatasetDict:
    """The validation and test documents of one zoo task, from the JSONL files beside this module."""
    splits = {}
    for split in ("validation", "test"):
        rows = [json.loads(line) for line in (DATA / f"{zoo_task}.{split}.jsonl").read_text().splitlines()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    pred, target = results[0], doc["answer"]
    return {"exact_match": float(pred == target), "char_acc": char_accuracy(pred, target)}
