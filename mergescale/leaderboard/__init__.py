"""Leaderboards: a queue of submitted models, the runs that evaluate them, and the static site that shows them."""
