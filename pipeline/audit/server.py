"""A small OpenAI-compatible HTTP server on loopback around a transformers model: the offline
explainer and judge of the autointerp audit (by default the embedded SmolLM2-135M-Instruct).

    python -m pipeline.audit.server [--model embedded:smollm2-135m] [--port 0] [--device auto]

prints `serving <model> at http://127.0.0.1:<port>/v1` once it listens (port 0: a free one).

    GET  /v1/models             the one model served
    POST /v1/chat/completions   chat template; greedy (temperature 0) or sampled; logprobs, top_logprobs
    POST /v1/completions        plain prompt; echo + logprobs give prompt log-probabilities
                                (echo: true, max_tokens: 0, logprobs: N, as OpenAI's simulator uses)
    GET  /stats                 {"requests": POSTs received by the two routes above, "by_path": {...}}

One request runs at a time (a lock around the model); no streaming, n = 1. Bad requests get HTTP
400 with an OpenAI-style {"error": {"message", "type", "param"}} body naming the field and the fix.
"""

from __future__ import annotations

import argparse
import inspect
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from pipeline.models import ModelConfig, load_model

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs
MAX_NEW_TOKENS = 2048


class RequestError(ValueError):
    """A request the server refuses: HTTP status, message and the offending parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _int(body: dict, name: str, default, lo: int, hi: int):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"{name}={v!r} must be an integer in [{lo}, {hi}]", name)
    return v


def _temperature(body: dict) -> float:
    v = body.get("temperature", 1.0)
    v = 1.0 if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 2:
        raise RequestError(f"temperature={v!r} must be a number in [0, 2] (0: greedy)", "temperature")
    return float(v)


def _stops(body: dict) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s) or len(s) > 4:
        raise RequestError(f"stop={s!r} must be a non-empty string or a list of up to 4 of them", "stop")
    return s


def _common(body: dict) -> None:
    _int(body, "seed", None, 0, 2**63 - 1)
    if body.get("stream"):
        raise RequestError("stream=true is not supported by this server. Fix: send stream=false", "stream")
    if _int(body, "n", 1, 1, 1) != 1:
        raise RequestError("n must be 1", "n")


class Generator:
    """The model behind the endpoints. Token texts are each id decoded alone (byte pieces of a
    character show as U+FFFD), as OpenAI's `token` field."""

    def __init__(self, loaded, name: str):
        self.loaded, self.name = loaded, name
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.lock = threading.Lock()
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or 8192
        self.stop_ids = {i for i in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"),
                                     self.tok.convert_tokens_to_ids("<|endoftext|>"))
                         if isinstance(i, int) and i != self.tok.unk_token_id}
        self.texts: dict[int, str] = {}
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def text(self, i: int) -> str:
        if i not in self.texts:
            self.texts[i] = self.tok.decode([i])
        return self.texts[i]

    def _top(self, logp: torch.Tensor, n: int) -> list[tuple[str, float]]:
        """The n most likely tokens as (text, logprob), distinct texts (the likeliest id per text)."""
        out, seen = [], set()
        v, i = logp.topk(min(4 * n + 8, logp.shape[-1]))
        for lp, t in zip(v.tolist(), i.tolist()):
            s = self.text(t)
            if s not in seen:
                seen.add(s)
                out.append((s, lp))
            if len(out) == n:
                break
        return out

    def _check_len(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.max_len:
            raise RequestError(f"the prompt has {n_prompt} tokens; with max_tokens={max_tokens} that exceeds the "
                               f"model's context of {self.max_len}. Fix: shorten the prompt or lower max_tokens",
                               "max_tokens")

    @torch.no_grad()
    def _generate(self, ids: list[int], max_tokens: int, temperature: float, top_n: int, stops: list[str],
                  seed: int | None) -> tuple[list[int], list[float], list[list[tuple[str, float]]], str]:
        """Sampled (or greedy) continuation of ids: (tokens, their logprobs, top_n alternatives per
        step, finish reason), stopping at an end token, a stop string or max_tokens."""
        gen = torch.Generator(device=self.loaded.device).manual_seed(seed if seed is not None else 0)
        out_ids, lps, tops = [], [], []
        if max_tokens == 0:
            return out_ids, lps, tops, "length"
        past, logits = self._step(ids, None)
        finish = "length"
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits, -1)
            if temperature == 0:
                t = int(logp.argmax())
            else:
                t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            if t in self.stop_ids:
                finish = "stop"
                break
            out_ids.append(t)
            lps.append(float(logp[t]))
            tops.append(self._top(logp, top_n) if top_n else [])
            if stops and any(s in self.tok.decode(out_ids) for s in stops):
                finish = "stop"
                break
            past, logits = self._step([t], past)
        return out_ids, lps, tops, finish

    def _step(self, ids: list[int], past):
        """Feed ids after the cached positions: (the cache, the next-token logits)."""
        kw = {"use_cache": True, **({self.keep_kw: 1} if self.keep_kw else {})}
        if past is not None:
            kw[self.cache_kw] = past
        res = self.model(input_ids=torch.tensor([ids], device=self.loaded.device), **kw)
        cache = res.cache if "cache" in res else res.past_key_values
        return cache, res.logits[0, -1].float()

    def _cut(self, text: str, stops: list[str]) -> str:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def chat(self, body: dict) -> dict:
        _common(body)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs):
            raise RequestError("messages must be a non-empty list of {\"role\": system|user|assistant, "
                               "\"content\": string}", "messages")
        max_tokens = _int(body, "max_completion_tokens", None, 1, MAX_NEW_TOKENS) \
            or _int(body, "max_tokens", 256, 1, MAX_NEW_TOKENS)
        temperature, stops = _temperature(body), _stops(body)
        want_lp = body.get("logprobs") or False
        if not isinstance(want_lp, bool):
            raise RequestError(f"logprobs={want_lp!r} must be true or false", "logprobs")
        top_n = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top_n and not want_lp:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        text = self.tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                            tokenize=False, add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False).input_ids
        self._check_len(len(ids), max_tokens)
        with self.lock:
            out, lps, tops, finish = self._generate(ids, max_tokens, temperature, top_n, stops, body.get("seed"))
        content = self._cut(self.tok.decode(out), stops)
        lp = None
        if want_lp:
            lp = {"content": [{"token": self.text(t), "logprob": v, "bytes": list(self.text(t).encode()),
                               "top_logprobs": [{"token": s, "logprob": w, "bytes": list(s.encode())}
                                                for s, w in top]} for t, v, top in zip(out, lps, tops)]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                 "logprobs": lp, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                          "total_tokens": len(ids) + len(out)}}

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        _common(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string (or a list of exactly one)", "prompt")
        max_tokens = _int(body, "max_tokens", 16, 0, MAX_NEW_TOKENS)
        temperature, stops = _temperature(body), _stops(body)
        n_lp = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError(f"echo={echo!r} must be true or false", "echo")
        enc = self.tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc.input_ids, [s for s, _ in enc.offset_mapping]
        bos = self.tok.bos_token_id
        ctx = ([bos] if bos is not None else []) + ids  # conditions the first token; never echoed
        self._check_len(len(ctx), max_tokens)
        with self.lock:
            out, lps, tops, finish = self._generate(ctx, max_tokens, temperature, n_lp or 0, stops, body.get("seed"))
            prompt_lp = None
            if echo and n_lp is not None:
                logp = torch.log_softmax(
                    self.model(input_ids=torch.tensor([ctx], device=self.loaded.device)).logits[0].float(), -1)
                k = len(ctx) - len(ids)
                prompt_lp = [(None, None) if i + k == 0 else
                             (float(logp[i + k - 1, t]), self._top(logp[i + k - 1], n_lp)) for i, t in enumerate(ids)]
        gen_text = self._cut(self.tok.decode(out), stops)
        text = (prompt if echo else "") + gen_text
        logprobs = None
        if n_lp is not None:
            toks, tlp, top, off = [], [], [], []
            if echo:
                toks += [self.text(t) for t in ids]
                tlp += [v for v, _ in prompt_lp]
                top += [None if t is None else dict(t) for _, t in prompt_lp]
                off += offsets
            pos = len(prompt) if echo else 0
            for t, v, alt in zip(out, lps, tops):
                toks.append(self.text(t))
                tlp.append(v)
                top.append(dict(alt))
                off.append(pos)
                pos += len(self.text(t))
            logprobs = {"tokens": toks, "token_logprobs": tlp, "top_logprobs": top, "text_offset": off}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                                 "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                          "total_tokens": len(ids) + len(out)}}


def make_handler(gen: Generator, counts: dict):
    routes = {"/v1/chat/completions": gen.chat, "/v1/completions": gen.complete}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: the client logs what it needs
            pass

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param: str | None = None, kind="invalid_request_error"):
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": gen.name, "object": "model", "created": 0,
                                                             "owned_by": "pipeline"}]})
            elif path == "/stats":
                with counts["lock"]:
                    self._send(200, {"requests": counts["n"], "by_path": dict(counts["by_path"])})
            else:
                self._error(404, f"no route GET {path}; this server has GET /v1/models, GET /stats, POST "
                                 f"{', POST '.join(routes)}", kind="not_found_error")

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if path not in routes:
                return self._error(404, f"no route POST {path}; this server has POST {', POST '.join(routes)}",
                                   kind="not_found_error")
            with counts["lock"]:
                counts["n"] += 1
                counts["by_path"][path] = counts["by_path"].get(path, 0) + 1
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return self._error(400, f"the request body is not JSON ({e}). Fix: send a JSON object")
            if not isinstance(body, dict):
                return self._error(400, f"the request body must be a JSON object, got {type(body).__name__}")
            try:
                self._send(200, routes[path](body))
            except RequestError as e:
                self._error(e.status, str(e), e.param)
            except Exception as e:  # a bug or an out-of-memory: say so instead of dropping the connection
                self._error(500, f"{type(e).__name__}: {e}", kind="server_error")

    return Handler


def serve(loaded, name: str, port: int = 0) -> ThreadingHTTPServer:
    """A started server (in a daemon thread) on 127.0.0.1:port; .server_address[1] is the port."""
    counts = {"n": 0, "by_path": {}, "lock": threading.Lock()}
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(Generator(loaded, name), counts))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.audit.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m",
                   help="what pipeline.models.load_model loads: embedded:<name>, a local folder or a hub id")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one (printed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (pipeline/device.py)")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    loaded = load_model(ModelConfig(name=a.model, device=a.device, dtype=a.dtype))
    httpd = serve(loaded, a.model, a.port)
    print(f"serving {a.model} at http://127.0.0.1:{httpd.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()


if __name__ == "__main__":
    main()
