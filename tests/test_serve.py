"""fundamentallm serve: the real server in a subprocess, driven by the official openai client, raw HTTP, and a real
headless browser for the playground."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import openai
import pytest
import torch
from helpers import ROOT, TINY_MODEL, assert_clean_error, run_cli, train_tiny

from fundamentallm.checkpoint import _checksum
from fundamentallm.config import ModelConfig
from fundamentallm.generate import DecodeBatch, Sampling, TextStream
from fundamentallm.logprobs import Tracker, token_text
from fundamentallm.model import GPT
from fundamentallm.tokenizer import ByteTokenizer

KEY = "test-key-123"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
READY_DEADLINE = 120  # seconds: generous, the machine may be busy; the wait ends as soon as the server answers


class Server:
    """`python -m fundamentallm serve CHECKPOINT --port 0 ...` as a subprocess; the port is the one it announces."""

    def __init__(self, checkpoint: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fundamentallm", "serve", str(checkpoint), "--port", "0", "--device", "cpu",
                 *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True)  # its own process group, as a terminal gives a command
        self.port = self._wait_ready()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log.read_text()}"
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", self.log.read_text())
            if found:
                try:
                    status, body = request(int(found.group(1)), "GET", "/health")
                    if status == 200 and body["status"] == "ok":
                        return int(found.group(1))
                except OSError:
                    pass
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"server not ready after {READY_DEADLINE} s:\n{self.log.read_text()}")

    def health(self) -> dict:
        return request(self.port, "GET", "/health")[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One raw HTTP request; the status and the JSON answer."""
    if isinstance(body, dict):
        body = json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("serve-model")
    text = tmp / "alice.txt"
    text.write_text((ROOT / "examples" / "alice.txt").read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp / "token-cache"))
        train_tiny(text, tmp / "run", "--epochs", "1")
    return tmp / "run" / "best_model.pt"


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module, its key given through the environment variable."""
    running = Server(checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log",
                     env={"FUNDAMENTALLM_API_KEY": KEY})
    yield running
    running.stop()


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def complete(client: openai.OpenAI, **params) -> str:
    return client.completions.create(model="m", **params).choices[0].text


def stream(client: openai.OpenAI, **params) -> tuple[list[str], str | None]:
    """The streamed pieces of one choice, and its finish_reason."""
    pieces, finish = [], None
    for chunk in client.completions.create(model="m", stream=True, **params):
        choice = chunk.choices[0]
        pieces += [choice.text] if choice.text else []
        finish = choice.finish_reason or finish
    return pieces, finish


def test_openai_client_plain_and_streamed(server: Server, client: openai.OpenAI, checkpoint: Path) -> None:
    assert [m.id for m in client.models.list().data] == [str(checkpoint)]
    result = client.completions.create(model=str(checkpoint), prompt="Alice", max_tokens=30, seed=5)
    text = result.choices[0].text
    assert len(text) == 30 and result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 30)
    # The same sampler as `fundamentallm generate`: the same seed gives the same text.
    cli = run_cli("generate", checkpoint, "--prompt", "Alice", "--max-tokens", "30", "--seed", "5",
                  "--temperature", "1.0", "--device", "cpu")
    assert cli.stdout == f"Alice{text}\n"

    pieces, finish = stream(client, prompt="Alice", max_tokens=30, seed=5)
    assert len(pieces) > 1 and "".join(pieces) == text and finish == "length"

    both = client.completions.create(model="m", prompt="Alice", max_tokens=30, seed=5, n=2).choices
    assert both[0].text == text and both[1].text == complete(client, prompt="Alice", max_tokens=30, seed=6)

    stop = text[10:12]
    stopped = client.completions.create(model="m", prompt="Alice", max_tokens=30, seed=5, stop=[stop]).choices[0]
    assert stopped.text == text[:text.find(stop)] and stopped.finish_reason == "stop"
    assert "".join(stream(client, prompt="Alice", max_tokens=30, seed=5, stop=stop)[0]) == stopped.text

    greedy = complete(client, prompt="Alice", max_tokens=20, temperature=0)
    assert complete(client, prompt="Alice", max_tokens=20, seed=1, extra_body={"top_k": 1}) == greedy


def test_api_key_is_required(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, body = request(server.port, "POST", "/v1/completions", {"prompt": "A"}, headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    assert request(server.port, "GET", "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(("body", "status", "param", "needle"), [
    ('{"prompt": "Alice",', 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "JSON object"),
    ({"prompt": "Alice " * 20}, 400, "prompt", "context holds 32"),
    ({"prompt": "A", "max_tokens": 100_000}, 400, "max_tokens", "4096"),
    ({"prompt": "A", "max_tokens": 0}, 400, "max_tokens", "echo"),
    ({"prompt": "A", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ({"prompt": [5, 100_000]}, 400, "prompt", "token ids"),
    ({"prompt": "A" * 70_000, "echo": True, "logprobs": 0, "max_tokens": 0}, 400, "prompt", "at most 65,536"),
    ({"prompt": "A", "temperature": -1}, 400, "temperature", "greater than"),
    ({"prompt": "A", "temperature": "hot"}, 400, "temperature", "number"),
    ({"prompt": "A", "top_p": 0}, 400, "top_p", "greater than"),
    ({"prompt": "A", "n": 17}, 400, "n", "16"),
    ({"prompt": ["A"] * 9, "n": 2}, 400, "prompt", "16"),
    ({"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "A", "best_of": 3}, 400, "best_of", "not supported"),
    ('{"prompt": "A", "temperature": NaN}', 400, "temperature", "finite"),
    ("x" * 1_100_000, 413, None, "larger than"),
])
def test_bad_requests_get_openai_errors(server: Server, body: str | dict, status: int, param: str | None,
                                        needle: str) -> None:
    got, answer = request(server.port, "POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param
    assert needle in answer["error"]["message"]


def test_server_survives_bad_requests(server: Server, client: openai.OpenAI) -> None:
    assert request(server.port, "GET", "/no/such/page")[1]["error"]["message"] == "Not Found"
    # A body that lies about its length, then a connection dropped half-way through a body.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b"Content-Length: 9999999999\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b"Content-Length: 500\r\n\r\n{\"prompt\":")
    assert len(complete(client, prompt="Alice", max_tokens=5)) == 5


def streamed_logprobs(client: openai.OpenAI, **params) -> tuple[str, list[str], list[float]]:
    """A streamed choice's text, and its tokens and their log-probabilities as the chunks carried them."""
    text, tokens, logprobs = "", [], []
    for chunk in client.completions.create(model="m", stream=True, logprobs=0, **params):
        choice = chunk.choices[0]
        text += choice.text or ""
        if choice.logprobs:
            tokens += choice.logprobs.tokens
            logprobs += choice.logprobs.token_logprobs
    return text, tokens, logprobs


