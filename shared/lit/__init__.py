"""The runner and its parts: project registry, callbacks, optimiser/scheduler factories, logging.

Import submodules directly (`from shared.lit.optim import build_optimizer`); this package imports nothing heavy,
so `python train.py --help` stays fast.
"""
