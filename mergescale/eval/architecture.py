"""Refuse a model directory the engines cannot load from transformers' own code, before any engine starts.

A model whose config needs custom code (``auto_map``), or names a ``model_type`` or an architecture
class the installed transformers lacks, would otherwise fail deep inside vLLM or HF loading, in an
evaluator actor, with a long traceback.  The check reads only ``config.json`` and transformers' tables
of names: it imports no model class.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from mergescale.errors import ModelError

_CONVERT = "convert it to an architecture transformers {version} supports"


def check_architecture(path: str | Path, trust_remote_code: bool = False) -> None:
    """Raise ``ModelError`` (naming ``path`` and the fix) unless transformers can build the model at
    ``path`` from its own code, or from the model's code (``auto_map``) when ``trust_remote_code``."""
    path = Path(path)
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json); check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{config_file}: not valid JSON ({err}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file}: not a JSON object; re-save the model with save_pretrained")

    if config.get("auto_map"):
        if trust_remote_code:
            return  # the model's own code defines its model_type and classes
        classes = ", ".join(sorted(str(c) for c in config["auto_map"]))
        raise ModelError(
            f"{path}: config.json's auto_map ({classes}) needs the model's own Python code; convert it to a "
            "supported architecture, or pass --trust-remote-code if you trust its code"
        )

    import transformers  # lazily: imports torch, but no model code
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    convert = _CONVERT.format(version=transformers.__version__)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:  # the names only: no configuration module is imported
        found = f"model_type {model_type!r}" if model_type else "no model_type"
        raise ModelError(f"{path}: config.json has {found}, which transformers does not know; {convert}")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise ModelError(f"{path}: config.json's architectures is not a list of class names; {convert}")
    unknown = [a for a in architectures if not (isinstance(a, str) and a in _transformers_names())]
    if unknown:
        raise ModelError(
            f"{path}: config.json's architectures {unknown} are not classes transformers has "
            f"(model_type {model_type!r}); {convert}"
        )


@functools.cache
def _transformers_names() -> frozenset[str]:
    import transformers

    return frozenset(dir(transformers))  # the lazy module lists its classes without importing them
