"""audit/task=autointerp: the loopback OpenAI-compatible server (a real process serving the embedded
SmolLM2-135M-Instruct), the audit run end to end against it (then again from the cache with no
request), the scorers' arithmetic on constructed judges, and bad input (unreachable endpoint,
missing key, bad requests), with the key never written anywhere."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.analysis import InputConfig
from pipeline.audit import AuditConfig, run
from pipeline.audit.autointerp import AutointerpConfig
from pipeline.audit.autointerp.client import Endpoint, EndpointError, request_key
from pipeline.audit.autointerp.scorers import (EXPLAIN_SYSTEM, Answer, Context, binary_auroc, classification_metrics,
                                               context_loss, detection, embedding, expected_value, fuzz_marks, fuzzing,
                                               marked, parse_explanation, pearson, simulation, surprisal)
from pipeline.data import DataConfig
from pipeline.errors import ConfigError
from pipeline.models import ActivationCapture, ModelConfig, load_model
from pipeline.sae import SAEConfig, create, save

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-" + "9f3c1e7a5b" * 3  # a made-up key: it must never reach output, cache or audit.json
HOOK = "model.layers.1"
N_FEATURES = 32


def launch_server(*args: str) -> subprocess.Popen:
    """python -m pipeline.audit.server on a free loopback port, starting."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.audit.server", "--port", "0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def start_server(*args: str, p: subprocess.Popen | None = None) -> tuple[subprocess.Popen, str]:
    """The server (launched now unless given) once it listens: (process, base URL)."""
    p = p or launch_server(*args)
    for line in p.stdout:
        m = re.match(r"serving (\S+) at (http://127\.0\.0\.1:\d+/v1)$", line.strip())
        if m:
            return p, m.group(2)
    p.wait()
    raise AssertionError(f"the server exited ({p.returncode}) without serving")


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    p.wait(30)
    p.stdout.close()


