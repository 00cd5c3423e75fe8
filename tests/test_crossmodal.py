"""Vision-language models: caching image+text pairs through the caching CLI (image rows marked),
text-only activations equal to a plain hook, and the crossmodal audit task end to end. The VLM is a
tiny randomly initialised Idefics3 (SmolVLM's architecture) built here with from_config and saved
to a folder, so that the real loading code (AutoConfig -> AutoProcessor + AutoModelForImageTextToText)
is what runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.audit import AuditConfig, ConceptSetError, load_concept_set
from pipeline.audit import run as audit
from pipeline.audit.tasks import TASKS
from pipeline.cache import CacheConfig, StoreConfig, run
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig, load_model
from pipeline.sae import SAEConfig, create, save
from pipeline.store import ActivationStore
from pipeline.store import format as F

ROOT = Path(__file__).resolve().parent.parent
HOOK = "model.text_model.layers.2"
IMG_FEATURE, TXT_FEATURE, N_FEATURES = 5, 9, 64
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


def build_vlm(out: Path, tokenizer_dir: Path, hidden: int = 32) -> Path:
    """A tiny Idefics3: 4-layer Llama text model (hidden `hidden`), 2-layer vision encoder on 32x32
    tiles of 8x8 patches (4 image tokens per tile), SmolLM2's tokenizer plus the image tokens."""
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)], special_tokens=True)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=True)
    proc = Idefics3Processor(images, tok, image_seq_len=4)  # adds <fake_token_around_image>, <image>, ...
    torch.manual_seed(0)
    cfg = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        image_token_id=proc.image_token_id, scale_factor=2)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, smollm2_dir) -> Path:
    return build_vlm(tmp_path_factory.mktemp("tiny-vlm"), smollm2_dir)


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return load_model(ModelConfig(name=str(vlm_dir), device="cpu"))


