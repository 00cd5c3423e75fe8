"""The dashboard in a real browser: Debian's chromium, headless, opening the files from file://
(no server, no network). Checks the DOM that the page's own JavaScript builds, and saves
screenshots (to $PIPELINE_TEST_ARTIFACTS when set, else the test's temporary folder)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.analysis import InputConfig
from pipeline.data import DataConfig
from pipeline.interpret import InterpretConfig, run
from pipeline.models import ModelConfig
from pipeline.sae import SAEConfig, create, save

import system_packages

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=system_packages.missing("chromium", "renders the dashboard "
                                                                                 "headless"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium(url: str, tmp: Path, *args: str) -> str:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def dash(tiny_model_dir, text_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    sae = create(SAEConfig(architecture="topk", n_features=48, d_model=32, k=4))
    sae.reset_parameters(1)
    save(sae, tmp / "sae", meta={"hook": "model.layers.1"})
    inp = InputConfig(checkpoint=str(tmp / "sae"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                      data=DataConfig(source="files", path=[str(text_dir / "*.txt")]), context_size=32,
                      n_tokens=32 * 8, batch_size=4)
    run(InterpretConfig(input=inp, top_k=6, n_samples=6, out_dir=str(tmp / "dash"),
                        crosslingual_in_dashboard=False, progress=False))
    return tmp


def artifacts(tmp: Path) -> Path:
    out = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS", tmp / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_index_renders_sorted_and_searchable(dash):
    index = (dash / "dash" / "index.html").resolve().as_uri()
    dom = chromium(index, dash, "--dump-dom")
    rows = re.findall(r'<tr class=""><td><a href="features/(\d+)\.html">\d+</a></td><td class="num">([^<]+)</td>', dom)
    assert len(rows) > 5, dom[:3000]
    densities = [float(d) for _, d in rows]
    assert densities == sorted(densities, reverse=True)  # default order: density, descending
    assert re.search(r"showing \d+ of \d+ matching features \(48 in all\)", dom)
    # the search box filters: the URL fragment fills it on load
    feature = rows[-1][0]
    dom = chromium(f"{index}#{feature}", dash, "--dump-dom")
    assert re.findall(r'<a href="features/(\d+)\.html">', dom) == [feature]
    shot = artifacts(dash) / "index.png"
    chromium(index, dash, f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_feature_page_renders_highlighted_contexts(dash):
    page = next((dash / "dash" / "features").glob("*.html"))
    dom = chromium(page.resolve().as_uri(), dash, "--dump-dom")
    top = dom[dom.index('id="top-examples"'):dom.index('id="quantiles"')]
    assert len(re.findall(r'class="ctx"', top)) >= 3
    assert re.search(r'<span class="tok max" style="background:rgba\(255,130,0,1\.00\)" title="[0-9.e-]+">', top)
    assert "<rect" in dom and "promoted" in dom and "suppressed" in dom
    shot = artifacts(dash) / "feature.png"
    chromium(page.resolve().as_uri(), dash, f"--screenshot={shot}", "--window-size=1200,1400")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
