"""Trainer integrations: one module per trainer (`trl`, `verl`), each importing its trainer lazily.

They are thin adapters over the estimator interface and the ops (docs/CONTRACT.md §5); nothing
below this package imports them.
"""
