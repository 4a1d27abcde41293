"""Chat in the terminal with what a run trained (or any ChatGLM3 model folder).

    python -m glm_ft chat outputs/2026-11-27/12-00-00            # a run folder: final/ or its newest checkpoint
    python -m glm_ft chat outputs/.../checkpoint-500 --system "你是一个广告文案助手"
    python -m glm_ft chat RUN --prompt "类型#裙*颜色#红色"        # answer once on stdout, exit 0 (for scripts)
    python -m glm_ft chat RUN --do-sample --temperature 0.8 --top-p 0.8 --seed 1

Interactive mode reads one message per line from stdin: `clear` starts a new conversation, `exit`, `quit` or end of
input leaves. The whole conversation is re-encoded every turn with ChatGLM3's own chat format, so the model sees
exactly what it was trained on; replies stream as they are generated (glm_ft.infer.session).

Light at import (`--help`, and a wrong path fails before seconds of imports); the session is imported once a
checkpoint is found.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from glm_ft.heap import job_heap
from glm_ft.methods import DTYPE_NAMES
from glm_ft.errors import GlmFtError, to_stderr


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_ft chat", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint",
                        help="run folder, checkpoint folder (LoRA, P-Tuning v2, freeze, SFT) or model folder")
    parser.add_argument("--base-model", help="base model folder (default: the one recorded at training time)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--prompt", help="answer this one message on stdout and exit")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="with --do-sample")
    parser.add_argument("--top-p", type=float, help="with --do-sample")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        parser.error("--temperature and --top-p need --do-sample")
    # What transformers' generate() refuses (with a traceback) or divides by: the bounds training's config has.
    if args.temperature is not None and not args.temperature > 0:
        parser.error("--temperature must be > 0 (greedy decoding: leave out --do-sample)")
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        parser.error("--top-p must be in [0, 1]")
    return args


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    from glm_ft.infer.checkpoint import find_checkpoint

    # A wrong path fails here, before seconds of imports.
    ckpt = find_checkpoint(args.checkpoint, args.base_model)

    from transformers import set_seed

    from glm_ft.infer.checkpoint import generation_config, load_checkpoint, quiet_transformers
    from glm_ft.infer.session import ChatSession

    quiet_transformers()
    loaded = load_checkpoint(ckpt, dtype=args.dtype)
    gen = generation_config(loaded.tokenizer, args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        set_seed(args.seed)
    session = ChatSession(loaded, gen, args.system)
    if args.prompt is not None:
        session.ask(args.prompt, stdout)
        return 0
    _interactive(session, loaded, stdin, stdout)
    return 0


def _interactive(session, loaded: Any, stdin: TextIO, stdout: TextIO) -> None:
    from glm_ft.infer.session import TooLong

    stdout.write(f"{loaded.checkpoint.describe()}\n'clear' starts over, 'exit' or 'quit' (or Ctrl-D) leaves.\n")
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        query = line.strip()
        if query in ("exit", "quit"):
            return
        if query == "clear":
            session.clear()
            stdout.write("(history cleared)\n")
            continue
        if not query:
            continue
        try:
            ids = session.prompt_ids(query)
        except TooLong as err:
            stdout.write(f"(not sent: {err})\n")
            continue
        stdout.write("Assistant: ")
        session.ask(query, stdout, ids)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    args = parse_args(argv)
    try:
        with job_heap():  # the loaded model frozen out of full collections while chatting (glm_ft/heap.py)
            return run(args, stdin or sys.stdin, stdout or sys.stdout)
    except GlmFtError as err:
        to_stderr(f"error: {err}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
