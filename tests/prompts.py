"""Prompts shared by the integration tests and benchmarks: short ones and one of several hundred tokens."""

from __future__ import annotations

SHORT_PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):\n",
    "Three tips for learning a new language:\n1.",
    "The quick brown fox",
    "In 1969, astronauts",
    "A recipe for pancakes needs",
]

_STORY = (
    "The lighthouse keeper had lived on the island for thirty years. Every evening he climbed the spiral stairs, "
    "trimmed the wick, polished the great lens and watched the ships pass far out on the grey water. "
    "He kept a logbook of every vessel, its flag, its heading and the weather, and he wrote a line or two about "
    "the birds that nested on the cliffs below. "
)
LONG_PROMPT = _STORY * 8 + "One stormy night in November, the keeper saw"
"""About 600 tokens: long enough to be prefilled in several chunks while other sequences decode."""