def make_image(path: Path, colour: str, seed: int, size=(40, 50)) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    px = np.clip(np.array(COLOURS[colour])[None, None] + rng.normal(0, 12, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(px).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("images")
    return {c: [make_image(d / f"{c}{i}.png", c, seed=10 * k + i) for i in range(4)] for k, c in enumerate(COLOURS)}


def plain_hook(model, ids: torch.Tensor, **inputs) -> torch.Tensor:
    """The text model's layer-2 output from a full forward pass with a plain forward hook."""
    seen = {}
    h = model.model.text_model.layers[2].register_forward_hook(
        lambda m, i, o: seen.update(x=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, **inputs)
    h.remove()
    return seen["x"]


def processor_inputs(vlm, image: Path, text: str, splitting: bool) -> dict:
    """The processor's own output for one pair (image token first), independent of the cache code."""
    from PIL import Image
    proc = vlm.processor
    with Image.open(image) as im:
        rgb = im.convert("RGB")
    return proc(text=[proc.image_token + text], images=[[rgb]], return_tensors="pt", add_special_tokens=False,
                do_image_splitting=splitting)


def write_manifest(path: Path, images) -> list[tuple[Path, str]]:
    pairs = [(images["red"][0], "A red square on a table."), (images["blue"][0], "Blue."),
             (images["red"][1], "Another picture of something red, with a long caption that runs on and on."),
             (images["blue"][1], "The sky."), (images["red"][2], "Red again.")]
    with open(path, "w") as f:
        for img, text in pairs:
            f.write(json.dumps({"image": os.path.relpath(img, path.parent), "text": text}) + "\n")
    return pairs


def test_manifest_through_the_cache_cli_marks_every_image_row(vlm_dir, vlm, images, tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    pairs = write_manifest(manifest, images)
    url = tmp_path / "store"
    cmd = [sys.executable, "-m", "pipeline.cache", f"model.name={vlm_dir}", "model.device=cpu", f"manifest={manifest}",
           "image_splitting=true", "hooks=[layers.2]", "context_size=64", "n_tokens=10000", "store.dtype=float32",
           "store.chunk_contexts=1", "store.shard_contexts=2", f"store.url={url}", "progress=false", "batch_size=2"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs")},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    store = ActivationStore.open(str(url))
    assert store.has_modality
    assert store.meta["hook_modules"] == [HOOK] and store.d_model == 32
    image_id = vlm.model.config.image_token_id
    inserted = sum(int((processor_inputs(vlm, img, text, True)["input_ids"] == image_id).sum()) for img, text in pairs)
    modality, tokens = store.modality(), store.tokens()
    assert inserted > 5 * 4  # tiled: several tiles of 4 image tokens per image
    assert int((modality == F.IMAGE).sum()) == inserted
    np.testing.assert_array_equal(modality == F.IMAGE, tokens == image_id)
    assert store.meta["modality"]["image_token_id"] == image_id
    assert store.meta["modality"]["values"] == {"0": "text", "1": "image"}
    # every caption is in the store, in manifest order
    text = vlm.tokenizer.decode(tokens[modality == F.TEXT].tolist())
    positions = [text.index(t) for _, t in pairs]
    assert positions == sorted(positions)


def test_image_rows_equal_a_full_forward_with_a_plain_hook(vlm_dir, vlm, images, tmp_path):
    """One tile per image, contexts of 32 tokens: captions run on into the next context and image
    blocks that do not fit start a new one. Each stored context is rebuilt from the store's tokens and
    the processor's pixels of its images (manifest order) and run through the whole model."""
    manifest = tmp_path / "pairs.jsonl"
    pairs = write_manifest(manifest, images)
    url = str(tmp_path / "store")
    run(CacheConfig(model=ModelConfig(name=str(vlm_dir), device="cpu"), manifest=str(manifest), hooks=[HOOK],
                    context_size=32, n_tokens=10_000, batch_size=3, progress=False,
                    store=StoreConfig(url=url, dtype="float32", chunk_contexts=1, shard_contexts=2)))
    store = ActivationStore.open(url)
    acts, tokens = store.acts(0, store.n_tokens), store.tokens()
    contexts, positions, modality = store.contexts(), store.positions(), store.modality()
    image_id = vlm.model.config.image_token_id
    global_id = vlm.tokenizer.convert_tokens_to_ids("<global-img>")
    assert int((modality == F.IMAGE).sum()) == 4 * len(pairs)
    pixels = [processor_inputs(vlm, img, text, False)["pixel_values"][0] for img, text in pairs]
    used = 0
    for c in range(store.n_contexts):
        rows = contexts == c
        ids = torch.full((1, 32), vlm.tokenizer.bos_token_id)
        ids[0, positions[rows]] = torch.from_numpy(tokens[rows]).long()
        k = int((ids == global_id).sum())
        extra = {"pixel_values": torch.cat(pixels[used:used + k])[None]} if k else {}
        used += k
        expected = plain_hook(vlm.model, ids, **extra)[0, 1:]
        torch.testing.assert_close(acts[torch.from_numpy(rows)], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(modality[rows] == F.IMAGE, ids[0, 1:].numpy() == image_id)
    assert used == len(pairs)


def test_text_only_activations_through_the_cli_equal_a_plain_hook_on_the_text_model(vlm_dir, vlm, text_dir,
                                                                                    tmp_path):
    url = str(tmp_path / "text")
    cmd = [sys.executable, "-m", "pipeline.cache", f"model.name={vlm_dir}", "model.device=cpu", "data=files",
           f"data.path=[{text_dir}/*.txt]", "data.split=all", "hooks=[layers.2]", "context_size=32",
           f"n_tokens={6 * 31}", "store.dtype=float32", "store.chunk_contexts=2", "store.shard_contexts=2",
           f"store.url={url}", "progress=false", "batch_size=3"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs")},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    store = ActivationStore.open(url)
    assert store.meta["hook_modules"] == [HOOK] and store.n_tokens == 6 * 31
    assert store.has_modality and not store.modality().any()  # every row is text
    ids = torch.full((6, 32), vlm.tokenizer.bos_token_id)
    ids[store.contexts(), store.positions()] = torch.from_numpy(store.tokens()).long()
    expected = plain_hook(vlm.model, ids)[:, 1:].reshape(-1, 32)
    torch.testing.assert_close(store.acts(0, store.n_tokens), expected)


def test_text_store_keeps_its_fingerprint_and_has_no_modality_array(tiny_model_dir, text_dir, tmp_path):
    """An additive format change: a text model's store is what it was (no modality array, all rows
    read as text, the same fingerprint as before the field existed)."""
    from pipeline.cache.run import fingerprint
    from pipeline.store import StoreLayout
    url = str(tmp_path / "lm")
    cfg = CacheConfig(model=ModelConfig(name=str(tiny_model_dir), device="cpu"), hooks=["layers.2"], context_size=32,
                      data=DataConfig(source="files", path=[f"{text_dir}/*.txt"], split="all"), n_tokens=62,
                      progress=False, store=StoreConfig(url=url, dtype="float32", chunk_contexts=2, shard_contexts=2))
    run(cfg)
    store = ActivationStore.open(url)
    assert not store.has_modality and F.MODALITY not in store.group
    assert store.modality().tolist() == [F.TEXT] * store.n_tokens
    lay = StoreLayout(("layers.2",), 32, "float32", 2, 31, 2, 2)
    assert "modality" not in fingerprint(cfg, lay)[1]["layout"]
    assert store.meta["fingerprint"] == fingerprint(cfg, lay)[0]


# --- the audit task ----------------------------------------------------------------------------
FRAMES = ["The {} car stopped at the corner.", "She painted the door {} yesterday.", "A {} balloon flew away.",
          "He wore a {} shirt to the party.", "The {} light was on all night.", "My {} cup is on the shelf."]
OTHERS = ["green", "yellow", "black", "white", "grey", "brown"]


def concept_doc(images) -> dict:
    return {"name": "red", "description": "The colour red, in images and in text (test set).",
            "positive": [f.format("red") for f in FRAMES], "negative": [f.format(o) for f, o in zip(FRAMES, OTHERS)],
            "heldout_positive": ["A red rose.", "The red flag."], "heldout_negative": ["A pink rose.", "The blue flag."],
            "concept_words": ["red"],
            "images": {"positive": [str(p) for p in images["red"]], "negative": [str(p) for p in images["blue"]]}}


def image_rows(vlm, path: Path) -> torch.Tensor:
    inp = processor_inputs(vlm, path, "", False)
    ids = torch.cat([torch.tensor([[vlm.tokenizer.bos_token_id]]), inp["input_ids"]], 1)
    x = plain_hook(vlm.model, ids, pixel_values=inp["pixel_values"])[0]
    return x[ids[0] == vlm.model.config.image_token_id]


def text_rows(vlm, text: str) -> tuple[list[int], torch.Tensor]:
    ids = [vlm.tokenizer.bos_token_id] + vlm.tokenizer(text, add_special_tokens=False).input_ids
    return ids[1:], plain_hook(vlm.model, torch.tensor([ids]))[0, 1:]


def plant(sae, feature: int, pos: list[torch.Tensor], neg: list[torch.Tensor], u: torch.Tensor) -> None:
    """Feature `feature` reads direction u, thresholded between the negatives' and the positives'
    per-item max projections."""
    top_pos = min(float((x @ u).max()) for x in pos)
    top_neg = max(float((x @ u).max()) for x in neg)
    assert top_pos > top_neg, "the planted direction must separate the items"
    threshold = (top_pos + top_neg) / 2
    with torch.no_grad():
        sae.W_enc[feature] = u / (top_pos - threshold)
        sae.b_enc[feature] = -threshold / (top_pos - threshold)


@pytest.fixture(scope="module")
def planted(vlm, images, tmp_path_factory) -> Path:
    """A relu_l1 dictionary of width 32 with an image feature (red against blue image rows) and a text
    feature (the token " red" against other colours), exported as the trainer exports."""
    cs = concept_doc(images)
    pos_img, neg_img = [image_rows(vlm, p) for p in images["red"]], [image_rows(vlm, p) for p in images["blue"]]
    u = torch.cat(pos_img).mean(0) - torch.cat(neg_img).mean(0)
    (red,) = vlm.tokenizer(" red", add_special_tokens=False).input_ids
    pos_txt = [text_rows(vlm, t) for t in cs["positive"]]
    at_red = torch.stack([x[[i for i, t in enumerate(ids) if t == red]].mean(0) for ids, x in pos_txt])
    neg_txt = [text_rows(vlm, t)[1] for t in cs["negative"]]
    v = at_red.mean(0) - torch.cat(neg_txt).mean(0)
    sae = create(SAEConfig(architecture="relu_l1", n_features=N_FEATURES, d_model=32))
    sae.reset_parameters(0)
    plant(sae, IMG_FEATURE, pos_img, neg_img, u / u.norm())
    plant(sae, TXT_FEATURE, [x for _, x in pos_txt], neg_txt, v / v.norm())
    out = tmp_path_factory.mktemp("sae") / "sae"
    save(sae, out, meta={"hook": "model.layers.2", "model": {"id": "tiny-llama"}})
    return out


def test_crossmodal_audit_cli_end_to_end(vlm_dir, tiny_model_dir, planted, images, text_dir, tmp_path):
    cs = tmp_path / "red.yaml"
    doc = concept_doc(images)
    doc["images"] = {k: [os.path.relpath(p, tmp_path) for p in v] for k, v in doc["images"].items()}  # relative
    cs.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.audit", "audit/task=crossmodal", f"input.checkpoint={planted}",
           f"task.concepts=[{cs}]", f"task.vlm.name={vlm_dir}", "task.vlm.device=cpu",
           f"input.model.name={tiny_model_dir}", "input.model.device=cpu", "task.data.source=files",
           f"task.data.path=[{text_dir}/*.txt]",
           "task.data.test_fraction=0.5", "task.n_tokens=96", "task.context_size=32", "task.batch_size=3", "task.top=3",
           f"out_dir={out}", "dashboard=null"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PIPELINE_RUNS": str(tmp_path / "runs")},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    sec = json.loads((out / "audit.json").read_text())["crossmodal"]
    assert sec["hook"] == HOOK and sec["d_model"] == 32
    for who in ("vlm", "model"):  # the VLM's text-only fit, and the LM the dictionary was trained on
        m = sec["text_only"][who]
        assert m["n_tokens_reconstruction"] > 0 and np.isfinite(m["fvu"]) and m["fvu"] > 0
        assert np.isfinite(m["ce_loss_recovered"]) and m["ce_loss"]["spliced"] > 0
    assert sec["text_only"]["vlm"]["fvu"] != sec["text_only"]["model"]["fvu"]  # two different models
    (c,) = sec["concepts"]
    assert c["image_rows"] == {"positive": [4] * 4, "negative": [4] * 4}  # 4 image tokens per image
    top_img, top_txt = c["by_image"][0], c["by_text"][0]
    assert top_img["feature"] == IMG_FEATURE and top_img["image_auroc"] == 1.0
    assert top_txt["feature"] == TXT_FEATURE and top_txt["text_auroc"] == 1.0
    assert top_img["image_neg_max"] == 0.0 < top_img["image_pos_max"]
    html = (out / "audit.html").read_text()
    assert 'id="crossmodal"' in html and f'data-list="by_image" data-feature="{IMG_FEATURE}"' in html
    assert "text-only FVU" in p.stdout


def test_text_only_figures_are_pipeline_evaluate_on_the_vlm(vlm, planted, text_dir):
    """The audit's text-only numbers are pipeline.evaluate's, with the SAE spliced into the VLM."""
    from pipeline.audit.crossmodal import attach, text_metrics
    from pipeline.analysis import InputConfig
    from pipeline.analysis.metrics import evaluate
    d = attach(str(planted), vlm)
    inp = InputConfig(checkpoint=str(planted), model=ModelConfig(name="x"), context_size=32, n_tokens=64, batch_size=2,
                      data=DataConfig(source="files", path=[f"{text_dir}/*.txt"], test_fraction=0.5, split="test"))
    ours = text_metrics(d, vlm, inp)
    theirs = evaluate(d, vlm, inp, progress=False)
    assert ours["fvu"] == theirs["fvu"] and ours["ce_loss_recovered"] == theirs["ce_loss_recovered"]
    # FVU by hand from a plain hook on the same contexts
    from pipeline.analysis.batches import context_batches, typical_rows
    x = torch.cat([plain_hook(vlm.model, ids)[:, 1:].reshape(-1, 32)
                   for ids in context_batches(inp.data, vlm.tokenizer, 32, 64, 2)])
    x = x[typical_rows(x, inp.exclude_norm_factor)]
    err = (x - d.forward(x).x_hat).pow(2).sum(1).mean()
    var = (x - x.mean(0)).pow(2).sum(1).mean()
    assert abs(ours["fvu"] - float(err / var)) < 1e-4


def test_vlm_hidden_size_different_from_the_dictionary_is_a_clear_error(planted, smollm2_dir, tmp_path):
    wide = build_vlm(tmp_path / "wide-vlm", smollm2_dir, hidden=48)
    from pipeline.analysis import InputConfig
    task = TASKS["crossmodal"].Config(vlm=ModelConfig(name=str(wide), device="cpu"), concepts=["water"])
    cfg = AuditConfig(task=task, input=InputConfig(checkpoint=str(planted)), out_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"hidden size 48.*d_model=32.*Fix: use a VLM whose language model"):
        audit(cfg)
    assert not (tmp_path / "out").exists()


def test_manifest_with_a_text_model_and_bad_manifests_fail_clearly(tiny_model_dir, images, tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    write_manifest(manifest, images)
    cfg = dict(model=ModelConfig(name=str(tiny_model_dir), device="cpu"), hooks=["layers.2"], context_size=32,
               progress=False, store=StoreConfig(url=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="is a text model. Fix: a vision-language model"):
        run(CacheConfig(manifest=str(manifest), **cfg))
    (tmp_path / "bad.jsonl").write_text('{"image": "nope.png", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"line 1: image .*nope.png.* does not exist"):
        run(CacheConfig(manifest=str(tmp_path / "bad.jsonl"), **cfg))
    (tmp_path / "bad2.jsonl").write_text('{"text": "no image"}\n')
    with pytest.raises(ConfigError, match="line 1 must be an object with a string `image`"):
        run(CacheConfig(manifest=str(tmp_path / "bad2.jsonl"), **cfg))
    assert not (tmp_path / "s").exists()


def test_image_block_longer_than_a_context_is_a_clear_error(vlm_dir, images, tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    write_manifest(manifest, images)
    with pytest.raises(ConfigError, match=r"takes \d+ tokens.*context_size=16.*Fix: raise context_size"):
        run(CacheConfig(model=ModelConfig(name=str(vlm_dir), device="cpu"), manifest=str(manifest), hooks=["layers.2"],
                        context_size=16, image_splitting=True, progress=False,
                        store=StoreConfig(url=str(tmp_path / "s"))))


def test_images_field_of_a_concept_set_is_validated(images, tmp_path):
    base = concept_doc(images)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(base))
    cs = load_concept_set(f)
    assert cs.images["positive"] == [str(p) for p in images["red"]]
    rel = dict(base, images={k: [os.path.relpath(p, tmp_path) for p in v] for k, v in base["images"].items()})
    f.write_text(yaml.safe_dump(rel))
    assert load_concept_set(f).images == cs.images  # relative to the file's folder
    bad = [({"positive": base["images"]["positive"]}, "must be a mapping with exactly the keys"),
           ({"positive": base["images"]["positive"], "negative": "x.png"}, r"images.negative' must be a list"),
           ({"positive": base["images"]["positive"][:1], "negative": base["images"]["negative"]}, "at least 2"),
           ({"positive": base["images"]["positive"], "negative": ["missing.png", "gone.png"]}, "do not exist")]
    for images_field, message in bad:
        f.write_text(yaml.safe_dump(dict(base, images=images_field)))
        with pytest.raises(ConceptSetError, match=message):
            load_concept_set(f)
    no_images = {k: v for k, v in base.items() if k != "images"}
    f.write_text(yaml.safe_dump(no_images))
    assert load_concept_set(f).images == {}


def test_other_stages_attach_a_dictionary_to_the_vlm_text_model(vlm):
    """evaluate/interpret/steer attach through Dictionary: the width check reads the VLM's text config."""
    from pipeline.analysis.dictionary import Dictionary
    d = Dictionary.attach(create(SAEConfig(architecture="relu_l1", n_features=8, d_model=32)), vlm, HOOK)
    assert d.hook == HOOK
    with pytest.raises(ConfigError, match="has d_model=48, but hook 'model.text_model.layers.2'.*outputs width 32"):
        Dictionary.attach(create(SAEConfig(architecture="relu_l1", n_features=8, d_model=48)), vlm, HOOK)
