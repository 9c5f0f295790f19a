"""A client of `latentlab serve`: pooled hidden states of batches of prompts over HTTP.

One keep-alive connection; a batch larger than the server's `max_batch` goes as several requests.
The server answers every layer it was started with; the client keeps the one asked for. The server
closes a connection idle for its `--read-timeout`: a request that finds it closed is sent again on a
new one, once. A server at its `--max-connections` answers 503: the request is retried after the
Retry-After it gives, for up to `busy_wait` seconds.
"""

import http.client
import json
import time
from urllib.parse import urlsplit

import numpy as np


class ServerError(RuntimeError):
    """The server answered with an error, or not at all."""


class HiddenClient:
    def __init__(self, url: str, layer: int, timeout: float = 300.0, busy_wait: float = 60.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"server URL {url!r}: expected http://HOST:PORT")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        self.busy_wait = busy_wait
        self.info = self._call("GET", "/health")
        if layer not in self.info["layers"]:
            raise ValueError(f"the server at {url} serves layers {self.info['layers']}, not {layer}")
        self.layer_index = self.info["layers"].index(layer)
        self.max_batch = int(self.info["max_batch"])

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        deadline = time.monotonic() + self.busy_wait
        while True:
            response, answer = self._send(method, path, body)
            if response.status == 503 and time.monotonic() < deadline:  # busy: every connection is taken
                time.sleep(min(float(response.getheader("Retry-After") or 1), max(0.0, deadline - time.monotonic())))
                continue
            if response.status != 200:
                raise ServerError(f"{method} {path}: {response.status} {answer.get('error', answer)}")
            return answer

    def _send(self, method: str, path: str, body: dict | None) -> tuple[http.client.HTTPResponse, dict]:
        """One request and its answer; sent again once on a new connection if the kept one was closed."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            reused = self.connection.sock is not None
            try:
                self.connection.request(method, path, body=payload, headers=headers)
                response = self.connection.getresponse()
                answer = json.loads(response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as error:
                self.connection.close()  # closed by the server while idle: reconnect
                if reused and attempt == 1:
                    continue
                raise ServerError(f"{method} {path}: {type(error).__name__}: {error}") from error
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
                self.connection.close()  # the next call reconnects
                raise ServerError(f"{method} {path}: {type(error).__name__}: {error}") from error
            if response.will_close:
                self.connection.close()
            return response, answer

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """`(B, H)` float32: the pooled state of the chosen layer for each prompt."""
        parts = [
            self._call("POST", "/embed", {"prompts": prompts[i : i + self.max_batch]})["pooled"]
            for i in range(0, len(prompts), self.max_batch)
        ]
        pooled = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])  # (B, L, H)
        return pooled[:, self.layer_index]

    def close(self) -> None:
        self.connection.close()
