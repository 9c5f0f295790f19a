"""`python -m latentlab.hidden.serve`: a real server on loopback, a real HTTP client, bad input, concurrency."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from latentlab.hidden.client import HiddenClient
from latentlab.hidden.extract import ExtractConfig, Extractor
from latentlab.lm.modeling import load_lm
from tests.label_fixtures import ENV, save_model

MAX_BATCH, MAX_BODY = 16, 4000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm):
    return save_model(tiny_lm, tmp_path_factory.mktemp("tiny"))


def start_server(model_dir, *args):
    command = [sys.executable, "-m", "latentlab.hidden.serve", "--model", str(model_dir), "--port", "0", *args]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, f"server did not start: {line!r}"
    return process, f"http://127.0.0.1:{int(line.split(':')[3].split(' ')[0])}"


@pytest.fixture(scope="module")
def server(model_dir):
    process, url = start_server(
        model_dir,
        "--layers",
        "1",
        "-1",
        "--max-batch",
        str(MAX_BATCH),
        "--max-body-bytes",
        str(MAX_BODY),
        "--batch-wait-ms",
        "20",
    )
    yield url
    process.terminate()
    process.wait(timeout=10)


def call(url, path, body=None):
    """(status, JSON answer) of a GET (no body) or a POST (a dict is sent as JSON, bytes as they are)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def expected(model_dir, prompts, **cfg):
    """What the library gives for `prompts` in one batch: (result, its decoded texts)."""
    model, tokenizer = load_lm(model_dir)
    extractor = Extractor(model, tokenizer, ExtractConfig(**cfg))
    result = extractor(prompts)
    return result, extractor.decode(result.token_ids) if result.token_ids is not None else []


def test_health_describes_the_model(server, model_dir):
    status, answer = call(server, "/health")
    assert status == 200 and answer["status"] == "ok"
    assert answer["layers"] == [1, -1] and answer["mode"] == "prompt" and answer["hidden_size"] == 32
    assert len(answer["sha256"]) == 64


def test_one_prompt_and_a_batch_get_the_label_stage_vectors(server, model_dir):
    prompts = ["1+2=", "13-4=", "19+19="]
    reference, _ = expected(model_dir, prompts, layers=[1, -1])
    status, one = call(server, "/embed", {"prompt": prompts[1]})
    assert status == 200 and np.array(one["pooled"]).shape == (2, 32) and one["n_positions"] == 5
    np.testing.assert_allclose(one["pooled"], reference.pooled[1].numpy(), atol=1e-5)
    status, many = call(server, "/embed", {"prompts": prompts})
    assert status == 200 and np.array(many["pooled"]).shape == (3, 2, 32)
    np.testing.assert_allclose(many["pooled"], reference.pooled.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "Invalid JSON"),
        ({"prompt": 5}, 400, "prompt: Input should be a valid string"),
        ({}, 400, "exactly one of 'prompt'"),
        ({"prompt": "1+1=", "prompts": ["2+2="]}, 400, "exactly one of 'prompt'"),
        ({"prompts": []}, 400, "at least 1 item"),
        ({"prompt": "1+1=", "layers": [0]}, 400, "layers: Extra inputs are not permitted"),
        ({"prompt": ""}, 400, "prompt 0: the prompt is empty"),
        ({"prompt": "9" * 70}, 400, "exceed the model's context of 64 positions"),
        ({"prompts": ["1+1="] * (MAX_BATCH + 1)}, 413, f"the limit is {MAX_BATCH}"),
        ({"prompt": "1" * MAX_BODY}, 413, f"the limit is {MAX_BODY}"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(server, body, status, message):
    got, answer = call(server, "/embed", body)
    assert got == status and message in answer["error"]


def test_unknown_paths_are_404(server):
    assert call(server, "/nope")[0] == 404
    assert call(server, "/nope", {"prompt": "1+1="})[0] == 404


def test_fifty_concurrent_requests_are_batched_and_each_gets_its_own_vector(server, model_dir):
    prompts = [f"{a}+{a % 7}=" for a in range(50)]
    reference = expected(model_dir, prompts, layers=[1, -1])[0].pooled.numpy()
    _, before = call(server, "/health")
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda p: call(server, "/embed", {"prompt": p}), prompts))
    assert all(status == 200 for status, _ in answers)
    np.testing.assert_allclose(np.array([a["pooled"] for _, a in answers]), reference, atol=1e-5)
    _, after = call(server, "/health")
    assert after["requests"] - before["requests"] == 50
    assert after["batches"] - before["batches"] < 50  # requests shared forward passes


