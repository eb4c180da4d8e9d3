"""The merge math: pure torch functions on tensors, one file per method family. No Ray, no files."""
