"""`latentlab serve`: mean-pooled hidden states of a model over HTTP, as the reference's eval server.

    python -m latentlab.hidden.serve --model models/base --layers -1 --tokens 1      # or: latentlab serve ...
    curl -s localhost:8000/health
    curl -s localhost:8000/embed -d '{"prompt": "12+7="}'          # {"pooled": [[...H floats] per layer], ...}
    curl -s localhost:8000/embed -d '{"prompts": ["1+1=", "2+2="]}'  # {"pooled": [[[...]]], ...}

The same `Extractor` as the `label` stage, so a vector served equals the one in the store (up to
the float rounding of a different batch). Requests that arrive within `batch_wait_ms` of each other
are gathered by one worker thread into a single forward pass (up to `max_batch` prompts). Standard
library HTTP server, one thread per connection; binds 127.0.0.1 unless told otherwise. Bad input
gets a 4xx with {"error": "..."}: malformed JSON or fields (400), too big a body or batch (413),
a prompt that does not fit the model's context (400), an unknown path (404).
"""

import argparse
import json
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch
from pydantic import Field, ValidationError, model_validator

from latentlab.common.config import Config
from latentlab.hidden.extract import ExtractConfig, Extractor, TokenRows
from latentlab.lm.modeling import describe_model


class ServeConfig(ExtractConfig):
    model: str
    """Model directory or Hugging Face id."""
    host: str = "127.0.0.1"
    """Address to bind: loopback unless you mean to expose it."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to bind (0: any free port; the one chosen is printed)."""
    device: str = "auto"
    """'auto' (GPU when present), 'cpu', 'cuda', ..."""
    max_batch: int = Field(64, gt=0)
    """Most prompts in one forward pass, and so in one request."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long the first request of a batch waits for others to join it."""
    max_body_bytes: int = Field(1_000_000, gt=0)
    """Largest request body accepted."""
    seed: int = 0
    """Seed of the sampling stream when generating."""


