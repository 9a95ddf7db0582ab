"""Restore or recompute: which brings a saved prefix back into the KV cache faster, from measured costs.

Pure arithmetic over timings the engine loop reports. Recomputing costs a prefill per token; restoring costs a
fixed part (opening the file, the verification decode) plus a part per token (reading, checksumming and loading the
state). Both are smoothed averages of what this worker measured, so the choice follows the machine it runs on: a
fast GPU may prefill faster than a slow disk reads.
"""

from __future__ import annotations

from dataclasses import dataclass

_SMOOTHING = 0.3
"""Weight of a new measurement in the running averages."""


@dataclass
class RestoreCost:
    """Running averages of prefill and restore costs, in seconds."""

    prefill_s_per_token: float | None = None
    restore_s_per_token: float | None = None
    restore_fixed_s: float | None = None

    def record_prefill(self, n_tokens: int, seconds: float) -> None:
        """A decode step that was mostly prompt tokens took `seconds` for `n_tokens`."""
        if n_tokens > 0:
            self.prefill_s_per_token = _smooth(self.prefill_s_per_token, seconds / n_tokens)

    def record_restore(self, n_tokens: int, load_s: float, verify_s: float) -> None:
        """A restore of `n_tokens` spent `load_s` reading and loading the state and `verify_s` checking it."""
        if n_tokens > 0:
            self.restore_s_per_token = _smooth(self.restore_s_per_token, load_s / n_tokens)
        self.restore_fixed_s = _smooth(self.restore_fixed_s, verify_s)

    def estimated_restore_s(self, n_tokens: int) -> float | None:
        """Expected seconds to restore a state of `n_tokens`; None before any restore was measured."""
        if self.restore_s_per_token is None or self.restore_fixed_s is None:
            return None
        return self.restore_fixed_s + self.restore_s_per_token * n_tokens

    def estimated_prefill_s(self, n_tokens: int) -> float | None:
        """Expected seconds to compute `n_tokens` of prompt; None before any prefill was measured."""
        return None if self.prefill_s_per_token is None else self.prefill_s_per_token * n_tokens

    def restore_is_cheaper(self, n_restored: int, n_saved: int) -> bool:
        """True when loading a state of `n_restored` tokens beats computing the `n_saved` it spares.

        Until both costs have been measured, restoring wins: that is how its cost gets measured.
        """
        restore = self.estimated_restore_s(n_restored)
        prefill = self.estimated_prefill_s(n_saved)
        return restore is None or prefill is None or restore < prefill


def _smooth(average: float | None, sample: float) -> float:
    return sample if average is None else (1 - _SMOOTHING) * average + _SMOOTHING * sample
