"""A client of `latentlab serve`: pooled hidden states of batches of prompts over HTTP.

One keep-alive connection; a batch larger than the server's `max_batch` goes as several requests.
The server answers every layer it was started with; the client keeps the one asked for.
"""

import http.client
import json
from urllib.parse import urlsplit

import numpy as np


class ServerError(RuntimeError):
    """The server answered with an error, or not at all."""


class HiddenClient:
    def __init__(self, url: str, layer: int, timeout: float = 300.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"server URL {url!r}: expected http://HOST:PORT")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        self.info = self._call("GET", "/health")
        if layer not in self.info["layers"]:
            raise ValueError(f"the server at {url} serves layers {self.info['layers']}, not {layer}")
        self.layer_index = self.info["layers"].index(layer)
        self.max_batch = int(self.info["max_batch"])

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            self.connection.request(method, path, body=payload, headers=headers)
            response = self.connection.getresponse()
            answer = json.loads(response.read())
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
            self.connection.close()  # the next call reconnects
            raise ServerError(f"{method} {path}: {type(error).__name__}: {error}") from error
        if response.status != 200:
            raise ServerError(f"{method} {path}: {response.status} {answer.get('error', answer)}")
        return answer

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
