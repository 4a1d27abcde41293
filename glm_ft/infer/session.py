"""A conversation with a loaded checkpoint (chat's heavy half): the history re-encoded every turn with ChatGLM3's
chat format, trimmed from the oldest turn when over the context, and the reply streamed as it is generated.
"""

from __future__ import annotations

from typing import TextIO

import torch
from transformers import TextStreamer

from glm_ft.errors import GlmFtError
from glm_ft.train.evaluation import decode_rows


class TooLong(GlmFtError):
    """The new message alone, with the new tokens, does not fit the model's context: refused, history kept."""


class ChatSession:
    """A conversation with a loaded checkpoint: history, optional system prompt, generation settings."""

    def __init__(self, loaded, generation_config, system: str | None = None):
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.generation_config = generation_config
        self.system = system
        self.history: list[dict[str, str]] = []

    def clear(self) -> None:
        self.history = []

    def messages(self, query: str, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *(self.history if history is None else history), {"role": "user", "content": query}]

    def prompt_ids(self, query: str) -> list[int]:
        """The conversation + `query` + `<|assistant|>`; when over the model's context, the oldest turns go first
        (the system prompt stays). TooLong, with the history as it was, when even the message alone does not fit
        with the new tokens: generating anyway would run past the context the model was trained for."""
        context, new = self.model.config.seq_length, self.generation_config.max_new_tokens
        history = list(self.history)
        ids = self.tokenizer.apply_chat_template(self.messages(query, history), add_generation_prompt=True)
        while len(ids) + new > context and history:
            history = history[2:]
            ids = self.tokenizer.apply_chat_template(self.messages(query, history), add_generation_prompt=True)
        if len(ids) + new > context:
            raise TooLong(f"the message ({len(ids)} tokens in the chat format) plus --max-new-tokens ({new}) exceeds "
                          f"the model's context of {context} tokens")
        self.history = history
        return ids

    def ask(self, query: str, out: TextIO | None = None, ids: list[int] | None = None) -> str:
        """Reply to `query` (streamed to `out` when given), remember the turn and return the reply. `ids`: its
        prompt_ids, when already built."""
        ids = self.prompt_ids(query) if ids is None else ids
        input_ids = torch.tensor([ids], device=self.model.device)
        streamer = ReplyStreamer(self.tokenizer, out) if out is not None else None
        with torch.no_grad():
            generated = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                            generation_config=self.generation_config, streamer=streamer)
        reply = decode_rows(self.tokenizer, generated[:, len(ids):], self.generation_config.eos_token_id)[0]
        self.history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        return reply


class ReplyStreamer(TextStreamer):
    """A TextStreamer writing the reply to a chosen stream as it is generated, without the reply's leading newline
    (ChatGLM3 replies begin with "\\n")."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()
