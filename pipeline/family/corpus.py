"""The family corpus: several million tokens of offline text from Debian's archive, part of it
paragraph-aligned across languages, for training a family of dictionaries and checking multilingual
features (`make family`).

    python -m pipeline.family.corpus [DEST]        # apt-get download, extract, split, count

Sources (Debian bookworm packages; their copyright files are kept in DEST/licences/):
- debian-handbook: The Debian Administrator's Handbook (GPL-2+ or CC-BY-SA-3.0), rendered once per
  language from the same DocBook source, so every language has the same paragraphs in the same order
  (checked per file; files that differ are used as plain text, not as parallel text);
- debian-reference-{en,de,es,fr,it}: Debian Reference (GPL-2+), aligned the same way where a chapter's
  paragraph counts agree;
- python3.11-doc: the reST sources of Python's documentation (PSF licence), English prose;
- the embedded fortunes (pipeline.corpus), English, German, Spanish and Italian.

Output contract (DEST):
- documents/<source>.<lang>.jsonl: one document per line, {"text", "lang", "source", "group"}. Read them with
  `data=family` (conf/data/family.yaml): data.split=train|test splits by a hash of the group (source,
  file, block of BLOCK paragraphs; pipeline/data.py), with test_fraction TEST_FRACTION, so all
  translations of a passage fall on the same side and no test passage is trained on in another language.
- parallel.jsonl: test-side paragraphs present in every one of PARALLEL_LANGUAGES, one line each,
  {"topic", "group", "en", "de", ...}, the format of interpret's cross-lingual check.
- manifest.json: package versions, licences, documents, characters and tokens (SmolLM2's tokenizer)
  per file and in all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from pipeline.data import in_split
from pipeline.errors import ConfigError

HANDBOOK_LANGUAGES = {"en-US": "en", "de-DE": "de", "es-ES": "es", "fr-FR": "fr", "it-IT": "it",
                      "pt-BR": "pt"}
"""Translations more than 2/3 complete (nl-NL and most others leave most paragraphs in English)."""
REFERENCE_LANGUAGES = ("en", "de", "es", "fr", "it")
PARALLEL_LANGUAGES = ("en", "de", "es", "fr", "it")
PACKAGES = ["debian-handbook", "python3.11-doc", *(f"debian-reference-{x}" for x in REFERENCE_LANGUAGES)]
BLOCK = 8
"""Paragraphs per document: the unit of the train/test split and of a training document."""
TEST_FRACTION = 0.05
PARALLEL_CHARS = (40, 600)
"""Parallel paragraphs outside this range of English characters are left out (headings, code)."""


class _Paragraphs(HTMLParser):
    """Text of each paragraph element (`tag` with `cls`, or any `tag` when cls is None), nested markup
    flattened, whitespace collapsed; code listings inside a paragraph are kept as text."""

    def __init__(self, tag: str, cls: str | None):
        super().__init__(convert_charrefs=True)
        self.tag, self.cls = tag, cls
        self.paras: list[str] = []
        self._depth = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self._depth:
            self._depth += tag == self.tag
        elif tag == self.tag and (self.cls is None or (dict(attrs).get("class") or "").split() == [self.cls]):
            self._depth, self._buf = 1, []

    def handle_endtag(self, tag):
        if self._depth and tag == self.tag:
            self._depth -= 1
            if not self._depth:
                self.paras.append(re.sub(r"\s+", " ", "".join(self._buf)).strip())

    def handle_data(self, data):
        if self._depth:
            self._buf.append(data)


def paragraphs(html: str, tag: str = "div", cls: str | None = "para") -> list[str]:
    p = _Paragraphs(tag, cls)
    p.feed(html)
    return p.paras


def in_test(group: str) -> bool:
    return in_split(group, "test", TEST_FRACTION)


def aligned_books(pages: dict[str, dict[str, list[str]]], source: str):
    """pages[lang][file] = paragraphs, the first language the original. Returns (group, lang, text)
    documents of BLOCK paragraphs and the per-paragraph alignment of files whose paragraph counts agree
    across languages, {group: [{lang: paragraph}, ...]}. A paragraph left untranslated (equal to one of
    the original's) is dropped from its language's document: it would repeat the original's tokens."""
    langs = list(pages)
    docs, aligned = [], {}
    for name in sorted(pages[langs[0]]):
        per_lang = {lang: pages[lang].get(name) for lang in langs}
        counts = {len(v) for v in per_lang.values() if v is not None}
        same = len(counts) == 1 and None not in per_lang.values()
        original = set(per_lang[langs[0]])
        for lang, paras in per_lang.items():
            for b in range(0, len(paras or []), BLOCK):
                group = f"{source}/{Path(name).stem}/{b // BLOCK}"
                text = "\n\n".join(p for p in paras[b:b + BLOCK] if p and (lang == langs[0] or p not in original))
                if text:
                    docs.append((group, lang, text))
                if same and lang == langs[0]:
                    aligned[group] = [{x: per_lang[x][i] for x in langs}
                                      for i in range(b, min(b + BLOCK, len(paras)))]
    return docs, aligned


def handbook_pages(root: Path) -> dict[str, dict[str, list[str]]]:
    base = root / "usr/share/doc/debian-handbook/html"
    return {lang: {f.name: paragraphs(f.read_text(encoding="utf-8"))
                   for f in sorted((base / folder).glob("*.html"))}
            for folder, lang in HANDBOOK_LANGUAGES.items() if (base / folder).is_dir()}


def reference_pages(root: Path) -> dict[str, dict[str, list[str]]]:
    out = {}
    for lang in REFERENCE_LANGUAGES:
        folder = root / f"usr/share/doc/debian-reference-{lang}/docs"
        if folder.is_dir():
            out[lang] = {f.name.replace(f".{lang}.html", ".html"): paragraphs(f.read_text(encoding="utf-8"), "p", None)
                         for f in sorted(folder.glob(f"*.{lang}.html"))}
    return out


def python_docs(root: Path):
    """reST sources of Python's documentation, one document per section-sized chunk (~BLOCK paragraphs)."""
    base = next((p for p in (root / "usr/share/doc").glob("python3*/html/_sources") if p.is_dir()), None)
    if base is None:
        return []
    docs = []
    for f in sorted(base.rglob("*.txt")):
        paras = [p.strip() for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")) if p.strip()]
        rel = f.relative_to(base).as_posix()
        for b in range(0, len(paras), BLOCK):
            docs.append((f"python-docs/{rel}/{b // BLOCK}", "en", "\n\n".join(paras[b:b + BLOCK])))
    return docs


def default_dir() -> Path:
    """Where conf/data/family.yaml reads it."""
    from pipeline.models import cache_dir
    return Path(os.environ.get("PIPELINE_FAMILY_CORPUS", cache_dir() / "family-corpus"))


def parallel_rows(aligned: dict[str, list[dict]], languages=PARALLEL_LANGUAGES) -> list[dict]:
    """Test-side aligned paragraphs that every language has, translated (not left in English), of
    prose length; the topic is the chapter file, so the check's per-topic features are per chapter."""
    rows = []
    for group, paras in sorted(aligned.items()):
        if not in_test(group):
            continue
        for p in paras:
            if not all(p.get(x) for x in languages):
                continue
            en = p["en"]
            if not PARALLEL_CHARS[0] <= len(en) <= PARALLEL_CHARS[1]:
                continue
            if any(p[x] == en for x in languages if x != "en"):
                continue
            rows.append({"topic": group.rsplit("/", 1)[0], "group": group, **{x: p[x] for x in languages}})
    return rows


def write(dest: Path, docs: list[tuple[str, str, str, str]], parallel: list[dict], info: dict, tokenizer=None) -> dict:
    """docs: (source, group, lang, text). Writes the output contract (module docstring) atomically per file."""
    files: dict[str, list[tuple[str, str]]] = {}
    for source, group, lang, text in docs:
        files.setdefault(f"{source}.{lang}.jsonl", []).append((group, text))
    (dest / "documents").mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, rows in sorted(files.items()):
        source, lang = name.split(".")[:2]
        tmp = dest / "documents" / (name + ".tmp")
        tmp.write_text("".join(json.dumps({"text": t, "lang": lang, "source": source, "group": g}, ensure_ascii=False)
                               + "\n" for g, t in rows), encoding="utf-8")
        os.replace(tmp, dest / "documents" / name)
        for split in ("train", "test"):
            texts = [t for g, t in rows if in_test(g) == (split == "test")]
            st = stats.setdefault(name, {})[split] = {"documents": len(texts), "chars": sum(map(len, texts))}
            if tokenizer is not None:
                st["tokens"] = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    (dest / "parallel.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in parallel),
                                         encoding="utf-8")
    per_split = {sp: {k: sum(s[sp].get(k, 0) for s in stats.values()) for k in ("documents", "chars", "tokens")}
                 for sp in ("train", "test")}
    total = {k: per_split["train"][k] + per_split["test"][k] for k in per_split["train"]}
    manifest = {**info, "files": stats, "total": total, "splits": per_split, "parallel_rows": len(parallel),
                "parallel_languages": list(PARALLEL_LANGUAGES), "block_paragraphs": BLOCK,
                "test_fraction": TEST_FRACTION}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def collect(root: Path, fortunes: Path | None) -> tuple[list, list[dict]]:
    """Documents and parallel rows from an extracted package tree (and the fortunes corpus, if given)."""
    docs, aligned = [], {}
    for source, pages in (("handbook", handbook_pages(root)), ("reference", reference_pages(root))):
        if pages:
            d, a = aligned_books(pages, source)
            docs += [(source, g, lang, t) for g, lang, t in d]
            aligned.update(a)
    docs += [("python-docs", g, lang, t) for g, lang, t in python_docs(root)]
    if fortunes is not None:
        for f in sorted(fortunes.glob("*.jsonl")):
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                d = json.loads(line)
                docs.append(("fortunes", f"fortunes/{d['lang']}/{i}", d["lang"], d["text"]))
    return docs, parallel_rows(aligned)


def _versions(debs: list[Path]) -> dict[str, str]:
    return {d.name.split("_")[0]: d.name.split("_")[1] for d in debs}


def build(dest: Path, tokenizer=None) -> dict:
    """Download the packages with apt-get, extract them and write the corpus; a complete DEST is kept."""
    if (dest / "manifest.json").exists():
        return json.loads((dest / "manifest.json").read_text())
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ConfigError("building the family corpus needs apt-get and dpkg-deb (Debian/Ubuntu). Fix: run this "
                          f"on Debian, or copy a built {dest} from another machine")
    from pipeline.corpus import build as build_fortunes
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        debs = sorted(Path(tmp).glob("*.deb"))
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        docs, parallel = collect(Path(tmp) / "x", build_fortunes())
        lic = dest / "licences"
        lic.mkdir(parents=True, exist_ok=True)
        for pkg in _versions(debs):
            cp = Path(tmp) / "x/usr/share/doc" / pkg / "copyright"
            if cp.exists():
                shutil.copy(cp, lic / f"{pkg}.copyright")
        info = {"packages": _versions(debs) | {"fortunes": "pipeline.corpus"},
                "licences": {"debian-handbook": "GPL-2+ or CC-BY-SA-3.0", "debian-reference": "GPL-2+",
                             "python3.11-doc": "PSF-2.0", "fortunes": "see pipeline.corpus (public domain / BSD)"}}
        manifest = write(dest, docs, parallel, info, tokenizer)
    print(f"family corpus in {dest}: {manifest['total']['documents']} documents, {manifest['total']['chars']:,} "
          f"characters, {manifest['total']['tokens']:,} tokens; {manifest['parallel_rows']} parallel paragraphs")
    return manifest


def main(argv: list[str]) -> None:
    from transformers import AutoTokenizer
    from pipeline.models import embedded_model_dir
    dest = Path(argv[0]) if argv else default_dir()
    build(dest, AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m")))


if __name__ == "__main__":
    main(sys.argv[1:])