def test_generation_mode_serves_texts_and_their_vectors(model_dir):
    process, url = start_server(model_dir, "--tokens", "4", "--temperature", "0")
    try:
        prompts = ["1+2=", "13-4="]
        reference, texts = expected(model_dir, prompts, tokens=4, temperature=0.0)
        status, answer = call(url, "/embed", {"prompts": prompts})
        assert status == 200 and answer["mode"] == "generate" and answer["texts"] == texts
        np.testing.assert_allclose(answer["pooled"], reference.pooled.numpy(), atol=1e-5)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_other_methods_and_queries_get_json_answers(server):
    request = urllib.request.Request(server + "/embed", data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 405 and "PUT is not served" in json.loads(error.value.read())["error"]
    assert call(server, "/health?verbose=1")[0] == 200  # the query string does not change the route


def test_characters_outside_the_vocabulary_are_refused_not_read_as_unk(server):
    status, answer = call(server, "/embed", {"prompts": ["1+2=", "1€2="]})
    assert status == 400 and "prompt 1: 1 character(s) outside the model's vocabulary" in answer["error"]


TIMEOUT, CAP = 2, 4  # the guarded server's --read-timeout (s) and --max-connections


@pytest.fixture(scope="module")
def guarded(model_dir):
    process, url = start_server(model_dir, "--read-timeout", str(TIMEOUT), "--max-connections", str(CAP))
    yield url
    process.terminate()
    process.wait(timeout=10)


def half_sent(url, sent=10):
    """A connection that sent a request's headers (Content-Length 100) and `sent` bytes of its body, then stalls."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT + 8)
    sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * sent)
    return sock


def answer(sock):
    """Everything the server sends until it closes the connection (b"" if it closes without a word)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_a_body_shorter_than_its_content_length_times_out_and_others_are_served(guarded):
    sock = half_sent(guarded)
    started = time.monotonic()
    status, one = call(guarded, "/embed", {"prompt": "1+2="})  # served while the slow client waits
    assert status == 200 and len(one["pooled"]) == 1
    try:
        reply = answer(sock)  # old server: nothing, ever (this recv timed out after 10 s)
    finally:
        sock.close()
    assert time.monotonic() - started < TIMEOUT + 3
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply
    if reply:
        assert b"Connection: close" in reply and b"did not arrive within" in reply


def test_connections_beyond_the_cap_get_503_at_once_and_service_resumes(guarded):
    held = [half_sent(guarded) for _ in range(CAP)]
    try:
        time.sleep(0.2)  # the server has accepted them (it takes connections in order anyway)
        started = time.monotonic()
        extra = socket.create_connection(held[0].getpeername(), timeout=5)
        try:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = answer(extra)
        finally:
            extra.close()
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"].startswith(f"{CAP} connections already open")
        assert time.monotonic() - started < 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while (status := call(guarded, "/health"))[0] != 200:  # the held connections' threads see them closed
        assert status[0] == 503 and time.monotonic() < deadline, f"the server did not recover: {status}"
        time.sleep(0.1)
    assert call(guarded, "/embed", {"prompt": "1+2="})[0] == 200


def test_the_client_reconnects_after_the_server_closes_an_idle_connection(guarded):
    client = HiddenClient(guarded, -1)
    try:
        first = client(["1+2="])
        time.sleep(TIMEOUT + 0.5)  # the server closes the idle keep-alive connection
        np.testing.assert_array_equal(client(["1+2="]), first)
    finally:
        client.close()
