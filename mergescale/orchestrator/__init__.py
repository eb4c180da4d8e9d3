"""Planning and running work on Ray: sharded merges, studies, Tune search, results store, reports.

The only package that may call ``ray.remote``, ``ray.get`` or ``tune.Tuner``.
"""
