"""The evaluator pool: Ray actors that each own one inference engine, and the scheduling of models
over them.

An actor keeps its engine across models; a model with the signature the actor last served is swapped
in place (vLLM's weight reload), any other model gets a fresh actor (vLLM cannot free an engine
cleanly: the actor is ended).  The pool sizes itself to the cluster: one actor per GPU, or on CPU
clusters ``cluster CPUs // threads`` actors with ``threads`` threads each.  A model is one unit of
work: if its actor dies, the actor is replaced and the model is evaluated again from the start, so
a result is either complete or absent, never partial or counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import ray

from mergescale.errors import ClusterError, MergescaleError, SpecError
from mergescale.eval.backend import model_signature
from mergescale.eval.evaluator import Evaluator
from mergescale.orchestrator.cluster import gpus_in_cluster, resolve_device

log = logging.getLogger(__name__)

#: a model whose evaluator dies this many times fails the evaluation
ATTEMPTS = 3
DEFAULT_CPU_THREADS = 2


class ActorLost(Exception):
    """The evaluator actor serving a lease died; the model it was evaluating must start over."""


@dataclass
class _Slot:
    index: int
    actor: object | None = None
    signature: str | None = None
    started: int = 0  # actors (engines) started in this slot
    lost: int = 0  # actors of this slot that died


class Lease:
    """One evaluator actor lent to one model's evaluation: the :class:`Evaluator` methods as blocking calls."""

    def __init__(self, pool: EvaluatorPool, slot: _Slot):
        self.pool, self.slot = pool, slot

    def _call(self, method: str, *args):
        try:
            return ray.get(getattr(self.slot.actor, method).remote(*args))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, MergescaleError):
                raise err.cause from None  # a user error, as the actor raised it
            raise
        except ray.exceptions.RayActorError as err:
            self.pool._lost(self.slot)
            raise ActorLost(str(err).splitlines()[0]) from None

    def generate(self, model, requests):
        return self._call("generate", model, requests)

    def loglikelihood(self, model, pairs):
        return self._call("loglikelihood", model, pairs)

    def loglikelihood_rolling(self, model, texts):
        return self._call("loglikelihood_rolling", model, texts)

    def reference(self, model, prompts, max_tokens, out):
        return self._call("reference", model, prompts, max_tokens, out)

    def divergence(self, model, reference):
        return self._call("divergence", model, reference)

    def info(self) -> dict:
        return self._call("info")


class EvaluatorPool:
    def __init__(self, backend: str = "vllm", actors: int | None = None, threads: int | None = None,
                 device: str = "auto", max_model_len: int | None = None,
                 trust_remote_code: bool = False):  # fmt: skip
        gpus = gpus_in_cluster()
        self.device = resolve_device(device, gpus)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if self.device == "cuda":
            self.threads = threads or 1
            self.size = actors or int(gpus)
            options = {"num_gpus": 1, "num_cpus": self.threads}
        else:
            self.threads = threads or min(DEFAULT_CPU_THREADS, cpus)
            self.size = actors or max(1, cpus // self.threads)
            options = {"num_cpus": self.threads}
        if self.size < 1 or self.threads < 1:
            raise SpecError("--actors and --threads must be at least 1")
        self.backend = backend
        self._actor_class = ray.remote(Evaluator).options(
            **options, max_restarts=0, scheduling_strategy="SPREAD",
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.threads), "TQDM_DISABLE": "1",
                                      "VLLM_LOGGING_LEVEL": "WARNING"}},
        )  # fmt: skip
        self._args = (backend, self.device, self.threads, max_model_len, trust_remote_code)
        self._slots = [_Slot(i) for i in range(self.size)]
        self._idle = list(self._slots)
        self._cond = threading.Condition()

    # ---------------------------------------------------------------- leases
    @contextlib.contextmanager
    def lease(self, model: str):
        """An actor for ``model``: preferably one whose engine serves its signature (hot swap)."""
        signature = model_signature(model)
        with self._cond:
            self._cond.wait_for(lambda: self._idle)
            slot = next((s for s in self._idle if s.signature == signature), None)
            slot = slot or next((s for s in self._idle if s.actor is None), None) or self._idle[0]
            self._idle.remove(slot)
        try:
            if slot.actor is not None and slot.signature != signature:
                ray.kill(slot.actor)  # another architecture: its engine cannot be reused
                slot.actor = None
            if slot.actor is None:
                slot.actor = self._actor_class.remote(*self._args)
                slot.started += 1
            slot.signature = signature
            yield Lease(self, slot)
        finally:
            with self._cond:
                self._idle.append(slot)
                self._cond.notify()

    def _lost(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            ray.kill(slot.actor)
        slot.actor, slot.signature = None, None
        slot.lost += 1

    # ---------------------------------------------------------------- work
    def run(self, fn: Callable[[Lease, str], object], model: str):
        """``fn(lease, model)`` on an actor (blocks until one is free).  If the actor dies, the model is
        evaluated again from the start on a replacement actor (at most :data:`ATTEMPTS` times); only
        the complete result of the last attempt is returned."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self.lease(model) as lease:
                    return fn(lease, model)
            except ActorLost as err:
                log.warning("evaluator died while evaluating %s (%s); re-queued, attempt %d", model, err, attempt + 1)
        raise ClusterError(
            f"{model}: its evaluator died {ATTEMPTS} times; out of memory? use fewer --actors or a smaller "
            "--max-model-len"
        )

    def map(self, fn: Callable[[Lease, str], object], models: Sequence[str], on_done=None) -> list:
        """:meth:`run` for every model, spread over the actors; results in the models' order."""
        results: list = [None] * len(models)
        with ThreadPoolExecutor(self.size, thread_name_prefix="evaluator") as ex:
            futures = {ex.submit(self.run, fn, m): i for i, m in enumerate(models)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise fut.exception()
                    results[futures[fut]] = fut.result()
                    if on_done:
                        on_done(models[futures[fut]], results[futures[fut]])
        return results

    def seen_prompts(self) -> set[str]:
        """The prompt digests the live actors received (``Evaluator.seen_prompts``): a request audit."""
        seen: set[str] = set()
        for slot in self._slots:
            if slot.actor is not None:
                seen.update(ray.get(slot.actor.seen_prompts.remote()))
        return seen

    def stats(self) -> dict:
        """Engines started, in-place swaps and actors lost, over the pool's life."""
        swaps = 0
        for slot in self._slots:
            if slot.actor is not None:
                with contextlib.suppress(ray.exceptions.RayError):
                    swaps += ray.get(slot.actor.info.remote())["swaps"]
        return {"actors": self.size, "threads": self.threads, "device": self.device,
                "engines_started": sum(s.started for s in self._slots), "swaps": swaps,
                "actors_lost": sum(s.lost for s in self._slots)}  # fmt: skip

    def shutdown(self) -> None:
        for slot in self._slots:
            if slot.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor)
                slot.actor, slot.signature = None, None
