"""Planning and running work: merges (in-process or as Ray tasks), data-driven fits, evaluations on the
evaluator pool, studies, the results store and reports.

The only package that may call Ray (``ray.remote``, ``ray.get``; Tune when a search exists).  Its
modules and what each does: ``docs/ARCHITECTURE.md``.
"""