class EmbedRequest(Config):
    prompt: str | None = None
    """One prompt: the answer holds one (L, H) vector list."""
    prompts: list[str] | None = Field(None, min_length=1)
    """A batch of prompts: the answer holds (B, L, H)."""

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("send exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
        return self


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Pending:
    prompts: list[str] | TokenRows  # text until the worker tokenizes it
    future: Future


class Batcher:
    """One worker thread owns the model and the tokenizer (whose Rust backend must not be shared
    between threads): it takes the first waiting request, lets others join for `wait` seconds (up
    to `max_batch` prompts), checks each, runs the good ones as one batch and answers every one."""

    def __init__(self, extractor: Extractor, max_batch: int, wait: float, generator: torch.Generator):
        self.extractor, self.max_batch, self.wait, self.generator = extractor, max_batch, wait, generator
        self.requests: queue.Queue[_Pending] = queue.Queue()
        self.served = self.batches = 0
        self._carry: _Pending | None = None
        threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    def submit(self, prompts: list[str]) -> Future:
        pending = _Pending(prompts, Future())
        self.requests.put(pending)
        return pending.future

    def _gather(self) -> list[_Pending]:
        batch = [self._carry or self.requests.get()]
        self._carry = None
        size, deadline = len(batch[0].prompts), time.monotonic() + self.wait
        while size < self.max_batch:
            try:
                item = self.requests.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if size + len(item.prompts) > self.max_batch:
                self._carry = item  # first in the next batch
                break
            batch.append(item)
            size += len(item.prompts)
        return batch

    def _fits(self, item: _Pending) -> bool:
        try:
            item.prompts = self.extractor.encode(item.prompts)
            self.extractor.check(item.prompts, list(range(len(item.prompts))))
            return True
        except ValueError as error:  # e.g. longer than the model's context
            item.future.set_exception(RequestError(HTTPStatus.BAD_REQUEST, str(error).replace("row id=", "prompt ")))
            return False

    def _loop(self) -> None:
        while True:
            batch = [item for item in self._gather() if self._fits(item)]
            if not batch:
                continue
            try:
                result = self.extractor(TokenRows.concat([item.prompts for item in batch]), self.generator)
            except Exception as error:  # answer every waiting request, keep serving
                for item in batch:
                    item.future.set_exception(error)
                continue
            self.batches += 1
            self.served += len(batch)
            start = 0
            for item in batch:
                stop = start + len(item.prompts)
                item.future.set_result(
                    {
                        "pooled": result.pooled[start:stop].tolist(),
                        "n_positions": result.counts[start:stop].tolist(),
                        **(
                            {"texts": self.extractor.decode(result.token_ids[start:stop])}
                            if result.token_ids is not None
                            else {}
                        ),
                    }
                )
                start = stop


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog; socketserver's 5 resets a burst of concurrent clients

    def __init__(self, cfg: ServeConfig, extractor: Extractor, info: dict):
        self.cfg, self.extractor, self.info = cfg, extractor, info
        self.batcher = Batcher(
            extractor,
            cfg.max_batch,
            cfg.batch_wait_ms / 1000,
            torch.Generator(device=extractor.device).manual_seed(cfg.seed),
        )
        super().__init__((cfg.host, cfg.port), Handler)

    def embed(self, body: bytes) -> dict:
        try:
            request = EmbedRequest.model_validate_json(body)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
            raise RequestError(HTTPStatus.BAD_REQUEST, problems) from None
        prompts = [request.prompt] if request.prompt is not None else request.prompts
        if len(prompts) > self.cfg.max_batch:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{len(prompts)} prompts in one request; the limit is {self.cfg.max_batch}",
            )
        answer = self.batcher.submit(prompts).result(timeout=300)
        if request.prompt is not None:
            answer = {k: v[0] for k, v in answer.items()}
        return {**answer, "layers": self.cfg.layers, "mode": self.cfg.mode}


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive, so a client can send many requests on one connection

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._reply(status, {"error": message})

    def _route(self) -> str:
        """The path without its query string or trailing slash: /health?x=1 is /health."""
        return urlsplit(self.path).path.rstrip("/")

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served; GET /health, POST /embed")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # JSON errors, not http.server's HTML page

    def do_GET(self) -> None:
        if self._route() != "/health":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; GET /health, POST /embed")
        batcher = self.server.batcher
        self._reply(
            HTTPStatus.OK, {"status": "ok", **self.server.info, "requests": batcher.served, "batches": batcher.batches}
        )

    def do_POST(self) -> None:
        if self._route() != "/embed":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; POST /embed")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        length, limit = int(length), self.server.cfg.max_body_bytes
        if length > limit:
            # read (and drop) a modest excess so the client sees the answer, not a reset connection
            if length <= 16 * limit:
                self.rfile.read(length)
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {limit}")
        try:
            self._reply(HTTPStatus.OK, self.server.embed(self.rfile.read(length)))
        except RequestError as error:
            self._error(error.status, str(error))
        except Exception as error:  # a failure of ours, said plainly
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")


def build_server(cfg: ServeConfig) -> Server:
    from latentlab.common.runtime import resolve_device
    from latentlab.lm.modeling import load_lm

    model, tokenizer = load_lm(cfg.model, resolve_device(cfg.device), dtype=getattr(torch, cfg.dtype))
    extractor = Extractor(model, tokenizer, cfg)
    sha256 = describe_model(cfg.model)["sha256"] if Path(cfg.model).is_dir() else None
    info = {
        "model": cfg.model,
        "sha256": sha256,
        "layers": cfg.layers,
        "mode": cfg.mode,
        "tokens": cfg.tokens,
        "hidden_size": extractor.hidden_size,
        "max_batch": cfg.max_batch,
    }
    return Server(cfg, extractor, info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/base", help="model directory or hub id (default: models/base)")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1], help="hidden-state indices (default: -1)")
    parser.add_argument("--tokens", type=int, default=1, help="1: prompt only; N > 1: generate N tokens")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    cfg = ServeConfig.model_validate({k: v for k, v in vars(args).items() if k in ServeConfig.model_fields})
    server = build_server(cfg)
    host, port = server.server_address[:2]
    print(
        f"latentlab serve: listening on http://{host}:{port} ({cfg.model}, {cfg.mode}, layers {cfg.layers})", flush=True
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    # the same options as `latentlab serve` (cli.py builds its subcommand from add_arguments and run)
    parser = argparse.ArgumentParser(prog="python -m latentlab.hidden.serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        run(parser.parse_args())
    except (ValueError, FileNotFoundError) as error:  # a bad option or model, in one line (ValidationError too)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
