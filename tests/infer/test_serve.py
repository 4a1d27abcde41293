"""`python -m glm_ft serve RUN`: a real server process on loopback, spoken to over real HTTP (http.client): the
replies equal glm-ft's own greedy generation for multi-turn conversations with a system prompt, streaming gives the
same text as non-streaming, finish_reason and usage follow ChatGLM3's stop tokens, tools reach the prompt, bad
requests are answered 400 and a model not served 404, and a client that goes away frees the model. The server is
always stopped (conftest.serving)."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, serving
from inference_fixtures import base_dir, load_by_hand, runs  # noqa: F401

pytestmark = pytest.mark.slow
MAX_TOKENS = 24


def post(port: int, body: dict) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response, response.read()


def sse_events(raw: bytes) -> list[str]:
    return [line[len("data: "):] for line in raw.decode().split("\n\n") if line.startswith("data: ")]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on `port`, from the kernel's own table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def by_hand(tokenizer, model, messages: list[dict], max_new: int) -> list[int]:
    """glm-ft's tokenizer and model.generate directly: the new ids up to and including the first stop token."""
    import torch

    stops = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    end = next((i + 1 for i, tok in enumerate(new) if tok in stops), len(new))
    return new[:end]


@pytest.mark.parametrize("method", ["lora", "ptuning_v2"])
def test_chat_completions_over_http(method, runs, base_dir, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "glm_ft.infer.serve", str(runs[method]), "--port", str(port)]
    with serving(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log",
                 cwd=Path(__file__).resolve().parents[2]):
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only, by default

        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == runs[method].name

        tokenizer, model = load_by_hand(runs[method], base_dir)
        stops = {tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")}
        system = {"role": "system", "content": "你是一个广告文案助手"}
        history = [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条裙子。"}]
        query = {"role": "user", "content": "类型#上衣*颜色#白色"}
        for messages in ([query], [system, query], [system, *history, query]):
            status, _, raw = post(port, {"model": runs[method].name, "messages": messages, "max_tokens": MAX_TOKENS})
            assert status == 200, raw
            reply = json.loads(raw)
            expected = by_hand(tokenizer, model, messages, MAX_TOKENS)
            text = tokenizer.decode([t for t in expected if t not in stops], skip_special_tokens=True).strip()
            choice = reply["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": text}
            assert choice["finish_reason"] == ("stop" if expected[-1] in stops else "length")
            assert reply["usage"]["prompt_tokens"] == len(tokenizer.apply_chat_template(messages,
                                                                                         add_generation_prompt=True))
            assert reply["usage"]["completion_tokens"] == len(expected)

            status, response, raw = post(port, {"messages": messages, "max_tokens": MAX_TOKENS, "stream": True})
            assert status == 200 and response.getheader("content-type").startswith("text/event-stream")
            events = sse_events(raw)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == choice["finish_reason"]
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


        # OpenAI tools go into the system prompt as ChatGLM3 renders them
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        status, _, raw = post(port, {"messages": [query], "tools": tools, "max_tokens": 1})
        assert status == 200
        with_tools = [{"role": "system", "content": "", "tools": [tools[0]["function"]]}, query]
        assert json.loads(raw)["usage"]["prompt_tokens"] == len(tokenizer.apply_chat_template(
            with_tools, add_generation_prompt=True))
        # streamed with tools offered, a reply adds up to the unstreamed one (glm_ft.infer.tool_calls.StreamedReply)
        whole = json.loads(post(port, {"messages": [query], "tools": tools, "max_tokens": MAX_TOKENS})[2])
        chunks = [json.loads(e) for e in sse_events(post(port, {"messages": [query], "tools": tools,
                                                                "max_tokens": MAX_TOKENS, "stream": True})[2])[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) \
            == whole["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]

        for bad, key in (({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                         ({"messages": [query], "max_tokens": 0}, "max_tokens"),
                         ({"messages": [query], "temperature": -1}, "temperature"),
                         # JSON's NaN and Infinity (json.dumps writes them), and a fraction of a token
                         ({"messages": [query], "max_tokens": float("inf")}, "max_tokens: expected an integer"),
                         ({"messages": [query], "max_tokens": float("nan")}, "max_tokens"),
                         ({"messages": [query], "max_tokens": 2.5}, "max_tokens"),
                         ({"messages": [query], "temperature": float("nan")}, "temperature"),
                         ({"messages": [query], "top_p": float("nan")}, "top_p")):
            status, _, raw = post(port, bad)
            assert status == 400 and key in json.loads(raw)["error"]["message"]


def test_usage_streamed_and_the_default_length_near_the_end_of_the_context(tmp_path):
    """A request without max_tokens whose prompt leaves less room than --max-new-tokens generates to the end of the
    context, as OpenAI and vLLM do (it was a 400 blaming a max_tokens the client never sent); a stream that asks for
    usage (stream_options.include_usage, where OpenAI's clients read a stream's token counts) ends with the
    unstreamed reply's usage (it was silently left out)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_ft.chatglm3.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(tmp_path / "tiny")
    port = free_port()
    cmd = [sys.executable, "-m", "glm_ft.infer.serve", str(model_dir), "--port", str(port), "--dtype", "float32"]
    with serving(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log",
                 cwd=Path(__file__).resolve().parents[2]):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        context = model.config.seq_length
        stops = {tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")}
        content = "类型#上衣*颜色#白色"
        while len(tokenizer.apply_chat_template([{"role": "user", "content": content + "裙"}],
                                                add_generation_prompt=True)) <= context - MAX_TOKENS:
            content += "裙"  # room for MAX_TOKENS new tokens: less than --max-new-tokens' 512
        messages = [{"role": "user", "content": content}]
        prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        expected = by_hand(tokenizer, model, messages, context - prompt)
        text = tokenizer.decode([t for t in expected if t not in stops], skip_special_tokens=True).strip()
        usage = {"prompt_tokens": prompt, "completion_tokens": len(expected), "total_tokens": prompt + len(expected)}

        status, _, raw = post(port, {"messages": messages})
        assert status == 200, raw
        reply = json.loads(raw)
        assert reply["choices"][0]["message"]["content"] == text and reply["usage"] == usage
        assert reply["choices"][0]["finish_reason"] == ("stop" if expected[-1] in stops else "length")

        status, _, raw = post(port, {"messages": messages, "stream": True, "stream_options": {"include_usage": True}})
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]"
        *chunks, last = [json.loads(e) for e in events[:-1]]
        assert last["choices"] == [] and last["usage"] == usage
        assert all(c["usage"] is None for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
        assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]

        for bad, message in (({"messages": messages, "max_tokens": context - prompt + 1}, "max_tokens: the prompt"),
                             ({"messages": messages, "stream_options": {"include_usage": True}}, "stream_options"),
                             ({"messages": [{"role": "user", "content": content * 2}]}, "messages: the prompt")):
            status, _, raw = post(port, bad)
            assert status == 400 and json.loads(raw)["error"]["message"].startswith(message), raw


def tiny_server(tmp_path, *args: str):
    """`serve` on a tiny ChatGLM3 (fp32): greedy, it runs to the end of its context without a stop token."""
    from glm_ft.chatglm3.tiny import ensure_tiny_model

    port = free_port()
    cmd = [sys.executable, "-m", "glm_ft.infer.serve", str(ensure_tiny_model(tmp_path / "tiny")), "--port", str(port),
           "--dtype", "float32", *args]
    return port, serving(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log",
                         cwd=Path(__file__).resolve().parents[2])


def metrics(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        return {line.split()[0]: int(line.split()[1]) for line in response.read().decode().splitlines()
                if line and not line.startswith("#")}


def test_a_model_not_served_is_404_and_v1_models_lists_the_served_names(tmp_path):
    """A request naming another model was served by this one as if it were that model; OpenAI and vLLM answer 404
    `model_not_found`. A request without `model` gets the first served name, as with vLLM."""
    port, server = tiny_server(tmp_path, "--served-model-name", "glm-a", "glm-b")
    with server:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["glm-a", "glm-b"]
        query = [{"role": "user", "content": "类型#裙"}]
        for stream in (False, True):
            status, _, raw = post(port, {"model": "gpt-4o", "messages": query, "max_tokens": 2, "stream": stream})
            assert status == 404, raw
            error = json.loads(raw)["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
            assert error["param"] == "model" and "`gpt-4o`" in error["message"]
        status, _, raw = post(port, {"model": 5, "messages": query, "max_tokens": 2})
        assert status == 400 and json.loads(raw)["error"]["message"] == "model: expected a string"

        for model, reported in (("glm-b", "glm-b"), ("glm-a", "glm-a"), (None, "glm-a")):
            status, _, raw = post(port, {"model": model, "messages": query, "max_tokens": 2})
            assert status == 200 and json.loads(raw)["model"] == reported, raw
        status, _, raw = post(port, {"model": "glm-b", "messages": query, "max_tokens": 2, "stream": True})
        assert status == 200 and {json.loads(e)["model"] for e in sse_events(raw)[:-1]} == {"glm-b"}


def test_an_empty_served_model_name_is_refused_in_one_line(capsys):
    from glm_ft.infer.serve import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["RUN", "--served-model-name", "glm", ""])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("--served-model-name: a name cannot be empty "
                                                             "(a request without a model gets the first)")
    assert parse_args(["RUN", "--model-name", "glm"]).served_model_name == ["glm"]  # the option's former name


def test_run_after_the_served_names_is_still_the_run(capsys):
    """`--served-model-name NAME...` takes every word up to the next option, as vLLM's does: written before RUN, it
    took RUN too, and serve stopped with "the following arguments are required: checkpoint"."""
    from glm_ft.infer.serve import parse_args

    for argv in (["RUN", "--served-model-name", "a", "b"], ["--served-model-name", "a", "b", "RUN"],
                 ["--served-model-name", "a", "b", "RUN", "--port", "9"],
                 ["--port", "9", "RUN", "--model-name", "a", "b"]):
        args = parse_args(argv)
        assert (args.checkpoint, args.served_model_name) == ("RUN", ["a", "b"]), argv
    assert parse_args(["--served-model-name", "a", "RUN"]).served_model_name == ["a"]
    assert parse_args(["RUN"]).served_model_name is None
    for argv in ([], ["--served-model-name", "a"]):  # one word: a name or RUN, either way one is missing
        with pytest.raises(SystemExit) as exited:
            parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].endswith("error: the following arguments are required: checkpoint")
        assert "[checkpoint]" not in err and err.splitlines()[0].startswith("usage: ")


def wait_for_log_or(port: int, log: Path, proc, counter: str, value: int) -> None:
    """Until /metrics' `counter` reaches `value` or the server logs a traceback (or exits)."""
    while metrics(port)[counter] < value and "Traceback" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)


def test_a_client_gone_before_its_body_came_is_counted_as_cancelled_without_a_traceback(tmp_path):
    """A client that sends its headers and part of its body, then closes the socket, raised starlette's
    ClientDisconnect out of the handler: uvicorn logged "Exception in ASGI application" with a traceback. It is a
    request cancelled by its client, like one that goes away while it generates."""
    port, server = tiny_server(tmp_path)
    log = tmp_path / "serve.log"
    with server as proc:
        before = metrics(port)
        for partial in (b'{"messages": [', b""):  # part of the body, and none of it
            with socket.create_connection(("127.0.0.1", port)) as gone:
                gone.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + partial)
        wait_for_log_or(port, log, proc, "glm_ft_requests_cancelled_total", 2)
        assert "Traceback" not in log.read_text() and "ClientDisconnect" not in log.read_text(), log.read_text()
        assert metrics(port) == {**before, "glm_ft_requests_cancelled_total": 2}  # nothing generated for them
        status, _, raw = post(port, {"messages": [{"role": "user", "content": "类型#上衣"}], "max_tokens": 2})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
        assert metrics(port)["glm_ft_requests_cancelled_total"] == 2


def test_seeds_tiny_temperatures_and_lone_surrogates_are_answered_not_500s(tmp_path):
    """Each was a 500 with a traceback in the log (a stream: an error event after 200): a seed numpy's set_seed
    refuses (outside 0 to 2**32 - 1), a temperature so small that logits / temperature overflow to NaN probabilities,
    a lone UTF-16 surrogate (JSON's "\\ud800", which Python reads) that the tokenizer cannot encode."""
    port, server = tiny_server(tmp_path)
    log = tmp_path / "serve.log"
    query = [{"role": "user", "content": "类型#裙"}]
    with server:
        for seed in (-1, 2**32, 2**63):
            for stream in (False, True):
                status, _, raw = post(port, {"messages": query, "max_tokens": 2, "temperature": 1, "seed": seed,
                                             "stream": stream})
                assert status == 400, raw
                assert json.loads(raw)["error"]["message"] == "seed: expected an integer from 0 to 4294967295"
        sampled = [post(port, {"messages": query, "max_tokens": 4, "temperature": 1.5, "seed": seed})
                   for seed in (0, 2**32 - 1, 2**32 - 1)]
        assert [status for status, _, _ in sampled] == [200] * 3
        assert json.loads(sampled[1][2])["choices"] == json.loads(sampled[2][2])["choices"]  # the seed is used

        greedy = json.loads(post(port, {"messages": query, "max_tokens": 4})[2])["choices"]
        for temperature in (1e-300, 5e-324, 1e-6):  # below vLLM's 1e-5: greedy, as there
            status, _, raw = post(port, {"messages": query, "max_tokens": 4, "temperature": temperature, "seed": 3})
            assert status == 200 and json.loads(raw)["choices"] == greedy, raw

        tools = [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]
        for body, found in (({"messages": [{"role": "user", "content": "x\udc00y"}]}, "\\udc00"),
                            ({"messages": query, "tools": tools}, "\\ud800"),
                            ({"messages": query, "stream": True, "tools": tools}, "\\ud800")):
            status, _, raw = post(port, {**body, "max_tokens": 2})
            assert status == 400, raw
            assert json.loads(raw)["error"]["message"] == (f"the request holds a lone UTF-16 surrogate ({found}), "
                                                           "which is not a character")
        status, _, raw = post(port, {"messages": [{"role": "user", "content": "\U0001f600 \ud83d\ude00"}],
                                     "max_tokens": 2})  # a pair is one character, escaped or not
        assert status == 200, raw
        assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_stops_its_generation_and_the_next_request_is_served(stream, tmp_path):
    """A request whose client disconnects (a real socket on loopback, closed once the server generates for it) stops
    generating at once, as /metrics shows: unstreamed, it generated to its max_tokens, holding the one generation
    slot; the next request was answered only then. That request's reply is the one an idle server gives."""
    port, server = tiny_server(tmp_path)
    with server as proc:
        follow_up = {"messages": [{"role": "user", "content": "类型#上衣"}], "max_tokens": 8}
        status, _, expected = post(port, follow_up)
        assert status == 200
        before = metrics(port)
        # the counters against the reply's own usage: a fresh server counted just that request's tokens
        assert before == {"glm_ft_generation_tokens_total": json.loads(expected)["usage"]["completion_tokens"],
                          "glm_ft_requests_cancelled_total": 0}

        body = json.dumps({"messages": [{"role": "user", "content": "类型#裙"}], "max_tokens": 1000,
                           "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            while metrics(port)["glm_ft_generation_tokens_total"] == before["glm_ft_generation_tokens_total"]:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.05)  # until the server generates for it
        status, _, raw = post(port, follow_up)  # answered once the one generation slot is free
        assert status == 200
        reply, expected = json.loads(raw), json.loads(expected)
        assert reply["choices"] == expected["choices"] and reply["usage"] == expected["usage"]

        after = metrics(port)
        assert after["glm_ft_requests_cancelled_total"] == before["glm_ft_requests_cancelled_total"] + 1
        abandoned = (after["glm_ft_generation_tokens_total"] - before["glm_ft_generation_tokens_total"]
                     - reply["usage"]["completion_tokens"])
        assert 1 <= abandoned < 1000


def test_a_missing_run_fails_fast_with_one_line(tmp_path):
    from conftest import run_process

    result = run_process([sys.executable, "-m", "glm_ft.infer.serve", str(tmp_path / "nope")],
                         cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: not found"]


def test_a_taken_port_is_one_line_before_loading_and_port_0_announces_the_real_one(runs, tmp_path):
    """The socket is bound before the model loads (an address in use, a bad --host: one line naming them, not
    uvicorn's error after the load) and the `serving ... on URL` line comes once it listens, with the port the
    system chose for --port 0: a script may wait for the line and use its URL."""
    import re
    import socket
    import subprocess

    from conftest import end_process_group, run_process

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_process([sys.executable, "-m", "glm_ft.infer.serve", str(runs["lora"]), "--port", str(port)],
                             cwd=root)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"]
    assert "Loading" not in result.stdout + result.stderr

    proc = subprocess.Popen([sys.executable, "-m", "glm_ft.infer.serve", str(runs["lora"]), "--port", "0"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()  # the process's first line: it waits, however slow the machine
        url = re.search(r"on (http://127\.0\.0\.1:(\d+)/v1)$", line.strip())
        assert url and int(url.group(2)) != 0, line
        with urllib.request.urlopen(url.group(1).removesuffix("/v1") + "/health") as response:
            assert response.status == 200  # listening when the line came
    finally:
        end_process_group(proc)
        proc.stdout.close()


def test_ctrl_c_stops_the_server_with_exit_130_and_no_traceback(runs):
    """Ctrl-C (SIGINT) is how a user stops `serve` in a terminal: uvicorn shuts down and re-raises it, which ended
    the process with a KeyboardInterrupt traceback and exit 1."""
    import os
    import signal
    import subprocess

    from conftest import end_process_group

    proc = subprocess.Popen([sys.executable, "-m", "glm_ft", "serve", str(runs["lora"]), "--port", "0"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("serving ")  # listening: the line a script waits for
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate()
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    finally:
        end_process_group(proc)
        proc.stdout.close()
        proc.stderr.close()


def after_a_space(text: str) -> tuple[str, str]:
    """A stop string of two characters after a space, where it first occurs, and the reply it leaves."""
    at = next(i for i in range(1, len(text) - 2) if text[i - 1] == " " != text[i] and text.find(text[i:i + 2]) == i)
    return text[at:at + 2], text[:at]


def test_stop_cuts_the_reply_before_the_first_stop_string_streamed_or_not(tmp_path):
    """`stop` was refused with a 400, though LangChain and others send it. With it, the reply is the reply without it
    cut before the stop string, finish_reason "stop", usage the tokens generated up to the one that completed it;
    streamed, the deltas add up to that text, so no part of the stop string was sent, even one split across the
    chunks the reply streams in without `stop`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    port, server = tiny_server(tmp_path)
    messages = [{"role": "user", "content": "类型#裙"}]
    request = {"messages": messages, "max_tokens": 60}
    with server:
        whole = json.loads(post(port, request)[2])
        text = whole["choices"][0]["message"]["content"]
        chunks = [json.loads(e) for e in sse_events(post(port, {**request, "stream": True})[2])[:-1]]
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert "".join(pieces) == text
        # a stop string that starts past the reply's first third, occurs there first and spans two streamed chunks
        inside = {sum(map(len, pieces[:i])) for i in range(len(pieces))}
        at = next(i for i in range(len(text) // 3, len(text) - 6) if text.find(text[i:i + 6]) == i
                  and inside & set(range(i + 1, i + 6)) and "\ufffd" not in text[i:i + 6])
        stop = text[at:at + 6]

        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
        generated = by_hand(tokenizer, model, messages, 60)  # the tokens up to the one completing the stop string
        needed = next(n for n in range(1, len(generated) + 1)
                      if stop in tokenizer.decode(generated[:n], skip_special_tokens=True).lstrip())
        prompt = whole["usage"]["prompt_tokens"]
        usage = {"prompt_tokens": prompt, "completion_tokens": needed, "total_tokens": prompt + needed}
        assert needed < whole["usage"]["completion_tokens"]

        for stops, cut in ((stop, text[:at]), ([" not in the reply", stop], text[:at]),
                           ([stop, text[1:3]], text[:text.find(text[1:3])]), (["not in the reply"], None),
                           after_a_space(text)):  # the space before the stop string is the reply's end
            status, _, raw = post(port, {**request, "stop": stops})
            assert status == 200, raw
            reply = json.loads(raw)
            if cut is None:  # as without `stop`
                assert reply["choices"] == whole["choices"] and reply["usage"] == whole["usage"]
                continue
            assert reply["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": cut},
                                           "finish_reason": "stop"}
            if cut == text[:at]:
                assert reply["usage"] == usage
            status, _, raw = post(port, {**request, "stop": stops, "stream": True,
                                         "stream_options": {"include_usage": True}})
            *streamed, last = [json.loads(e) for e in sse_events(raw)[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == cut
            assert streamed[-1]["choices"][0]["finish_reason"] == "stop" and last["usage"] == reply["usage"]

        # with tools offered, a reply whose first line is not empty is held to its end (it may be a call)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        text = json.loads(post(port, {**request, "tools": tools})[2])["choices"][0]["message"]["content"]
        stop, cut = after_a_space(text)
        for stream in (False, True):
            status, _, raw = post(port, {**request, "tools": tools, "stop": stop, "stream": stream})
            assert status == 200, raw
            if stream:
                chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
                assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cut
            else:
                assert json.loads(raw)["choices"][0]["message"]["content"] == cut

        status, _, raw = post(port, {**request, "stop": ["a", ""]})
        assert status == 400 and json.loads(raw)["error"]["message"].startswith("stop: expected"), raw


def test_tool_choice_none_offers_no_tools_and_a_forced_call_is_refused(tmp_path):
    """`tool_choice` was ignored: "none" still offered the tools (a call came back as tool_calls), "required" and a
    named function were served as "auto". "none" now answers as if no tools were sent; the forced forms, which
    ChatGLM3's generation cannot guarantee, are a 400 naming tool_choice and the value."""
    port, server = tiny_server(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    request = {"messages": [{"role": "user", "content": "北京天气"}], "max_tokens": 8}
    with server:
        plain = json.loads(post(port, request)[2])
        offered = json.loads(post(port, {**request, "tools": tools})[2])
        assert offered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
        for choice, expected in (("none", plain), ("auto", offered), (None, offered)):
            status, _, raw = post(port, {**request, "tools": tools, "tool_choice": choice})
            assert status == 200, raw
            reply = json.loads(raw)
            assert reply["choices"] == expected["choices"] and reply["usage"] == expected["usage"], choice
            status, _, raw = post(port, {**request, "tools": tools, "tool_choice": choice, "stream": True})
            chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) \
                == expected["choices"][0]["message"]["content"]

        named = {"type": "function", "function": {"name": "get_weather"}}
        for choice, message in (("required", 'tool_choice: "required" is not supported'),
                                (named, f"tool_choice: {json.dumps(named)} is not supported"),
                                ("sometimes", 'tool_choice: expected "none", "auto"')):
            for stream in (False, True):
                status, _, raw = post(port, {**request, "tools": tools, "tool_choice": choice, "stream": stream})
                assert status == 400 and json.loads(raw)["error"]["message"].startswith(message), raw
        status, _, raw = post(port, {"messages": [{"role": "user"}], "max_tokens": 2})
        assert status == 400 and json.loads(raw)["error"]["message"].startswith("messages[0].content: required")
