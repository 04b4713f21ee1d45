"""The speculative loop and what it decides with, pure computation on a Model: loop.py (the rounds, as a
generator of events), drafters.py (draft model, prompt lookup, both), costs.py (the cost model that picks each
round's draft), sampling.py (the keyed Gumbel rule that makes acceptance exact), stats.py, detok.py (text
from tokens, stop strings). No I/O, no Rich, no Typer. May import: errors, llama.

Kept light on purpose: importing this package imports none of its modules (the CLI starts without llama.cpp).
"""
