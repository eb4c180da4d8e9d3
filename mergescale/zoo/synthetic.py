"""Synthetic model families at real sizes: a random Qwen2-layout base and experts = base + small
random task vectors, written as sharded safetensors Hugging Face directories.

They are not trained (the zoo's tiny models are): they exist to measure and test the merge engine
on models the size people merge — speed against mergekit and the I/O floor, memory bounds,
sharding across workers — where only the bytes matter.  Same arguments → same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergescale.checkpoints import INDEX, shard_file

#: ~246 M parameters in the Qwen2 layout (untied lm_head), the benchmark's size
QWEN2_246M = {
    "vocab_size": 32768, "hidden_size": 1024, "num_hidden_layers": 16, "intermediate_size": 2880,
    "num_attention_heads": 16, "num_key_value_heads": 2,
}  # fmt: skip


def qwen2_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen2ForCausalLM with this config, in the model's order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })  # fmt: skip
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _generator(seed: int, model: str, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{model}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") & ((1 << 63) - 1))


def _tensor(name: str, shape: tuple[int, ...], seed: int, model: str, delta_scale: float) -> torch.Tensor:
    """Base values (norms ≈ 1, weights ~ N(0, 0.02)) plus, for an expert, a task vector ~ N(0, delta_scale)."""
    base = torch.randn(shape, generator=_generator(seed, "base", name)) * 0.02
    if name.endswith("norm.weight"):
        base += 1.0
    if model != "base":
        base += torch.randn(shape, generator=_generator(seed, model, name)) * delta_scale
    return base


def write_model(out: Path, cfg: dict, *, seed: int, model: str, dtype: torch.dtype, shard_bytes: int,
                delta_scale: float) -> Path:  # fmt: skip
    """Write one model of the family (``model`` = "base" or an expert's name) as sharded safetensors."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups: list[list[str]] = [[]]
    size = 0
    shapes = qwen2_tensors(cfg)
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = shard_file(i, len(groups))
        tensors = {n: _tensor(n, shapes[n], seed, model, delta_scale).to(dtype) for n in names}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."), **cfg,
    }  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_family(
    root: Path,
    cfg: dict = QWEN2_246M,
    *,
    n_experts: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 200 * 2**20,
    delta_scale: float = 0.002,
) -> tuple[Path, list[Path]]:
    """Base and ``n_experts`` experts under ``root`` (reused when already written with these arguments)."""
    root = Path(root)
    key = json.dumps([cfg, n_experts, seed, str(dtype), shard_bytes, delta_scale], sort_keys=True)
    names = ["base"] + [f"expert{i}" for i in range(n_experts)]
    if (root / "family.json").is_file() and (root / "family.json").read_text() == key:
        return root / "base", [root / n for n in names[1:]]
    root.mkdir(parents=True, exist_ok=True)
    (root / "family.json").unlink(missing_ok=True)
    for name in names:
        write_model(root / name, cfg, seed=seed, model=name, dtype=dtype, shard_bytes=shard_bytes,
                    delta_scale=delta_scale)  # fmt: skip
    (root / "family.json").write_text(key)
    return root / "base", [root / n for n in names[1:]]