def stats(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as r:
        return json.loads(r.read())["requests"]


def post(url: str, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module", autouse=True)
def launched():
    """The SmolLM2 server, launched when the module starts so that it loads while the first tests run."""
    p = launch_server()
    yield p
    if p.poll() is None:
        stop(p)


@pytest.fixture(scope="module")
def server(launched):
    return start_server(p=launched)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(ModelConfig(name=str(smollm2_dir), device="cpu"))


@pytest.fixture(scope="module")
def sparse_sae(tiny_model_dir, text_dir, tmp_path_factory) -> Path:
    """A relu_l1 SAE on the tiny model whose features fire on 2-15% of the corpus tokens (thresholds
    set at quantiles of each encoder projection), saved as an exported checkpoint."""
    from pipeline.analysis.batches import context_batches
    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    data = DataConfig(source="files", path=[str(text_dir / "*.txt")])
    ids = torch.cat(list(context_batches(data, loaded.tokenizer, 32, 2048, 8)))
    x = ActivationCapture(loaded, [HOOK])(ids)[HOOK][:, 1:].reshape(-1, 32)
    sae = create(SAEConfig(architecture="relu_l1", n_features=N_FEATURES, d_model=32))
    sae.reset_parameters(0)
    with torch.no_grad():
        proj = x @ sae.W_enc.T  # [rows, F], as relu_l1 encodes (b_dec 0)
        q = torch.linspace(0.85, 0.98, N_FEATURES)
        thr = torch.stack([proj[:, i].quantile(q[i]) for i in range(N_FEATURES)])
        sae.b_enc.copy_(-thr)
    out = tmp_path_factory.mktemp("autointerp") / "sae"
    save(sae, out, meta={"hook": HOOK, "model": {"id": str(tiny_model_dir)}})
    return out


def cli_args(tiny_model_dir, text_dir, sae: Path, out: Path, base_url: str | None, **kw) -> list[str]:
    a = {"n_features": 3, "density_strata": 3, "min_activations": 6, "n_tokens": 1024, "context_size": 32,
         "context_before": 4, "context_after": 4, "n_explain_top": 4, "n_explain_quantile": 2, "n_test": 1,
         "n_nonactivating": 1, "explain_max_tokens": 16, "max_retries": 0, "timeout": 60} | kw
    return ([f"input.model.name={tiny_model_dir}", "input.model.device=cpu", f"input.checkpoint={sae}", f"out_dir={out}", "dashboard=null",
             "audit/task=autointerp", f"task.base_url={'null' if base_url is None else base_url}",
             "task.data.source=files", f"task.data.path=[{text_dir / '*.txt'}]"]
            + [f"task.{k}={v}" for k, v in a.items()])


def config_from(args: list[str]) -> AuditConfig:
    """The same overrides through Hydra's compose API (the in-process twin of the CLI run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    ConfigStore.instance().store(name="audit_schema", node=AuditConfig)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose("audit", overrides=args))


def all_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def end_to_end(server, sparse_sae, tiny_model_dir, text_dir, tmp_path_factory):
    """The CLI against the running server, then the same run in-process from the cache."""
    proc, url = server
    out = tmp_path_factory.mktemp("ai-out")
    args = cli_args(tiny_model_dir, text_dir, sparse_sae, out, url)
    # the same thread count as this process, which runs the second pass (see assert_same_features)
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PIPELINE_RUNS": str(out / "runs")}
    before = stats(url)
    p = subprocess.run([sys.executable, "-m", "pipeline.audit", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    first = json.loads((out / "audit.json").read_text())["autointerp"]
    made = stats(url) - before
    os.environ["OPENAI_API_KEY"] = SECRET
    try:
        second = run(config_from(args))["autointerp"]
    finally:
        del os.environ["OPENAI_API_KEY"]
    return {"url": url, "out": out, "args": args, "stdout": p.stdout + p.stderr, "first": first, "second": second,
            "made": made, "after_second": stats(url) - before}


# --- bad input ---------------------------------------------------------------------------------

def test_missing_key_names_the_variable_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    cfg = AuditConfig(task=AutointerpConfig(base_url="https://judge.example.com/v1", api_key_env="MY_JUDGE_KEY"),
                      input=InputConfig(checkpoint=str(tmp_path / "no-such-sae")), out_dir=str(tmp_path))
    with pytest.raises(ConfigError) as e:
        run(cfg)  # fails on the key, not on the missing checkpoint: nothing was loaded
    assert "MY_JUDGE_KEY" in str(e.value) and "https://judge.example.com/v1" in str(e.value)
    assert "export MY_JUDGE_KEY=" in str(e.value)
    # a loopback endpoint needs no key
    Endpoint("http://127.0.0.1:9/v1", "m", "MY_JUDGE_KEY", tmp_path / "c")
    # with the key set, the remote endpoint is accepted (nothing is sent until a request)
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    Endpoint("https://judge.example.com/v1", "m", "MY_JUDGE_KEY", tmp_path / "c")


def test_bad_autointerp_config_values():
    with pytest.raises(ConfigError, match="not an http"):
        AutointerpConfig(base_url="127.0.0.1:8000/v1")
    with pytest.raises(ConfigError) as e:
        AutointerpConfig(api_key_env=SECRET)  # a key pasted where the variable's name belongs
    assert SECRET not in str(e.value) and "environment variable" in str(e.value)
    with pytest.raises(ConfigError, match="does not fit in context_size"):
        AutointerpConfig(context_size=16, context_before=12, context_after=4)
    with pytest.raises(ConfigError, match="n_test=0"):
        AutointerpConfig(n_test=0)
    with pytest.raises(ConfigError, match="task='autointerpp'.*audit/task=autointerpp"):
        AuditConfig(task="autointerpp")


def test_cache_keys_differ_by_endpoint_model_and_body():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    k = request_key("http://a/v1", "m", "chat/completions", body)
    assert k == request_key("http://a/v1", "m", "chat/completions", json.loads(json.dumps(body)))
    assert len({k, request_key("http://b/v1", "m", "chat/completions", body),
                request_key("http://a/v1", "m2", "chat/completions", body),
                request_key("http://a/v1", "m", "completions", body),
                request_key("http://a/v1", "m", "chat/completions", {"messages": []})}) == 5


def test_the_cache_answers_without_the_network_and_a_damaged_entry_is_asked_again(tmp_path):
    import socket
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = Endpoint(f"http://127.0.0.1:{port}/v1", "m", "UNSET_KEY_VAR", tmp_path, timeout=5, max_retries=0)
    body = {"messages": [{"role": "user", "content": "Is it? Yes or No?"}]}
    f = e._file("chat/completions", {"model": "m", **body})
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"endpoint": e.identity, "path": "chat/completions", "request": body,
                             "response": {"choices": [{"message": {"content": "Yes"}}]}}))
    assert e("chat/completions", body)["choices"][0]["message"]["content"] == "Yes"
    assert (e.hits, e.requests) == (1, 0)
    f.write_text('{"endpoint": "half a fi')
    with pytest.raises(EndpointError, match=f"cannot reach the endpoint http://127.0.0.1:{port}/v1/chat/completions"):
        e("chat/completions", body)
    assert f.exists() and e.requests == 0


# --- scorers on constructed judges ---------------------------------------------------------------

def constructed_contexts(n: int, seed: int = 0) -> tuple[list[Context], list[Context]]:
    """n activating contexts (1-3 active tokens of 12) and n non-activating ones."""
    g = random.Random(seed)
    act, non = [], []
    for i in range(n):
        acts = [0.0] * 12
        for t in g.sample(range(12), g.randint(1, 3)):
            acts[t] = g.uniform(0.5, 5.0)
        act.append(Context(ids=list(range(12)), tokens=[f" a{i}_{t}" for t in range(12)], acts=acts))
        non.append(Context(ids=list(range(12)), tokens=[f" n{i}_{t}" for t in range(12)], acts=[0.0] * 12,
                           kind="nonactivating"))
    return act, non


class TruthJudge:
    """Answers from the true activations."""

    def __init__(self, contexts):
        self.truth = {c.text: c for c in contexts}

    def explain(self, contexts):
        return "the truth"

    def detect(self, explanation, ctx):
        m = max(self.truth[ctx.text].acts)
        return Answer(m > 0, m / (1 + m))

    def fuzz(self, explanation, ctx, marks):
        ok = marks == self.truth[ctx.text].active
        return Answer(ok, 0.9 if ok else 0.1)

    def simulate(self, explanation, ctx):
        return [10 * a / 5.0 for a in self.truth[ctx.text].acts]


class RandomJudge:
    def __init__(self, seed):
        self.g = random.Random(seed)

    def explain(self, contexts):
        return "anything"

    def detect(self, explanation, ctx):
        p = self.g.random()
        return Answer(self.g.random() < 0.5, p)

    fuzz = lambda self, explanation, ctx, marks: self.detect(explanation, ctx)  # noqa: E731

    def simulate(self, explanation, ctx):
        return [self.g.uniform(0, 10) for _ in ctx.tokens]


def test_a_judge_answering_from_the_true_activations_scores_one():
    act, non = constructed_contexts(50)
    judge = TruthJudge(act + non)
    for r in (detection(judge, "x", act, non), fuzzing(judge, "x", act, non, random.Random(0))):
        assert r["balanced_accuracy"] == 1.0 and r["f1"] == 1.0 and r["auroc"] == 1.0 and r["n"] == 100, r
    s = simulation(judge, "x", act, non)
    assert s["score"] == pytest.approx(1.0) and s["score_max"] == pytest.approx(1.0) and s["n_tokens"] == 1200


def test_a_judge_answering_at_random_scores_about_one_half():
    act, non = constructed_contexts(1000)
    judge = RandomJudge(0)
    for r in (detection(judge, "x", act, non), fuzzing(judge, "x", act, non, random.Random(0))):
        assert abs(r["balanced_accuracy"] - 0.5) < 0.03 and abs(r["auroc"] - 0.5) < 0.03, r
        assert abs(r["f1"] - 0.5) < 0.04
    assert abs(simulation(judge, "x", act, non)["score"]) < 0.03  # chance correlation is 0
    # the metrics themselves on a hand-checked case: tp 2, fn 1, tn 3, fp 1
    m = classification_metrics([True, True, True, False, False, False, False],
                               [Answer(True, .9), Answer(True, .8), Answer(False, .3), Answer(False, .1),
                                Answer(None, .2), Answer(False, .4), Answer(True, .7)])
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2) and m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["n_unparsed"] == 1
    assert m["auroc"] == pytest.approx(10 / 12)  # 0.3 is below 0.4 and 0.7: 10 of 12 pairs ordered
    assert classification_metrics([True, False], [Answer(True, None), Answer(False, 0.1)])["auroc"] is None
    assert binary_auroc([1.0], []) is None and pearson([1, 1, 1], [1, 2, 3]) is None


def test_fuzzing_marks_as_many_random_tokens_as_the_activating_contexts_have():
    act, non = constructed_contexts(20, seed=3)
    marks = fuzz_marks(act, non, random.Random(0))
    k = math.ceil(sum(sum(c.active) for c in act) / len(act))
    assert all(sum(m) == k for m in marks) and len(marks) == 20
    assert marked([" a", " b", " c", " d"], [False, True, True, False]) == " a<< b c>> d"
    assert marked(["x", "y"], [True, False]) == "<<x>>y" and marked(["x", "y"], [False, True]) == "x<<y>>"


def test_parsing_the_judges_answers():
    assert parse_explanation("Sure!\n[EXPLANATION]: \"words about water\"\nmore") == "words about water"
    assert parse_explanation("\n  animals and pets\n") == "animals and pets"
    assert parse_explanation("") == "(no explanation)" and parse_explanation("<<") == "(no explanation)"
    assert parse_explanation("<<Leg>>ge del Lavoro") == "Legge del Lavoro"
    assert expected_value({"3": math.log(0.5), " 7": math.log(0.25), "x": math.log(0.25)}) == pytest.approx(
        (3 * 0.5 + 7 * 0.25) / 0.75)
    assert expected_value({"10": 0.0, "a": -1.0}) == 10.0 and expected_value({"a": 0.0}) == 0.0


def test_surprisal_and_embedding_separate_contexts_the_explanation_describes(smollm2):
    """The local scorers on a clear case: contexts about the explanation's subject against others."""
    loaded = smollm2
    tok = loaded.tokenizer
    on = ["The zebra has black and white stripes.", "A herd of zebras crossed the river.",
          "Zebras live on the African savanna.", "The striped zebra grazed near the lions."]
    off = ["The bank raised its interest rates today.", "She compiled the program with gcc.",
           "The train to Berlin was late again.", "He paid the invoice by credit card."]

    def ctx(text, kind):
        ids = tok(" " + text, add_special_tokens=False).input_ids
        return Context(ids=ids, tokens=[tok.decode([i]) for i in ids], acts=[1.0 if kind == "a" else 0.0] * len(ids))
    act, non = [ctx(t, "a") for t in on], [ctx(t, "n") for t in off]
    s = surprisal(loaded, "zebras, the striped African animals", act, non)
    assert s["auroc"] >= 0.9 and s["mean_gain_activating"] > s["mean_gain_nonactivating"], s
    # the loss is the model's own: recomputed by hand for one context
    ids = [tok.bos_token_id] + tok("zebras\n", add_special_tokens=False).input_ids + act[0].ids
    with torch.no_grad():
        lp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    n_pre = len(ids) - len(act[0].ids)
    want = -lp[torch.arange(n_pre - 1, len(ids) - 1), torch.tensor(ids[n_pre:])].mean()
    assert context_loss(loaded, "zebras", act[:1])[0] == pytest.approx(float(want), abs=1e-4)
    from pipeline.audit.autointerp.run import load_embedder
    e = embedding(load_embedder(), "zebras, the striped African animals", act, non)
    assert e["auroc"] == 1.0 and e["mean_cosine_activating"] > e["mean_cosine_nonactivating"], e


# --- the server's protocol ---------------------------------------------------------------------

def test_server_answers_chat_and_echoed_completions_with_correct_logprobs(server, smollm2):
    url = server[1]
    with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "embedded:smollm2-135m"
    code, a = post(url, "chat/completions", {"model": "x", "messages": [
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 3})
    assert code == 200, a
    c = a["choices"][0]
    assert "Paris" in c["message"]["content"]
    lp = c["logprobs"]["content"]
    assert len(lp) == a["usage"]["completion_tokens"] and len(lp[0]["top_logprobs"]) == 3
    assert lp[0]["logprob"] == max(t["logprob"] for t in lp[0]["top_logprobs"])  # greedy takes the top token
    # echoed prompt log-probabilities equal a plain forward pass of the same model
    prompt = "The cat sat on the mat.\tunknown\n"
    code, a = post(url, "completions", {"model": "x", "prompt": prompt, "max_tokens": 0, "echo": True,
                                        "logprobs": 5})
    assert code == 200, a
    lp = a["choices"][0]["logprobs"]
    assert a["choices"][0]["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert [prompt[o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    loaded = smollm2
    ids = loaded.tokenizer(prompt, add_special_tokens=False).input_ids
    ctx = torch.tensor([[loaded.tokenizer.bos_token_id] + ids])
    with torch.no_grad():
        ref = torch.log_softmax(loaded.model(input_ids=ctx).logits[0, :-1].float(), -1)
    want = ref[torch.arange(len(ids)), torch.tensor(ids)]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), want, atol=2e-3, rtol=0)
    assert len(lp["top_logprobs"][3]) == 5 and max(lp["top_logprobs"][3].values()) >= lp["token_logprobs"][3]
    # sampling with a seed is reproducible
    body = {"model": "x", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    assert post(url, "completions", body)[1]["choices"][0]["text"] == post(url, "completions", body)[1]["choices"][0]["text"]


@pytest.mark.parametrize("path,body,status,needle", [
    ("chat/completions", b"{not json", 400, "not JSON"),
    ("chat/completions", b"[1, 2]", 400, "JSON object"),
    ("chat/completions", {"model": "x"}, 400, "messages must be"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "logprobs=true"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ("completions", {"prompt": "hi", "seed": "7"}, 400, "seed='7'"),
    ("completions", {"prompt": ""}, 400, "prompt must be"),
    ("completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs=99"),
    ("completions", {"prompt": "hi " * 9000, "max_tokens": 0}, 400, "context"),
    ("embeddings", {"input": "hi"}, 404, "no route"),
])
def test_server_refuses_bad_requests_with_clear_json_errors(server, path, body, status, needle):
    code, a = post(server[1], path, body)
    assert code == status and needle in a["error"]["message"], a


def test_an_endpoint_that_refuses_prompt_logprobs_leaves_simulation_out(server, tmp_path):
    """A refused echo + logprobs request (here: more top log-probabilities than the server gives)
    turns simulation off with the endpoint's reason, instead of failing the run."""
    from pipeline.audit.autointerp.scorers import EndpointJudge
    judge = EndpointJudge(Endpoint(server[1], "m", "UNSET_KEY_VAR", tmp_path, max_retries=0), top_logprobs=25)
    act, non = constructed_contexts(1)
    r = simulation(judge, "anything", act, non)
    assert r == {"score": None, "reason": "the endpoint returned no prompt log-probabilities"}
    assert "HTTP 400" in judge.simulation_error and "logprobs=25" in judge.simulation_error
    assert judge.simulate("anything", act[0]) is None  # not asked again


# --- end to end against the loopback server ----------------------------------------------------

def test_autointerp_runs_end_to_end_against_the_loopback_server(end_to_end):
    sec, made = end_to_end["first"], end_to_end["made"]
    assert sec["judge"]["model"] == "embedded:smollm2-135m" and sec["judge"]["plumbing_check"] is True
    assert "plumbing check, not a quality judgement" in sec["note"]
    assert sec["selection"].startswith("stratified by density") and len(sec["features"]) == 3
    assert len({f["stratum"] for f in sec["features"]}) == 3  # one feature from each density group
    assert sec["requests"]["made"] == made > 0 and sec["requests"]["from_cache"] == 0
    n_files = len(list(Path(sec["requests"]["cache_dir"]).glob("*/*.json")))
    assert n_files == made
    for f in sec["features"]:
        assert f["n_test"] == 1 and f["n_nonactivating"] == 1
        for scorer in ("detection", "fuzzing"):
            s = f[scorer]
            assert 0 <= s["balanced_accuracy"] <= 1 and 0 <= s["f1"] <= 1 and s["n"] == 2 and s["n_positive"] == 1
            assert s["n_with_probability"] == 2 and 0 <= s["auroc"] <= 1  # the server returns logprobs
        n_tok = sum(len(c["tokens"]) for c in f["examples"]["test"] + f["examples"]["nonactivating"])
        assert f["simulation"]["n_tokens"] == n_tok and -1 <= f["simulation"]["score"] <= 1
        assert 0 <= f["surprisal"]["auroc"] <= 1 and len(f["surprisal"]["loss_neutral"]) == 2
        assert 0 <= f["embedding"]["auroc"] <= 1
        # the explainer saw contexts with the feature active; the non-activating ones are all zero
        assert all(max(c["acts"]) > 0 for c in f["examples"]["explain"] + f["examples"]["test"])
        assert all(max(c["acts"]) == 0 for c in f["examples"]["nonactivating"])
        shown = {tuple(c["tokens"]) for c in f["examples"]["explain"]}
        assert not shown & {tuple(c["tokens"]) for c in f["examples"]["test"]}  # held out
    # per feature: 1 explanation + 2 detection + 2 fuzzing + 2 simulation requests
    assert made == 3 * (1 + 2 + 2 + 2)
    assert sec["summary"]["detection.balanced_accuracy"]["n"] == 3
    # each explanation is the judge's answer to one explain request, as cached
    answers = [json.loads(p.read_text()) for p in Path(sec["requests"]["cache_dir"]).glob("*/*.json")]
    explained = [parse_explanation(e["response"]["choices"][0]["message"]["content"]) for e in answers
                 if e["path"] == "chat/completions" and e["request"]["messages"][0]["content"] == EXPLAIN_SYSTEM]
    assert sorted(explained) == sorted(f["explanation"] for f in sec["features"])
    page = (end_to_end["out"] / "audit.html").read_text()
    assert 'id="autointerp"' in page and 'id="plumbing-note"' in page
    assert all(f'data-feature="{f["feature"]}"' in page for f in sec["features"])
    assert "http://" not in page.replace(end_to_end["url"], "")  # only the endpoint's own address


def test_a_second_run_answers_from_the_cache_and_makes_no_request(end_to_end):
    first, second = end_to_end["first"], end_to_end["second"]
    assert end_to_end["after_second"] == end_to_end["made"]  # the server saw no new request
    assert second["requests"]["made"] == 0 and second["requests"]["from_cache"] == end_to_end["made"]
    assert_same_features(first["features"], second["features"])


LOCAL_SCORERS = ("surprisal", "embedding")


def assert_same_features(a: list[dict], b: list[dict]) -> None:
    """Contexts, explanations and every judge-derived score are equal. The local scorers' values are
    recomputed in each run by a forward pass of the base LM (surprisal) or the embedder, and CPU
    kernels round differently with another thread count: when the CLI run had 1 thread and this
    process 2, a mean loss differed in its last float32 bit (10.898211 vs 10.898212) although the
    cache replayed every answer. Both runs now use the same thread count (equal bit for bit); the
    local values alone keep a tolerance of a few float32 ulps of a ~10 loss, in case they do not."""
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        assert {k: v for k, v in fa.items() if k not in LOCAL_SCORERS} == \
            {k: v for k, v in fb.items() if k not in LOCAL_SCORERS}
        for k in LOCAL_SCORERS:
            assert (k in fa) == (k in fb)
            if k in fa:
                assert_close_json(fa[k], fb[k], f"{k}")


def assert_close_json(x, y, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_close_json(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_close_json(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-5), f"{where}: {x} vs {y}"
    else:
        assert x == y, f"{where}: {x!r} vs {y!r}"


def test_the_key_never_reaches_output_cache_or_audit_json(end_to_end):
    out = end_to_end["out"]
    assert SECRET not in end_to_end["stdout"]
    text = all_text(out)
    assert "autointerp" in text and "chat/completions" in text  # the cache and audit.json were read
    assert SECRET not in text
    # what the cache holds: the request body and the answer, no header
    entry = json.loads(next(Path(end_to_end["first"]["requests"]["cache_dir"]).glob("*/*.json")).read_text())
    assert set(entry) == {"endpoint", "path", "request", "response"}


def test_unreachable_endpoint_fails_clearly_and_keeps_the_cached_answers(end_to_end, server, sparse_sae,
                                                                        tiny_model_dir, text_dir):
    proc, url = server
    stop(proc)  # the endpoint goes away; its answers stay cached
    cache = Path(end_to_end["first"]["requests"]["cache_dir"])
    kept = sorted(p.name for p in cache.glob("*/*.json"))
    # one non-activating context more per feature: the first feature's explanation and its 2 cached
    # detection answers come from the cache, the 3rd detection request goes to the endpoint
    cfg = config_from(cli_args(tiny_model_dir, text_dir, sparse_sae, end_to_end["out"], url, n_nonactivating=2))
    with pytest.raises(EndpointError) as e:
        run(cfg)
    msg = str(e.value)
    assert f"cannot reach the endpoint {url}/chat/completions" in msg and "Fix" in msg, msg
    assert "python -m pipeline.audit.server" in msg and "task.base_url" in msg
    assert f"{len(kept)} answers cached so far are kept in {cache}" in msg and "3 answered from it in this run" in msg
    assert isinstance(e.value, ConnectionError)
    assert sorted(p.name for p in cache.glob("*/*.json")) == kept
    assert not list(cache.glob("*/*.tmp*"))  # no half-written answer


def test_the_default_starts_and_stops_its_own_loopback_server(sparse_sae, tiny_model_dir, text_dir, tmp_path):
    """task.base_url=null: the run starts pipeline.audit.server itself (here serving the tiny
    random model, to keep the test short), stops it, and a rerun from the cache starts nothing."""
    args = cli_args(tiny_model_dir, text_dir, sparse_sae, tmp_path, None, n_features=2, density_strata=2,
                    embedding="false", judge_model=str(tiny_model_dir))
    sec = run(config_from(args))["autointerp"]
    assert sec["judge"] == {"base_url": "loopback: python -m pipeline.audit.server", "model": str(tiny_model_dir),
                            "plumbing_check": False}
    assert sec["note"] is None  # the SmolLM2 caveat is for SmolLM2
    # (the random model explains both features alike, so requests both share come from the cache)
    assert sec["requests"]["made"] + sec["requests"]["from_cache"] == 2 * (1 + 2 + 2 + 2)
    log = (tmp_path / "autointerp_server.log").read_text()
    assert f"loaded {tiny_model_dir}" in log and "serving" in log
    # the server it started (python -m pipeline.audit.server --model ...) is gone
    running = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "pipeline.audit.server --model"],
                             capture_output=True, text=True)
    assert running.returncode == 1 and not running.stdout.strip()
    again = run(config_from(args))["autointerp"]
    assert again["requests"] == {"made": 0, "from_cache": 14, "cache_dir": sec["requests"]["cache_dir"]}
    assert (tmp_path / "autointerp_server.log").read_text() == log  # no second server was started
    assert_same_features(again["features"], sec["features"])
    assert "embedding" not in sec["features"][0]
