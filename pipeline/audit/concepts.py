"""Concept sets: small YAML files of prompts that do and do not express a concept, plus the words
steering toward the concept should make likelier. The library shipped with the package lives in
pipeline/audit/concepts/*.yaml; users pass their own files by path.

    name: water
    description: Water, in English, German, Spanish and Italian.
    languages: [en, de, es, it]          # optional
    positive: [...]                      # express the concept (ranking)
    negative: [...]                      # contrasting prompts that do not (ranking)
    heldout_positive: [...]              # never used for ranking: the held-out check
    heldout_negative: [...]
    concept_words: [water, Wasser, ...]  # log P(" " + word) after neutral prompts should rise
    images:                              # optional, audit/task=crossmodal: image files (relative to this file)
      positive: [img/lake.jpg, ...]      # show the concept
      negative: [img/desert.jpg, ...]    # do not
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.errors import ConfigError

CONCEPTS_DIR = Path(__file__).resolve().parent / "concepts"
PROMPT_FIELDS = ("positive", "negative", "heldout_positive", "heldout_negative")
REQUIRED = ("name", "description", *PROMPT_FIELDS, "concept_words")
MIN_PROMPTS = 2
"""Fewest prompts per list: an AUROC needs at least one of each class, a spread needs two."""


class ConceptSetError(ConfigError):
    """A concept set file is missing, unreadable or malformed."""


@dataclass
class ConceptSet:
    name: str
    description: str
    positive: list[str]
    negative: list[str]
    heldout_positive: list[str]
    heldout_negative: list[str]
    concept_words: list[str]
    languages: list[str] = field(default_factory=list)
    path: str = "<memory>"
    images: dict[str, list[str]] = field(default_factory=dict)
    """{positive: [paths], negative: [paths]} (resolved against the file's folder), or empty."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def shipped() -> dict[str, Path]:
    """Name -> path of every concept set shipped in the package."""
    return {p.stem: p for p in sorted(CONCEPTS_DIR.glob("*.yaml"))}


def load_concept_set(path: str | Path) -> ConceptSet:
    """Read and validate one concept set file (YAML or JSON, which is YAML)."""
    import yaml
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConceptSetError(f"concept set file {str(path)!r} does not exist. Fix: give a path to a YAML file, or "
                              f"the name of a shipped set: {sorted(shipped())}") from None
    except yaml.YAMLError as e:
        raise ConceptSetError(f"concept set file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConceptSetError(f"concept set file {str(path)!r} must hold a mapping with the fields {list(REQUIRED)}; "
                              f"it holds a {type(doc).__name__}")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise ConceptSetError(f"concept set file {str(path)!r} is missing the field(s) {missing}. Fix: add "
                              + ", ".join(f"{k}:" for k in missing) + f" (every set needs {list(REQUIRED)}; "
                              f"see {CONCEPTS_DIR / 'water.yaml'} for an example)")
    known = set(REQUIRED) | {"languages", "images"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConceptSetError(f"concept set file {str(path)!r} has unknown field(s) {unknown}; the fields are "
                              f"{sorted(known)}. Fix: rename or remove them")
    for k in ("name", "description"):
        if not isinstance(doc[k], str) or not doc[k].strip():
            raise ConceptSetError(f"concept set file {str(path)!r}: field {k!r} must be a non-empty string, "
                                  f"got {doc[k]!r}")
    for k in (*PROMPT_FIELDS, "concept_words", "languages"):
        if k not in doc:
            continue
        v = doc[k]
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise ConceptSetError(f"concept set file {str(path)!r}: field {k!r} must be a list of non-empty "
                                  f"strings, got {v!r}")
        if k in PROMPT_FIELDS and len(v) < MIN_PROMPTS:
            raise ConceptSetError(f"concept set file {str(path)!r}: field {k!r} has {len(v)} prompt(s); it needs at "
                                  f"least {MIN_PROMPTS}. Fix: add prompts")
        if k == "concept_words" and not v:
            raise ConceptSetError(f"concept set file {str(path)!r}: field 'concept_words' is empty. Fix: list the "
                                  "words whose probability steering toward the concept should raise")
    ranking = set(doc["positive"]) | set(doc["negative"])
    overlap = ranking & (set(doc["heldout_positive"]) | set(doc["heldout_negative"]))
    if overlap:
        raise ConceptSetError(f"concept set file {str(path)!r}: held-out prompts {sorted(overlap)} also appear in "
                              "positive/negative; held-out prompts must be unseen by the ranking. Fix: remove them "
                              "from one of the lists")
    images = _images(doc["images"], path) if "images" in doc else {}
    return ConceptSet(**{k: doc[k] for k in REQUIRED}, languages=list(doc.get("languages") or []), path=str(path),
                      images=images)


IMAGE_FIELDS = ("positive", "negative")


def _images(v, path: Path) -> dict[str, list[str]]:
    """The optional `images:` field: {positive: [...], negative: [...]}, at least MIN_PROMPTS
    existing image files each, relative paths against the concept set's folder."""
    if not isinstance(v, dict) or sorted(v) != sorted(IMAGE_FIELDS):
        raise ConceptSetError(f"concept set file {str(path)!r}: field 'images' must be a mapping with exactly the keys "
                              f"{list(IMAGE_FIELDS)} (lists of image paths), got {v!r}")
    out = {}
    for k in IMAGE_FIELDS:
        paths = v[k]
        if not isinstance(paths, list) or not all(isinstance(s, str) and s.strip() for s in paths):
            raise ConceptSetError(f"concept set file {str(path)!r}: field 'images.{k}' must be a list of image paths, "
                                  f"got {paths!r}")
        if len(paths) < MIN_PROMPTS:
            raise ConceptSetError(f"concept set file {str(path)!r}: field 'images.{k}' has {len(paths)} image(s); it "
                                  f"needs at least {MIN_PROMPTS}. Fix: add images")
        resolved = [os.path.abspath(path.parent / p) for p in paths]  # an absolute p stays itself
        missing = [p for p in resolved if not Path(p).is_file()]
        if missing:
            raise ConceptSetError(f"concept set file {str(path)!r}: field 'images.{k}' names image file(s) that do not "
                                  f"exist: {missing}. Fix: paths are relative to the concept set's folder")
        out[k] = resolved
    return out


def resolve_concept_sets(names: list[str]) -> list[ConceptSet]:
    """Shipped set names or file paths -> concept sets; empty: every shipped set."""
    library = shipped()
    out = []
    for n in names or list(library):
        p = library.get(n)
        if p is None:
            if not (n.endswith((".yaml", ".yml", ".json")) or "/" in n):
                raise ConceptSetError(f"concept set {n!r} is neither a shipped set {sorted(library)} nor a file path "
                                      "(ending in .yaml, .yml or .json). Fix: task.concepts=[water,dog] or "
                                      "task.concepts=[path/to/set.yaml]")
            p = Path(n)
        out.append(load_concept_set(p))
    seen = [c.name for c in out]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ConceptSetError(f"concept set name(s) {dup} appear twice in task.concepts={names}; names key the "
                              "report. Fix: give each set a distinct name: field")
    return out
