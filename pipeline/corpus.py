"""The embedded offline corpus: Debian's fortune cookie packages in English, German, Spanish and
Italian (public registry packages, no install needed), extracted once into JSONL documents.

    python -m pipeline.corpus [DEST]      # what `make setup` runs
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.models import cache_dir

PACKAGES = ["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it"]
LANGUAGES = ("en", "de", "es", "it")
# Files of pictures and letters, not prose.
SKIP = {"art", "ascii-art", "banner", "asciiart", "off"}


def corpus_dir() -> Path:
    return Path(os.environ.get("PIPELINE_CORPUS_DIR", cache_dir() / "corpus"))


def split_fortunes(text: str) -> list[str]:
    """A fortune file holds documents separated by lines of a single '%'."""
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            docs.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur).strip())
    return [d for d in docs if len(d) > 20]


def extract(root: Path, dest: Path) -> dict[str, int]:
    """Collect fortune files under an extracted package tree into dest/<lang>.jsonl."""
    base = root / "usr" / "share" / "games" / "fortunes"
    counts = {}
    dest.mkdir(parents=True, exist_ok=True)
    for lang in LANGUAGES:
        folder = base if lang == "en" else base / lang
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()
                       and p.suffix not in (".dat", ".u8") and p.name not in SKIP)
        n = 0
        with open(dest / f"{lang}.jsonl.tmp", "w") as out:
            for f in files:
                for doc in split_fortunes(f.read_text(encoding="utf-8", errors="replace")):
                    out.write(json.dumps({"text": doc, "lang": lang, "source": f"{f.parent.name}/{f.name}"},
                                         ensure_ascii=False) + "\n")
                    n += 1
        os.replace(dest / f"{lang}.jsonl.tmp", dest / f"{lang}.jsonl")
        counts[lang] = n
    return counts


def build(dest: Path | None = None) -> Path:
    dest = dest or corpus_dir()
    if all((dest / f"{lang}.jsonl").exists() for lang in LANGUAGES):
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ConfigError("building the embedded corpus needs apt-get and dpkg-deb (Debian/Ubuntu). "
                          f"Fix: run this on Debian, or copy a built {dest} from another machine")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        counts = extract(Path(tmp) / "x", dest)
    print(f"embedded corpus in {dest}: " + ", ".join(f"{k} {v} documents" for k, v in counts.items()))
    return dest


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