def test_concurrent_streams_get_the_text_they_get_alone(server: Server, client: openai.OpenAI) -> None:
    """What docs/serve.md promises: a stream served beside others gets the log-probabilities it gets alone (within
    1e-4), so the same text up to a token that float rounding may, rarely, sample otherwise."""
    params = [{"prompt": prompt, "max_tokens": 80, "seed": seed, "temperature": 0.9, "top_p": 0.95}
              for seed, prompt in enumerate(["Alice", "The", "", "she", "said", "Alice was", "A", "Rabbit"])]
    alone = [streamed_logprobs(client, **p) for p in params]
    together: list = [None] * len(params)
    start = threading.Barrier(len(params))

    def run(i: int) -> None:
        start.wait()
        together[i] = streamed_logprobs(client, **params[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(params))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    whole = 0
    for (text, tokens, logprobs), (text_t, tokens_t, logprobs_t) in zip(alone, together, strict=True):
        assert "".join(tokens_t) == text_t and len(text_t) == 80  # the stream's text is its tokens
        same = next((i for i, (a, t) in enumerate(zip(tokens, tokens_t, strict=True)) if a != t), len(tokens))
        assert all(abs(a - t) <= 1e-4 for a, t in zip(logprobs[:same], logprobs_t[:same], strict=True))
        whole += text_t == text
    # A rounding difference that changes a sampled token is rare: batching that breaks streams changes most.
    assert whole >= len(params) - 1


def wait_idle(server: Server) -> dict:
    deadline = time.monotonic() + 60
    while (health := server.health())["active"] or health["waiting"]:
        assert time.monotonic() < deadline, f"requests still running: {health}"
        time.sleep(0.1)
    return health


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_frees_its_slot(server: Server, streamed: bool) -> None:
    before = wait_idle(server)["tokens_generated"]
    seen = len(server.log.read_text())
    body = json.dumps({"prompt": "Alice", "max_tokens": 4096, "stream": streamed}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        if streamed:  # read until the first event: generation is under way
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(4096)
                assert chunk, f"connection closed before any event: {received!r}"
                received += chunk
        else:
            deadline = time.monotonic() + 60
            while server.health()["active"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    # Gone long before 4,096 tokens: the job was cancelled, not run to the end.
    assert wait_idle(server)["tokens_generated"] - before < 4096
    # One line in the server's log says so (and no traceback).
    log = server.log.read_text()[seen:]
    assert log.count("cancelled before its end") == 1 and "Traceback" not in log, log


def test_sigterm_finishes_in_flight_requests_and_frees_the_port(checkpoint: Path, tmp_path: Path) -> None:
    server = Server(checkpoint, tmp_path / "server.log")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    first_piece, result = threading.Event(), {}

    def run() -> None:
        pieces = []
        for chunk in client.completions.create(model="m", prompt="Alice", max_tokens=300, stream=True):
            pieces.append(chunk.choices[0].text)
            first_piece.set()
            result["finish"] = chunk.choices[0].finish_reason or result.get("finish")
        result["text"] = "".join(pieces)

    thread = threading.Thread(target=run)
    thread.start()
    assert first_piece.wait(timeout=120)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert len(result["text"]) == 300 and result["finish"] == "length"  # the request in flight finished
    # uvicorn re-raises the signal after a clean shutdown: the process ends as terminated by SIGTERM.
    assert server.proc.wait(timeout=60) == -signal.SIGTERM
    assert "Finished server process" in (tmp_path / "server.log").read_text()
    with socket.socket() as sock:  # as a server binds (closed connections may linger in TIME_WAIT), and listens:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # Linux refuses this while anything listens
        sock.bind(("127.0.0.1", server.port))
        sock.listen()


def test_unseen_characters_are_the_unknown_token_as_in_generate(client: openai.OpenAI, checkpoint: Path) -> None:
    served = complete(client, prompt="Alice €", max_tokens=20, seed=5)
    cli = run_cli("generate", checkpoint, "--prompt", "Alice €", "--max-tokens", "20", "--seed", "5",
                  "--temperature", "1.0", "--device", "cpu")
    assert cli.exit_code == 0 and cli.stdout == f"Alice €{served}\n"


def test_a_request_that_can_never_fit_and_ctrl_c_while_streaming(checkpoint: Path, tmp_path: Path) -> None:
    server = Server(checkpoint, tmp_path / "server.log", "--slots", "1")  # queues 4 completions at most
    try:
        status, body = request(server.port, "POST", "/v1/completions", {"prompt": "A", "n": 5})
        assert status == 400 and body["error"]["param"] == "n" and "--slots" in body["error"]["message"], body
        status, body = request(server.port, "POST", "/v1/completions", {"prompt": "A", "n": 4, "max_tokens": 3})
        assert status == 200 and len(body["choices"]) == 4  # an idle server takes what fits: never a 503
        # Ctrl-C while a long answer streams: the server stops without a traceback, ended by the signal.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model="m", prompt="Alice", max_tokens=4096, stream=True)
        next(iter(answer))
        engine = children(server.proc.pid)
        os.killpg(server.proc.pid, signal.SIGINT)  # as a terminal sends it: to the server and its engine process
        assert server.proc.wait(timeout=120) == -signal.SIGINT
        answer.close()
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "Finished server process" in log, log
    assert engine and all(wait_gone(pid) for pid in engine), "the engine's process outlived the server"


def test_sigterm_to_the_process_group_lets_a_request_in_flight_finish(checkpoint: Path, tmp_path: Path) -> None:
    """As a service manager stops a server (SIGTERM to every process of the group): the engine's process waits
    for the server, so the request streaming meanwhile gets its whole answer; the server ends by the signal."""
    server = Server(checkpoint, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = iter(client.completions.create(model="m", prompt="Alice", max_tokens=200, seed=3, stream=True))
        first = next(answer)
        os.killpg(server.proc.pid, signal.SIGTERM)
        chunks = [first, *answer]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(chunk.choices[0].text for chunk in chunks) == run_cli(
            "generate", checkpoint, "--prompt", "Alice", "--max-tokens", "200", "--seed", "3", "--temperature", "1.0",
            "--device", "cpu").stdout[len("Alice"):-1]
        assert server.proc.wait(timeout=120) == -signal.SIGTERM
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "unexpectedly" not in log, log


def children(pid: int, engine_only: bool = False) -> list[int]:
    """The processes whose parent is `pid`: the server's engine process (and Python's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == pid and (b"spawn_main" in command or not engine_only):
                found.append(int(stat.parent.name))
    return found


def wait_gone(pid: int, deadline: float = 120) -> bool:
    """Whether process `pid` ends (or is only a zombie) within `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_the_engine_process_ending_stops_the_server_cleanly(checkpoint: Path, tmp_path: Path) -> None:
    """Killed (say, for want of memory): its requests end with an error, the server exits 1 with one line; and a
    server killed outright takes its engine process with it."""
    server = Server(checkpoint, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model="m", prompt="Alice", max_tokens=4096, stream=True)
        next(iter(answer))
        [engine] = children(server.proc.pid, engine_only=True)
        os.kill(engine, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine process ended unexpectedly"):
            list(answer)
        assert server.proc.wait(timeout=120) == 1
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log
    assert "error: the engine process ended unexpectedly (exit code -9: killed, perhaps for want of memory); " \
           "the server stopped" in log, log
    server = Server(checkpoint, tmp_path / "again.log")
    [engine] = children(server.proc.pid, engine_only=True)
    server.proc.kill()
    server.proc.wait()
    assert wait_gone(engine), "the engine's process outlived the server"


def test_playground_streams_into_the_page(server: Server, client: openai.OpenAI) -> None:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install it with 'apt-get install chromium' (.ci/run does)"
    expected = complete(client, prompt="Alice", max_tokens=200, temperature=0.8, seed=11)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#prompt", "Alice")
            page.fill("#max-tokens", "200")
            page.fill("#temperature", "0.8")
            page.fill("#seed", "11")
            page.fill("#api-key", KEY)
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=120_000)
            assert page.text_content("#completion") == expected
            assert page.text_content("#shown-prompt") == "Alice"
            # Each streamed token is a span of its own (how many updates the page saw depends on how the browser
            # happened to read the stream, so that is not counted), coloured by its probability; hovering shows
            # the alternatives.
            tokens = client.completions.create(model="m", prompt="Alice", max_tokens=200, temperature=0.8, seed=11,
                                               logprobs=5).choices[0].logprobs
            spans = page.query_selector_all("#completion .token")
            assert [span.text_content() for span in spans] == tokens.tokens
            shown = [float(span.evaluate("s => s.style.getPropertyValue('--p')")) for span in spans]
            assert shown == pytest.approx([math.exp(p) for p in tokens.token_logprobs], abs=1e-3)
            assert spans[3].evaluate("s => getComputedStyle(s).backgroundColor") != "rgba(0, 0, 0, 0)"
            spans[3].hover()
            assert page.is_visible("#tooltip")
            lines = page.text_content("#tooltip").splitlines()
            alternatives = tokens.top_logprobs[3]
            assert len(lines) == 5 + (tokens.tokens[3] not in alternatives)
            best_logprob = max(alternatives.values())
            assert lines[0].split()[-1] == f"{100 * math.exp(best_logprob):.1f}%"
            assert sum(line.startswith("\u25b8") for line in lines) == 1  # the chosen token is marked
            page.uncheck("#colour")
            assert spans[3].evaluate("s => getComputedStyle(s).backgroundColor") == "rgba(0, 0, 0, 0)"
            # A bad prompt shows the server's error.
            page.fill("#prompt", "Alice " * 20)
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('error')",
                                   timeout=120_000)
            assert "context holds 32" in page.text_content("#status")
        finally:
            browser.close()


def test_serve_command_errors(checkpoint: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("serve", tmp_path / "missing.pt", "--port", "0"), "does not exist")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_clean_error(run_cli("serve", checkpoint, "--port", port), "cannot listen", "--port")
    assert_clean_error(run_cli("serve", checkpoint, "--port", "0", "--api-key", " "), "--api-key is empty")
    assert_clean_error(run_cli("serve", checkpoint, "--port", "0", "--api-key", "clé"), "--api-key", "ASCII")
    # A KV cache of a billion contexts: refused in one line before anything is allocated (or the port taken).
    assert_clean_error(run_cli("serve", checkpoint, "--port", "0", "--slots", "1000000000", "--device", "cpu"),
                       "--slots 1,000,000,000", "Use fewer --slots")
    # Finite weights whose scores overflow float32: refused at start, not one traceback per request.
    payload = torch.load(checkpoint, weights_only=True)
    payload["model"]["norm_f.weight"].fill_(3e38)
    payload["checksum"] = _checksum(payload)
    torch.save(payload, tmp_path / "overflow.pt")
    assert_clean_error(run_cli("serve", tmp_path / "overflow.pt", "--port", "0"), "NaN or infinite scores",
                       "earlier checkpoint")


def stream_text(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """What a TextStream over byte tokens releases for each piece of text, and whether a stop sequence ended it."""
    stream, out = TextStream(ByteTokenizer(), stops), []
    for piece in pieces:
        out.append("".join(stream.add(b) for b in piece.encode()))
    out.append(stream.finish())
    return out, stream.stopped


def test_text_stream_holds_back_what_may_start_a_stop_sequence() -> None:
    assert stream_text(["hello"], []) == (["hello", ""], False)
    assert stream_text(["hello wo", "rld!"], ["world"]) == (["hello ", "", ""], True)
    assert stream_text(["say: ab", "c"], ["abc", "b"]) == (["say: a", "", ""], True)
    assert stream_text(["xx\n", "y"], ["\n\n"]) == (["xx", "\ny", ""], False)
    assert stream_text(["xx\n"], ["\n\n"]) == (["xx", "\n"], False)  # the end releases what was held
    # A stop sequence spanning tokens and characters split across byte tokens: "é" is two bytes.
    assert stream_text(["caf", "é!", "x"], ["é!"]) == (["caf", "", "", ""], True)
    assert stream_text(["aa", "ab"], ["aab"]) == (["", "a", ""], True)  # KMP: a failed match restarts inside
    assert stream_text(["Привет мир"], ["мир"]) == (["Привет ", ""], True)


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities and echo


def test_echoed_prompt_logprobs_sum_to_minus_evaluates_nats(server: Server, client: openai.OpenAI,
                                                             checkpoint: Path, tmp_path: Path) -> None:
    # Longer than the context (32): scored in the same windows as evaluate.
    text = (ROOT / "examples" / "alice.txt").read_text(encoding="utf-8")[5_000:5_300]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    result = run_cli("evaluate", checkpoint, tmp_path / "text.txt", "--json", "--device", "cpu")
    evaluation = json.loads(result.stdout)
    nats = evaluation["loss_per_token"] * evaluation["predictions"]

    choice = client.completions.create(model="m", prompt=text, max_tokens=0, echo=True, logprobs=0).choices[0]
    logprobs = choice.logprobs
    assert choice.text == text and choice.finish_reason == "length" and "".join(logprobs.tokens) == text
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == evaluation["tokens"]
    assert logprobs.text_offset == list(range(len(text)))
    assert abs(-sum(logprobs.token_logprobs[1:]) - nats) <= 1e-3 * nats
    # The same prompt as token ids, as evaluation tools send it.
    status, ids = request(server.port, "POST", "/tokenize", {"prompt": text}, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and len(ids["tokens"]) == len(text)
    as_ids = client.completions.create(model="m", prompt=ids["tokens"], max_tokens=0, echo=True, logprobs=0)
    assert as_ids.choices[0].logprobs.token_logprobs == logprobs.token_logprobs
    assert request(server.port, "POST", "/detokenize", {"tokens": ids["tokens"]},
                   {"Authorization": f"Bearer {KEY}"})[1]["prompt"] == text


def test_logprobs_of_generated_tokens(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="m", prompt="Alice", max_tokens=20, seed=3, logprobs=3).choices[0]
    logprobs = plain.logprobs
    assert "".join(logprobs.tokens) == plain.text and logprobs.text_offset == list(range(20))
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= max(top.values()) <= 0
        assert token not in top or abs(top[token] - logprob) < 1e-5
    # Greedy: every token is its position's most likely one.
    greedy = client.completions.create(model="m", prompt="Alice", max_tokens=10, temperature=0, logprobs=1)
    greedy_logprobs = greedy.choices[0].logprobs
    assert all(list(top) == [token] for token, top in zip(greedy_logprobs.tokens, greedy_logprobs.top_logprobs,
                                                          strict=True))
    # Echo with generation: the prompt's tokens first (the first one null), offsets run on into the completion.
    echoed = client.completions.create(model="m", prompt="Alice", max_tokens=20, seed=3, logprobs=3,
                                       echo=True).choices[0]
    assert echoed.text == "Alice" + plain.text
    assert echoed.logprobs.tokens == list("Alice") + logprobs.tokens
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.top_logprobs[0] is None
    assert echoed.logprobs.token_logprobs[5:] == logprobs.token_logprobs
    assert echoed.logprobs.text_offset == list(range(25))
    # Streamed: the pieces' log-probabilities add up to the plain answer's.
    tokens, token_logprobs = [], []
    for chunk in client.completions.create(model="m", prompt="Alice", max_tokens=20, seed=3, logprobs=3,
                                           stream=True):
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            token_logprobs += chunk.choices[0].logprobs.token_logprobs
    assert tokens == logprobs.tokens and token_logprobs == logprobs.token_logprobs
    # Stopped: the log-probabilities end with the text (the stop sequence's tokens are not reported).
    stopped = client.completions.create(model="m", prompt="Alice", max_tokens=20, seed=3, logprobs=1,
                                        stop=plain.text[8:10]).choices[0]
    assert "".join(stopped.logprobs.tokens) == stopped.text


# ----------------------------------------------------------------------------------------------------------
# Chat


def chat(client: openai.OpenAI, content: str, **params) -> list:
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          **params).choices


def test_chat_with_the_plain_template(client: openai.OpenAI) -> None:
    # The built-in template: "role: content" lines, then "assistant:" for the model to continue.
    (first,) = chat(client, "Alice", max_tokens=30, seed=4)
    assert first.message.role == "assistant" and first.finish_reason == "length"
    assert first.message.content == complete(client, prompt="user: Alice\nassistant:", max_tokens=30, seed=4)
    assert chat(client, "Alice", max_tokens=30, seed=4)[0].message.content == first.message.content

    pieces, roles, finish = [], [], None
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Alice"}],
                                                max_tokens=30, seed=4, stream=True):
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        pieces += [delta.content] if delta.content else []
        finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"] and "".join(pieces) == first.message.content and finish == "length"

    both = chat(client, "Alice", max_tokens=30, seed=4, n=2)
    assert [c.message.content for c in both] == [first.message.content,
                                                 chat(client, "Alice", max_tokens=30, seed=5)[0].message.content]
    stop = first.message.content[10:12]
    stopped = chat(client, "Alice", max_tokens=30, seed=4, stop=[stop])[0]
    assert stopped.message.content == first.message.content[:first.message.content.find(stop)]
    assert stopped.finish_reason == "stop"
    with_logprobs = chat(client, "Alice", max_tokens=30, seed=4, logprobs=True, top_logprobs=2)[0]
    assert "".join(t.token for t in with_logprobs.logprobs.content) == first.message.content
    assert all(len(t.top_logprobs) == 2 for t in with_logprobs.logprobs.content)
    streamed = [entry for chunk in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Alice"}], max_tokens=30, seed=4, stream=True,
        logprobs=True, top_logprobs=2) if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in with_logprobs.logprobs.content]


def test_chat_with_a_template_file(checkpoint: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}"
                        "{{ raise_exception('system messages are not supported') }}{% endif %}"
                        "{{ m.content }}{% endfor %}", encoding="utf-8")
    server = Server(checkpoint, tmp_path / "server.log", "--chat-template", str(template))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert chat(client, "Alice", max_tokens=20, seed=2)[0].message.content == \
            complete(client, prompt="Alice", max_tokens=20, seed=2)
        with pytest.raises(openai.BadRequestError, match="system messages are not supported"):
            client.chat.completions.create(model="m", max_tokens=5, messages=[
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Alice"}])
        status, info = request(server.port, "GET", "/tokenizer_info")
        assert status == 200 and info["chat_template"] == template.read_text()
        # The boundary token (begin and end of text, for lm-eval's rolling log-likelihood): the unknown token.
        assert info["bos_token"] == info["eos_token"] == "\ufffd"
        assert request(server.port, "POST", "/tokenize", {"prompt": "\ufffd"})[1]["tokens"] == [info["vocab_size"] - 1]
    finally:
        server.stop()


@pytest.mark.parametrize(("source", "needle"), [
    ("{% for m in messages %}{{ m.content }", "not a valid Jinja template"),
    ("{{ messages[0].content.__class__.__mro__ }}", "cannot render"),
    ("{{ raise_exception('never') }}", "never"),
])
def test_bad_chat_templates_are_refused_at_start(checkpoint: Path, tmp_path: Path, source: str,
                                                 needle: str) -> None:
    template = tmp_path / "template.jinja"
    template.write_text(source, encoding="utf-8")
    assert_clean_error(run_cli("serve", checkpoint, "--port", "0", "--chat-template", template),
                       "--chat-template", needle)
    assert_clean_error(run_cli("serve", checkpoint, "--port", "0", "--chat-template", tmp_path), "is a directory")


def test_byte_tokens_in_logprobs_are_shown_as_bytes_until_their_character_completes() -> None:
    tokenizer = ByteTokenizer()
    assert token_text(tokenizer, ord("a")) == "a" and token_text(tokenizer, 0xC3) == "bytes:\\xc3"
    tracker = Tracker(tokenizer, top=2, offset=3)
    for token in "aé b".encode():
        tracker.add(token, -1.0, [(token, -1.0), (ord("x"), -2.0)])
    assert tracker.release(through=4).tokens == ["a"]  # "é" (offset 4) is not out yet
    rest = tracker.release()
    assert rest.tokens == ["bytes:\\xc3", "bytes:\\xa9", " ", "b"] and rest.text_offset == [4, 4, 5, 6]
    assert rest.top_logprobs[0] == {"bytes:\\xc3": -1.0, "x": -2.0}
    assert [entry["bytes"] for entry in rest.to_chat()["content"]] == [[0xC3], [0xA9], [32], [98]]


def test_logprobs_of_a_byte_model_on_accented_and_cyrillic_text(tmp_path: Path) -> None:
    """Characters of two bytes: tokens that hold part of one are shown as bytes, and everything still adds up."""
    text = ("Déjà vu, café crème. Привет, мир! " * 40)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp_path / "token-cache"))
        train_tiny(tmp_path / "text.txt", tmp_path / "run", "--set", "data.tokenizer=byte", "--max-steps", "30")
    checkpoint = tmp_path / "run" / "best_model.pt"
    scored = "Привет, café! " * 4  # 100 bytes: longer than the context (32), so scored in windows
    (tmp_path / "scored.txt").write_text(scored, encoding="utf-8")
    evaluation = json.loads(run_cli("evaluate", checkpoint, tmp_path / "scored.txt", "--json", "--device", "cpu")
                            .stdout)
    server = Server(checkpoint, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        echoed = client.completions.create(model="m", prompt=scored, max_tokens=0, echo=True, logprobs=1)
        logprobs = echoed.choices[0].logprobs
        assert len(logprobs.tokens) == len(scored.encode()) == evaluation["tokens"]
        assert "bytes:\\xd0" in logprobs.tokens and logprobs.text_offset[-1] == len(scored) - 1
        nats = evaluation["loss_per_token"] * evaluation["predictions"]
        assert abs(-sum(logprobs.token_logprobs[1:]) - nats) <= 1e-3 * nats
        assert request(server.port, "GET", "/tokenizer_info")[1]["bos_token"] == "\x00"  # byte 0: the boundary

        plain = client.completions.create(model="m", prompt="Привет", max_tokens=40, seed=1, logprobs=2)
        choice = plain.choices[0]
        shown = b"".join(bytes(int(h, 16) for h in t[len("bytes:"):].split("\\x")[1:]) if t.startswith("bytes:")
                         else t.encode() for t in choice.logprobs.tokens)
        assert shown.decode("utf-8", errors="replace") == choice.text
        offsets = choice.logprobs.text_offset
        assert offsets == sorted(offsets) and offsets[-1] < len(choice.text)
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------------
# Batched decoding and text for every tokenizer


def decode(model: GPT, joins: dict[int, tuple[int, list[int]]], leaves: dict[int, int], steps: int,
           ) -> dict[int, list[tuple[int, float]]]:
    """Run a DecodeBatch where sequence `key` joins at step joins[key][0] with prompt joins[key][1] and leaves
    after leaves[key] tokens (or at the end); each sequence's (token, logprob) in order."""
    batch, rows, out = DecodeBatch(model, 4), [], {key: [] for key in joins}
    for step in range(steps):
        for key, (at, prompt) in joins.items():
            if at == step:
                batch.add(prompt, Sampling(temperature=0), None)
                rows.append(key)
        if not rows:
            continue
        for key, sampled in zip(rows, batch.sample(), strict=True):
            out[key].append((sampled.token, sampled.logprob))
        for i in reversed(range(len(rows))):
            if len(out[rows[i]]) == leaves.get(rows[i], steps):
                batch.remove(i)
                rows[i] = rows[-1]
                rows.pop()
        if rows:
            batch.advance()
    return out


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_batched_decoding_matches_each_sequence_alone(positions: str) -> None:
    """Sequences join and leave between steps, at different lengths, past the context (the window slides)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL, position_embedding=positions), vocab_size=40, context_length=16).eval()
    joins = {0: (0, [1, 2, 3]), 1: (2, [4]), 2: (5, [5, 6, 7, 8, 9, 10, 11]), 3: (9, [12, 13]), 4: (12, [7])}
    together = decode(model, joins, {0: 10, 3: 25}, 40)
    for key, (_, prompt) in joins.items():
        alone = decode(model, {key: (0, prompt)}, {}, len(together[key]))[key]
        assert [token for token, _ in together[key]] == [token for token, _ in alone]
        assert max(abs(a - b) for (_, a), (_, b) in zip(together[key], alone, strict=True)) <= 1e-4


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_past_the_context_each_token_sees_the_window_a_fresh_pass_would(positions: str) -> None:
    """Past the context the window slides to its last half: every score equals a pass without a cache over the
    tokens in the window (within float rounding), in company as alone."""
    torch.manual_seed(1)
    context, keep = 16, 8
    model = GPT(ModelConfig(**TINY_MODEL, position_embedding=positions), vocab_size=40, context_length=context).eval()
    prompt = [1, 2, 3, 4, 5]
    together = decode(model, {0: (0, prompt), 1: (3, [6, 7])}, {}, 60)[0]
    tokens, start = list(prompt), 0
    for token, logprob in together:
        if len(tokens) - start > context:
            start = len(tokens) - keep
        with torch.no_grad():
            scores = model(torch.tensor([tokens[start:]]))[0][0, -1].float().log_softmax(-1)
        assert token == int(scores.argmax()) and abs(logprob - float(scores[token])) <= 1e-4
        tokens.append(token)


MULTILINGUAL = ("Ça déjà vu, élève naïf à Zürich; «Привет, мир!» — сказал он. Où est la forêt? Ещё раз, пожалуйста. "
                "Garçon, l'été arrive. Эта книга очень интересная. ")


@pytest.fixture(scope="module", params=["byte", "bpe"])
def multilingual(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A byte or BPE model trained on accented and Cyrillic text, served."""
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    (tmp / "text.txt").write_text(MULTILINGUAL * 40, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUNDAMENTALLM_CACHE_DIR", str(tmp / "token-cache"))
        train_tiny(tmp / "text.txt", tmp / "run", "--max-steps", "30", "--set", f"data.tokenizer={request.param}",
                   "--set", "data.vocab_size=300")
    running = Server(tmp / "run" / "final_model.pt", tmp / "server.log")
    running.checkpoint = tmp / "run" / "final_model.pt"
    yield running
    running.stop()


def test_byte_and_bpe_models_serve_generates_text(multilingual: Server) -> None:
    client = openai.OpenAI(base_url=f"{multilingual.url}/v1", api_key="unused", max_retries=0, timeout=120)
    texts = {}
    for seed in range(4):
        texts[seed] = complete(client, prompt="Ça", max_tokens=40, seed=seed)
        cli = run_cli("generate", multilingual.checkpoint, "--prompt", "Ça", "--max-tokens", "40", "--seed",
                      str(seed), "--temperature", "1.0", "--device", "cpu")
        assert cli.stdout == f"Ça{texts[seed]}\n", seed
    assert any(ord(ch) > 127 for text in texts.values() for ch in text)  # it did write non-ASCII text
    assert "".join(stream(client, prompt="Ça", max_tokens=40, seed=0)[0]) == texts[0]
    # A stop sequence spanning tokens (and, where it holds one, a character split across byte tokens).
    text = texts[0]
    middle = len(text) // 2
    stop = text[middle : middle + 4]
    cut = text[: text.find(stop)]
    stopped = client.completions.create(model="m", prompt="Ça", max_tokens=40, seed=0, stop=[stop]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (cut, "stop")
    pieces, finish = stream(client, prompt="Ça", max_tokens=40, seed=0, stop=["\x00never", stop])
    assert ("".join(pieces), finish) == (cut, "stop")


def test_concurrent_requests_get_the_log_probabilities_they_get_alone(multilingual: Server) -> None:
    client = openai.OpenAI(base_url=f"{multilingual.url}/v1", api_key="unused", max_retries=0, timeout=120)
    params = [{"prompt": prompt, "max_tokens": 30, "seed": seed, "logprobs": 1}
              for seed, prompt in enumerate(["Ça", "При", "Où", "", "Garçon, l'été", "Эта"])]
    alone = [client.completions.create(model="m", **p).choices[0].logprobs for p in params]
    together: list = [None] * len(params)
    start = threading.Barrier(len(params))

    def run(i: int) -> None:
        start.wait()
        together[i] = client.completions.create(model="m", **params[i]).choices[0].logprobs

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(params))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for a, t in zip(alone, together, strict=True):
        # Float rounding may, rarely, change a sampled token: compare up to the first difference.
        same = next((i for i, (x, y) in enumerate(zip(a.tokens, t.tokens, strict=True)) if x != y), len(a.tokens))
        assert same > 0
        assert all(abs(x - y) <= 1e-4 for x, y in zip(a.token_logprobs[:same], t.token_logprobs[:same], strict=True))
