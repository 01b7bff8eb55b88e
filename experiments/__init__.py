"""Research scripts over convlib: each parses flags, calls convlib, and writes results into an output folder.

Not part of the wheel (which holds `convlib` alone): the scripts run from a clone with an editable install (`make
setup`, or `pip install -e .`, which puts the clone's root on sys.path), as `python experiments/train.py` or
`python -m experiments.train`.
"""
