"""`latentlab serve`: pooled hidden states of a model over HTTP, as the reference's eval server.

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

Nothing hangs: every read of a connection waits at most `read_timeout` seconds (an idle keep-alive
connection is closed after it; a body that does not arrive whole within it gets 408 and the connection
is closed), and at most `max_connections` connections are served at once: one more is answered 503
at once and closed (its client retries), so half-sent requests cannot pile up threads.
"""

import argparse
import json
import queue
import signal
import socket
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
from latentlab.hidden.extract import ExtractConfig, Extractor, TokenRows, add_pooling_argument
from latentlab.lm.modeling import describe_model
from latentlab.lm.prompt_format import RAW, PromptFormat, add_prompt_arguments, prompt_format_of


class ServeConfig(ExtractConfig):
    model: str
    """Model directory or Hugging Face id."""
    prompt: PromptFormat = RAW
    """How each prompt's text becomes ids: raw, or the tokenizer's chat template (`--prompt-format chat`)."""
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
    read_timeout: float = Field(10.0, gt=0)
    """Seconds a connection may keep the server waiting: for a request's next bytes, and for its whole body."""
    max_connections: int = Field(64, gt=0)
    """Connections served at once; one more is answered 503 at once and closed."""
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
            item.prompts = self.extractor.encode_prompts(item.prompts)
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
        self.open_connections, self.refused = 0, 0
        self._count = threading.Lock()
        self.batcher = Batcher(
            extractor,
            cfg.max_batch,
            cfg.batch_wait_ms / 1000,
            torch.Generator(device=extractor.device).manual_seed(cfg.seed),
        )
        super().__init__((cfg.host, cfg.port), Handler)

    def process_request(self, request: socket.socket, client_address) -> None:
        """A thread for the connection, or, with `max_connections` already open, a 503 at once (here, in
        the accepting thread: a few hundred bytes to a fresh socket never block) and the connection closed."""
        with self._count:
            full = self.open_connections >= self.cfg.max_connections
            if full:
                self.refused += 1
            else:
                self.open_connections += 1
        if not full:
            try:
                super().process_request(request, client_address)  # starts the thread
            except BaseException:
                self._release()
                raise
            return
        try:
            _refuse(request, self.cfg.max_connections)
        finally:
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count:
            self.open_connections -= 1

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


def _refuse(connection: socket.socket, limit: int) -> None:
    """Answer 503 on a connection that is not served, without waiting for it: what the client already
    sent is drained first (closing on unread bytes would reset the connection before it reads the answer)."""
    body = json.dumps({"error": f"{limit} connections already open; retry shortly"}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    try:
        connection.setblocking(False)
        try:
            while connection.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        connection.settimeout(1.0)
        connection.sendall(head.encode() + body)
        connection.shutdown(socket.SHUT_WR)
    except OSError:  # the client is gone already
        pass


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive, so a client can send many requests on one connection

    def setup(self) -> None:
        self.timeout = (
            self.server.cfg.read_timeout
        )  # StreamRequestHandler sets it on the socket: every read waits at most this
        super().setup()

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:  # said, so the client does not send its next request on it
            self.send_header("Connection", "close")
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
        server, batcher = self.server, self.server.batcher
        self._reply(
            HTTPStatus.OK,
            {
                "status": "ok",
                **server.info,
                "requests": batcher.served,
                "batches": batcher.batches,
                "connections": server.open_connections,  # this one included
                "refused": server.refused,  # connections answered 503 (over max_connections)
            },
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
        body = self._body(length)
        if body is None:
            return
        try:
            self._reply(HTTPStatus.OK, self.server.embed(body))
        except RequestError as error:
            self._error(error.status, str(error))
        except Exception as error:  # a failure of ours, said plainly
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")

    def _body(self, length: int) -> bytes | None:
        """The request's body, whole within `read_timeout` seconds; else a 408 (or, for a client that
        closed its end, nothing) and the connection closed: None."""
        timeout = self.server.cfg.read_timeout
        deadline, parts, got = time.monotonic() + timeout, [], 0
        try:
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                part = self.rfile.read1(min(length - got, 65536))
                if not part:  # the client closed its end: no one to answer
                    self.close_connection = True
                    return None
                parts.append(part)
                got += len(part)
        except TimeoutError:
            self.close_connection = True
            self._error(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body did not arrive within {timeout:g} s ({got} of Content-Length {length} bytes)",
            )
            return None
        finally:
            self.connection.settimeout(timeout)
        return b"".join(parts)


def build_server(cfg: ServeConfig) -> Server:
    from latentlab.common.runtime import resolve_device
    from latentlab.lm.modeling import load_lm

    model, tokenizer = load_lm(cfg.model, resolve_device(cfg.device), dtype=getattr(torch, cfg.dtype))
    extractor = Extractor(model, tokenizer, cfg, cfg.prompt)
    sha256 = describe_model(cfg.model)["sha256"] if Path(cfg.model).is_dir() else None
    info = {
        "model": cfg.model,
        "sha256": sha256,
        "layers": cfg.layers,
        "mode": cfg.mode,
        "tokens": cfg.tokens,
        "pooling": cfg.pooling,  # as a store's attributes name it (StoreAttrs): clients check they match
        "prompt": cfg.prompt.model_dump(),
        "hidden_size": extractor.hidden_size,
        "max_batch": cfg.max_batch,
        "max_connections": cfg.max_connections,
        "read_timeout": cfg.read_timeout,
    }
    return Server(cfg, extractor, info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/base", help="model directory or hub id (default: models/base)")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1], help="hidden-state indices (default: -1)")
    parser.add_argument("--tokens", type=int, default=1, help="1: prompt only; N > 1: generate N tokens")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    add_pooling_argument(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds a connection may keep the server waiting, for its next bytes or its whole body (default: 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="connections served at once; one more gets 503 at once (default: 64)",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    options = {k: v for k, v in vars(args).items() if k in ServeConfig.model_fields}
    cfg = ServeConfig.model_validate(options | {"prompt": prompt_format_of(args)})
    server = build_server(cfg)
    host, port = server.server_address[:2]
    print(
        f"latentlab serve: listening on http://{host}:{port} ({cfg.model}, {cfg.mode}, layers {cfg.layers}, "
        f"{cfg.prompt.describe()} prompts)",
        flush=True,
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
