"""The machine's hardware and what a backend costs on it: `inventory` (what there is), `estimate` (before a
load), `measure` (after), `budget` (what admission may hand out) and `placement` (which device a slot runs on).

The package imports none of them, so admission's budgets do not bring the estimate's GGUF reader along: each is
imported where it is used.
"""
