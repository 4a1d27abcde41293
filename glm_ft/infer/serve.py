"""Serve what a run trained behind an OpenAI-compatible chat-completions API (FastAPI + uvicorn, on loopback).

    python -m glm_ft serve outputs/2026-11-27/12-00-00 [--port 8000] [--host 127.0.0.1] [--served-model-name NAME]

Endpoints: `GET /health`, `GET /metrics` (Prometheus text), `GET /v1/models`, `POST /v1/chat/completions`
(non-streaming, and server-sent events with `"stream": true`). A request's `model` must be a served name (404
`model_not_found` otherwise, as OpenAI and vLLM answer); absent, it is the first. Messages are system / user /
assistant and `tool` (ChatGLM3's observation); `tools` in the OpenAI form are rendered into the system prompt as
ChatGLM3 was trained, and a reply that calls one comes back as `tool_calls`, streamed or not
(glm_ft/infer/tool_calls.py). The prompt is built by glm-ft's tokenizer, so it holds exactly the ids training used;
generation stops on eos, `<|user|>` and `<|observation|>` or before the first `stop` string (finish_reason "stop"),
or at max_tokens ("length"; unset: --max-new-tokens or the rest of the context). Greedy unless the request sets a
temperature of 1e-5 or more. `stream_options.include_usage` ends a stream with the usage chunk. `tool_choice` "none"
offers no tools; OpenAI fields serve does not implement are a 400 naming them (glm_ft/infer/openai_request.py), and
a failure of its own a 500 in OpenAI's error shape, the traceback in the log.

Every kind of checkpoint serves (LoRA, P-Tuning v2, full, any ChatGLM3 folder). A `--format hf` export is served
by stock tooling instead: `transformers serve OUT` (needs `transformers[serving]`) or vLLM.
The model loads before the port opens, so a connection that succeeds is served. A request whose client goes away
stops generating at its next token.
"""


import argparse
import json
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Any

from glm_ft import heap
from glm_ft.methods import DTYPE_NAMES
from glm_ft.errors import GlmFtError, to_stderr
from glm_ft.infer.openai_request import (BadRequest, ModelNotFound, conversation, number, refuse_unsupported,
                                         requested_model, stop_strings, stream_usage, text_only, tools_offered)
from glm_ft.infer.stop_strings import StopText, first_stop, leading
from glm_ft.infer.tool_calls import StreamedReply, reply_message
from glm_ft.runs import FINAL

# A failure of the server's own, as OpenAI words it: the traceback goes to the server's log, not to the client
SERVER_ERROR = {"message": "The server had an error while processing your request (its log has the details)",
                "type": "server_error", "param": None, "code": None}
GREEDY_BELOW = 1e-5  # a temperature below it decodes greedily, as vLLM's _SAMPLING_EPS


