"""The synthetic expert zoo: a tiny Qwen2 base and one expert per character-map task."""
