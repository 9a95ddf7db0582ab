"""Bringing a conversation's KV back: restore from a state file (read, checksum, load, verify) against
recomputing it (prefill), for histories of 256, 1,024 and 4,096 tokens, measured in one run on one engine.
Writes bench/results/restore_vs_recompute.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from llamaq.worker.engine import BatchSlice, Engine, EngineConfig
from llamaq.worker.model_files import default_model_path, model_digest
from llamaq.worker.settings import default_threads
from llamaq.worker.state_dir import StateDir, StateKind
from llamaq.worker.state_file import Fingerprint
from llamaq.worker.swap_tier import SwapTier

SIZES = [256, 1024, 4096]
REPEATS = 3
CHUNK = 512
TEXT = "The keeper wrote in the log: lamp lit at dusk, fog from the west, two boats past the rocks, bell at night. "


def prefill(engine: Engine, seq_id: int, tokens: list[int]) -> None:
    for start in range(0, len(tokens), CHUNK):
        engine.decode([BatchSlice(seq_id, tokens[start : start + CHUNK], start, False)])


def measure(engine: Engine, tier: SwapTier, n_tokens: int) -> dict[str, float]:
    tokens = engine.tokenize(TEXT * (n_tokens // 20 + 1))[:n_tokens]
    recompute, restore = [], []
    for _ in range(REPEATS):
        engine.free_sequence(0)
        started = time.perf_counter()
        prefill(engine, 0, tokens)
        recompute.append(time.perf_counter() - started)
    n_bytes = tier.save(0, tokens, "bench-conversation", StateKind.SWAP)
    for _ in range(REPEATS):
        engine.free_sequence(1)
        saved = tier.find("bench-conversation", tokens)
        assert saved is not None
        started = time.perf_counter()
        tier.restore(1, "bench-conversation", saved, keep=len(tokens))
        restore.append(time.perf_counter() - started)
    recompute_s, restore_s = statistics.median(recompute), statistics.median(restore)
    return {
        "history_tokens": n_tokens,
        "state_file_mib": round(n_bytes / (1 << 20), 2),
        "recompute_ms": round(recompute_s * 1000, 1),
        "restore_ms": round(restore_s * 1000, 1),
        "restore_speedup": round(recompute_s / restore_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    args = parser.parse_args()
    config = EngineConfig(
        default_model_path(),
        n_ctx=16384,
        n_seq_max=2,
        n_batch=CHUNK,
        n_threads=default_threads(),
        n_gpu_layers=args.n_gpu_layers,
    )
    engine = Engine(config)
    fingerprint = Fingerprint.of(model_digest(config.model_path), **config.kv_settings())
    with tempfile.TemporaryDirectory() as directory:
        tier = SwapTier(engine, StateDir(Path(directory), 1 << 34), fingerprint, 0.0)
        rows = [measure(engine, tier, n) for n in SIZES]
    engine.close()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": config.model_path.name, "threads": config.n_threads, "kv": "q8_0 per-sequence", "rows": rows}
    (args.out / "restore_vs_recompute.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| history tokens | state file MiB | recompute ms | restore ms (read, checksum, load, verify) | speedup |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['history_tokens']} | {r['state_file_mib']} | {r['recompute_ms']} | {r['restore_ms']} "
        f"| {r['restore_speedup']}x |"
        for r in rows
    ]
    (args.out / "restore_vs_recompute.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
