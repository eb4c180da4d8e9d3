"""The lm-eval bridge: lm-evaluation-harness's ``LM`` interface over a mergescale evaluator.

``MergescaleLM(client, model)`` answers lm-eval's requests for one model with ``client`` — an
in-process :class:`~mergescale.eval.evaluator.Evaluator` or a lease on an evaluator actor of the
pool (the same methods, each naming the model).  lm-eval keeps the task definitions, prompts,
filters and metrics; mergescale keeps the engines and the scheduling.  Decoding is greedy: a task
asking for sampling is evaluated greedily, with a warning.
"""

from __future__ import annotations

import logging

from lm_eval.api.model import LM

from mergescale.eval.backend import GenerateRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


class MergescaleLM(LM):
    def __init__(self, client, model: str):
        super().__init__()
        self.client = client
        self.model = str(model)
        self._warned = False

    def generate_until(self, requests) -> list[str]:
        batch = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or ()
            until = (until,) if isinstance(until, str) else tuple(until)
            max_tokens = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
            if (kwargs.get("do_sample") or kwargs.get("temperature", 0) or 0) and not self._warned:
                log.warning("a task asks for sampling (%s); mergescale decodes greedily", kwargs)
                self._warned = True
            batch.append(GenerateRequest(context, until, max_tokens))
        outputs = self.client.generate(self.model, batch) if batch else []
        for req, out in zip(requests, outputs, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, out)
        return outputs

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        outputs = self.client.loglikelihood(self.model, pairs) if pairs else []
        for req, out in zip(requests, outputs, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, out)
        return [tuple(out) for out in outputs]

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [req.args[0] for req in requests]
        outputs = self.client.loglikelihood_rolling(self.model, texts) if texts else []
        for req, out in zip(requests, outputs, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out)
        return list(outputs)