class Engine:
    """The loaded checkpoint; one generation at a time (a model is not safe to share between threads)."""

    def __init__(self, loaded, name: str, max_new_tokens: int):
        from glm_ft.train.evaluation import stop_token_ids

        self.tokenizer, self.model, self.name = loaded.tokenizer, loaded.model, name
        self.max_new_tokens = max_new_tokens
        self.stops = stop_token_ids(self.tokenizer)
        self.lock = threading.Lock()
        self.tokens_generated = 0  # /metrics: a generation's progress shows while it runs
        self.cancelled = 0  # requests whose client went away before their reply was whole
        self.counting = threading.Lock()  # `cancelled` grows from generation threads and the event loop

    def prepare(self, body: dict) -> tuple[list[int], Any]:
        from glm_ft.infer.checkpoint import generation_config

        refuse_unsupported(body)
        ids = self.tokenizer.apply_chat_template(conversation(body), add_generation_prompt=True)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        limit = number(key, body.get(key), None, 1, integer=True)
        # floats: JSON's `2` is an int, which transformers' TemperatureLogitsWarper refuses (a 500 mid-request)
        temperature = float(number("temperature", body.get("temperature"), 0.0, 0.0, 2.0))
        # Greedy below vLLM's epsilon: logits divided by 1e-300 overflow to NaN probabilities (a 500 mid-request)
        temperature = temperature if temperature >= GREEDY_BELOW else 0.0
        top_p = float(number("top_p", body.get("top_p"), 1.0, 0.0, 1.0))
        context = self.model.config.seq_length
        if len(ids) >= context:
            raise BadRequest(f"messages: the prompt ({len(ids)} tokens) leaves no room in the model's context of "
                             f"{context} tokens")
        if limit is not None and len(ids) + limit > context:
            raise BadRequest(f"{key}: the prompt ({len(ids)} tokens) plus {key} ({limit}) exceeds the model's "
                             f"context of {context} tokens")
        # A request that sets no limit gets --max-new-tokens or what is left of the context, as OpenAI's and vLLM's
        # default is the rest of the context: refusing it would blame a max_tokens the client never sent.
        max_new = limit if limit is not None else min(self.max_new_tokens, context - len(ids))
        gen = generation_config(self.tokenizer, max_new, do_sample=temperature > 0, temperature=temperature,
                                top_p=top_p)
        return ids, gen

    def generate(self, ids: list[int], gen, streamer=None, seed: int | None = None,
                 cancelled: threading.Event | None = None, stop: list[str] = ()) -> list[int]:
        """The new ids up to and including the first stop token, or the token that completes the reply's first
        `stop` string; ends early once `cancelled` is set (the request's client went away)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, set_seed

        engine = self

        class Progress(StoppingCriteria):  # called once per new token
            fired = False  # True once it stopped the generation for its gone client

            def __call__(self, input_ids, scores, **kwargs):
                engine.tokens_generated += input_ids.shape[0]
                self.fired = self.fired or (cancelled is not None and cancelled.is_set())
                return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)

        class StopStrings(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                text = engine.decoded(input_ids[0, len(ids):].tolist())
                found = first_stop(text[leading(text):], stop) is not None
                return torch.full((input_ids.shape[0],), found, dtype=torch.bool, device=input_ids.device)

        progress = Progress()
        criteria = StoppingCriteriaList([progress, StopStrings()] if stop else [progress])
        with self.lock, torch.no_grad():
            if seed is not None:
                set_seed(seed)
            input_ids = torch.tensor([ids], device=self.model.device)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=gen, streamer=streamer,
                                      stopping_criteria=criteria)
        if progress.fired:
            self.count_cancelled()
        new = out[0, len(ids):].tolist()
        end = next((i + 1 for i, tok in enumerate(new) if tok in self.stops), len(new))
        return new[:end]

    def count_cancelled(self) -> None:
        with self.counting:
            self.cancelled += 1

    def decoded(self, new: list[int]) -> str:
        return self.tokenizer.decode([t for t in new if t not in self.stops], skip_special_tokens=True)

    def reply(self, new: list[int], stop: list[str] = ()) -> tuple[str, str]:
        """The reply's text and finish_reason: cut before the first `stop` string it holds (then "stop"), else
        stripped."""
        text = self.decoded(new)
        text = text[leading(text):]
        at = first_stop(text, stop)
        return (text.strip(), self.finish_reason(new)) if at is None else (text[:at], "stop")

    def finish_reason(self, new: list[int]) -> str:
        return "stop" if new and new[-1] in self.stops else "length"

    def usage(self, ids: list[int], new: list[int]) -> dict:
        return {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}


# /metrics in Prometheus' text format, as vLLM and TGI expose theirs: tokens generated, counted as each is made, and
# requests whose client went away before their reply was whole (while it was sent, generated, or still read)
METRICS = ("# TYPE glm_ft_generation_tokens_total counter\nglm_ft_generation_tokens_total {tokens}\n"
           "# TYPE glm_ft_requests_cancelled_total counter\nglm_ft_requests_cancelled_total {cancelled}\n")


def create_app(engine: Engine, names: list[str] | None = None):
    """`names`: the served model names (default: the engine's); a request's `model` must be one of them."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect

    names = names or [engine.name]
    started = int(time.time())
    app = FastAPI(title="glm-ft", docs_url=None, redoc_url=None)

    def error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": code}}, status_code=status)

    @app.exception_handler(Exception)
    async def server_error(request, err):  # starlette re-raises `err` after this answer: uvicorn logs its traceback
        return JSONResponse({"error": SERVER_ERROR}, status_code=500)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(METRICS.format(tokens=engine.tokens_generated, cancelled=engine.cancelled),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "glm-ft"}
                                           for name in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            body = await request.json()
        except ClientDisconnect:  # gone before its body came: no one to answer, nothing to log
            engine.count_cancelled()
            return Response(status_code=499)  # nginx's "client closed request"; nothing is sent
        except ValueError:
            return error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            text_only(body)
            model = requested_model(body, names)
            ids, gen = engine.prepare(body)
            include_usage = stream_usage(body)
            # set_seed (numpy's) takes 0 to 2**32 - 1 only: any other was a 500 mid-request
            seed = number("seed", body.get("seed"), None, 0, 2**32 - 1, integer=True)
            stop, tools = stop_strings(body), tools_offered(body)
        except ModelNotFound as err:
            return error(404, str(err), code="model_not_found", param="model")
        except BadRequest as err:
            return error(400, str(err))
        except ValueError as err:  # the tokenizer's own checks (e.g. a non-string content)
            return error(400, str(err))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.get("stream"):
            reply = StreamedReply(tools_offered=tools)
            return StreamingResponse(_stream(engine, ids, gen, seed, reply, completion_id, created, include_usage,
                                             model, stop), media_type="text/event-stream")
        # The client may go away while it waits for the whole reply: watch for that as StreamingResponse does for a
        # stream (once the body is read, `receive` returns only on a disconnect), and stop generating then.
        cancelled = threading.Event()
        watcher = asyncio.ensure_future(_until_disconnected(request.receive, cancelled))
        try:
            new = await run_in_threadpool(engine.generate, ids, gen, None, seed, cancelled, stop)
        finally:
            watcher.cancel()
        message, finish = reply_message(*engine.reply(new, stop), tools)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": engine.usage(ids, new)}

    return app


async def _until_disconnected(receive, cancelled: threading.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancelled.set()


async def _stream(engine: Engine, ids: list[int], gen, seed, reply: StreamedReply, completion_id: str, created: int,
                  include_usage: bool = False, model: str | None = None, stop: list[str] = ()):
    """Server-sent events: a role chunk, content chunks as text is decoded (or a tool call once it is whole), a
    chunk with finish_reason, with `include_usage` OpenAI's usage chunk (no choices; the others carry
    `"usage": null`), [DONE]."""
    import asyncio

    from transformers import TextIteratorStreamer

    def chunk(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model or engine.name, "choices": choices, **({"usage": usage} if include_usage else {})}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}
    cancelled = threading.Event()  # set when the client disconnects: the generation stops at its next token

    def work():
        try:
            result["new"] = engine.generate(ids, gen, streamer, seed, cancelled, stop)
        except BaseException as err:  # reported in the stream, its traceback in the log; the streamer must end
            traceback.print_exc()
            result["error"] = err
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield chunk({"role": "assistant", "content": ""})
        loop = asyncio.get_running_loop()
        cut = StopText(stop)
        while True:
            text = await loop.run_in_executor(None, lambda: next(streamer, None))
            for delta in reply.feed(cut.feed(text) if text is not None else cut.flush()):
                yield chunk(delta)
            if text is None:
                break
    except BaseException:  # the response was closed or cancelled mid-stream (client gone): free the model
        cancelled.set()
        raise
    await loop.run_in_executor(None, thread.join)
    if "error" in result:
        yield f"data: {json.dumps({'error': SERVER_ERROR})}\n\n"
    else:
        deltas, finish_reason = reply.finish("stop" if cut.stopped else engine.finish_reason(result["new"]),
                                             cut=cut.stopped)
        for delta in deltas:
            yield chunk(delta)
        yield chunk({}, finish_reason)
        if include_usage:
            yield chunk(None, usage=engine.usage(ids, result["new"]))
    yield "data: [DONE]\n\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_ft serve", description=__doc__.splitlines()[0])
    # Optional to argparse only: after --served-model-name's names it is their last word (see below)
    parser.add_argument("checkpoint", nargs="?",
                        help="run folder, checkpoint folder (LoRA, P-Tuning v2, freeze, SFT) or model folder")
    parser.add_argument("--base-model", help="base model folder (default: the one recorded at training time)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", "--model-name", nargs="+", metavar="NAME",
                        help="the model names served, as vLLM's option: /v1/models lists them, a request must name "
                             "one (or none: the first) (default: the checkpoint folder's name)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="default max_tokens of a request")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    parser.usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("[checkpoint]", "checkpoint")
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        # `--served-model-name a RUN`: the option's names took RUN too, as vLLM's do; RUN is the command's one
        # positional, so it is their last word.
        if not args.served_model_name or len(args.served_model_name) < 2:
            parser.error("the following arguments are required: checkpoint")
        args.checkpoint = args.served_model_name.pop()
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if args.served_model_name and not all(args.served_model_name):
        parser.error("--served-model-name: a name cannot be empty (a request without a model gets the first)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with heap.job_heap():  # the model frozen out of full collections while it serves (glm_ft/heap.py)
            return _serve(args)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down cleanly, then re-raised it; 130 as chat, no traceback
        return 130


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not listening: an address in use or a bad --host fails in one line before the
    model loads, and no connection is accepted until uvicorn listens on it, once the model is there."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as err:
        raise GlmFtError(f"--host {host}: {getattr(err, 'strerror', None) or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise GlmFtError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


def _serve(args: argparse.Namespace) -> int:
    try:
        from glm_ft.infer.checkpoint import find_checkpoint

        ckpt = find_checkpoint(args.checkpoint, args.base_model)  # a wrong path fails before the heavy imports
        sock = bind(args.host, args.port)
        import uvicorn

        from glm_ft.infer.checkpoint import load_checkpoint, quiet_transformers

        quiet_transformers()
        loaded = load_checkpoint(ckpt, dtype=args.dtype)
        names = args.served_model_name or [ckpt.path.parent.name if ckpt.path.name == FINAL else ckpt.path.name]
        app = create_app(Engine(loaded, names[0], args.max_new_tokens), names)
    except GlmFtError as err:
        to_stderr(f"error: {err}")
        return 1
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    host = f"[{args.host}]" if ":" in args.host else args.host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # listening now: the line a script may wait for
                served = ", ".join(map(repr, names))
                print(f"serving {ckpt.describe()} as {served} on http://{host}:{port}/v1", flush=True)

    heap.freeze()  # uvicorn and the app too: a request's full collection then walks only what requests made
    with sock:
        Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0

if __name__ == "__main__":
    sys.exit(main())
