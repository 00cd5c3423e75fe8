"""The explainer/judge endpoint: any OpenAI-compatible HTTP API through the `openai` client, every
answer cached on disk.

A request is cached under sha256 of (endpoint, model, path, body) as <cache_dir>/<2 hex>/<hash>.json,
written atomically (temporary file, then rename), so a rerun makes no request it has an answer for
and a run that fails half-way resumes where it stopped. The key is read from the environment
variable named in the config, sent only as the bearer token, and never written anywhere.

With base_url=None the endpoint is `python -m pipeline.audit.server` started on 127.0.0.1 at the first
request that is not cached (a fully cached rerun starts nothing) and stopped on close(); its cache
identity is the served model's name, not its port, which changes from run to run.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import ConfigError, UserError

SERVER_START_TIMEOUT = 600.0


class EndpointError(UserError, ConnectionError):
    """The endpoint cannot be reached, or refused a request."""


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_key(endpoint: str, model: str, path: str, body: dict) -> str:
    doc = {"endpoint": endpoint, "model": model, "path": path, "body": body}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Endpoint:
    """`endpoint("chat/completions", body)` -> the answer as a dict, from the cache when it has it."""

    def __init__(self, base_url: str | None, model: str, api_key_env: str, cache_dir: str | Path,
                 timeout: float = 120.0, max_retries: int = 2, server_device: str = "cpu",
                 server_port: int = 0, server_log: str | Path | None = None):
        self.base_url = base_url.rstrip("/") if base_url else None
        self.model, self.api_key_env, self.cache_dir = model, api_key_env, Path(cache_dir)
        self.timeout, self.max_retries = timeout, max_retries
        self.server_device, self.server_port, self.server_log = server_device, server_port, server_log
        self.identity = self.base_url or f"pipeline.audit.server:{model}"
        self.hits = self.requests = 0
        self._client = None
        self._server: subprocess.Popen | None = None
        self._log = None
        if self.base_url and not is_loopback(self.base_url) and not os.environ.get(api_key_env):
            raise ConfigError(f"the endpoint {self.base_url} is not on this machine and needs a key, but the "
                              f"environment variable {api_key_env} is not set. Fix: export {api_key_env}=<your key> "
                              "(or set task.api_key_env to the variable that holds it)")

    # -- the cache ---------------------------------------------------------------------------------
    def _file(self, path: str, body: dict) -> Path:
        k = request_key(self.identity, self.model, path, body)
        return self.cache_dir / k[:2] / f"{k}.json"

    def cached(self) -> int:
        """Answers in the cache folder (of every endpoint that used it)."""
        return sum(1 for _ in self.cache_dir.glob("*/*.json")) if self.cache_dir.exists() else 0

    def __call__(self, path: str, body: dict) -> dict:
        body = {"model": self.model, **body}
        f = self._file(path, body)
        if f.exists():
            try:
                answer = json.loads(f.read_text(encoding="utf-8"))["response"]
                self.hits += 1
                return answer
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                pass  # damaged by hand or by the disk (writes are atomic): ask again and overwrite
        answer = self._post(path, body)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"endpoint": self.identity, "path": path, "request": body, "response": answer},
                                  ensure_ascii=False), encoding="utf-8")
        tmp.replace(f)
        self.requests += 1
        return answer

    # -- the network -------------------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        import openai
        client = self._connect()
        url = f"{self.base_url}/{path}"
        try:
            answer = client.post(f"/{path}", body=body, cast_to=object)
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise EndpointError(
                f"cannot reach the endpoint {url} ({type(cause).__name__}: {cause}). The {self.cached()} answers "
                f"cached so far are kept in {self.cache_dir} ({self.hits} answered from it in this run); a rerun "
                "resumes from them. Fix: start the server "
                f"(e.g. python -m pipeline.audit.server --port 8000, then task.base_url="
                f"http://127.0.0.1:8000/v1), correct task.base_url, or set task.base_url=null to let "
                "the audit start the loopback server itself") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise EndpointError(f"the endpoint {url} refused the key in ${self.api_key_env} (HTTP {e.status_code}). "
                                f"Fix: export a valid key in {self.api_key_env}") from None
        except openai.APIStatusError as e:
            raise EndpointRequestError(f"the endpoint {url} answered HTTP {e.status_code}: {_message(e)}",
                                       e.status_code) from None
        if not isinstance(answer, dict) or not answer.get("choices"):
            raise EndpointRequestError(f"the endpoint {url} answered without choices: {str(answer)[:300]}", 200)
        return answer

    def _connect(self):
        if self._client is None:
            from openai import OpenAI
            if self.base_url is None:
                self.base_url = self._start_server()
            key = os.environ.get(self.api_key_env) or "unused-on-loopback"
            for name in ("httpx", "httpx2"):  # one INFO line per request under Hydra's logging: we print our own
                logging.getLogger(name).setLevel(logging.WARNING)
            self._client = OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout,
                                  max_retries=self.max_retries)
        return self._client

    def _start_server(self) -> str:
        """python -m pipeline.audit.server on 127.0.0.1: its base URL once it listens."""
        cmd = [sys.executable, "-m", "pipeline.audit.server", "--model", self.model, "--port", str(self.server_port),
               "--device", self.server_device]
        log = self._log = open(self.server_log, "ab") if self.server_log else subprocess.DEVNULL
        print(f"starting the loopback judge: {' '.join(cmd[1:])}", flush=True)
        self._server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.time() + SERVER_START_TIMEOUT
        while time.time() < deadline:
            line = self._server.stdout.readline()
            if not line and self._server.poll() is not None:
                break
            if self.server_log:
                log.write(line.encode())
                log.flush()
            if line.startswith("serving ") and " at http://" in line:
                url = line.rsplit(" at ", 1)[1].strip()
                print(f"loopback judge {self.model} at {url}", flush=True)
                return url
        self.close()
        raise EndpointError(f"the loopback server for {self.model!r} did not start (see {self.server_log}). Fix: "
                            f"check that `python -m pipeline.audit.server --model {self.model}` runs, or point "
                            "task.base_url at a running endpoint")

    def close(self) -> None:
        if self._server is not None:
            self._server.terminate()
            try:
                self._server.wait(30)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server.stdout.close()
            self._server = None
            if self._log not in (None, subprocess.DEVNULL):
                self._log.close()
            self.base_url = None
            self._client = None

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EndpointRequestError(EndpointError):
    """The endpoint answered a request with an error (e.g. it does not support a parameter)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)
