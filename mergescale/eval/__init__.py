"""Tasks, metrics, inference backends (vLLM, HF), evaluator actors and the lm-eval bridge. Never merges."""
