"""ChatGLM3's tokenizer for transformers 5: SentencePiece plus nine special tokens appended after its vocabulary.

Ids are the published model's: the SentencePiece pieces keep their ids (unk 0, which is also the pad, `<s>` 1,
`</s>` 2 the eos), then `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop`, `<|system|>`, `<|user|>`, `<|assistant|>`,
`<|observation|>` take ids n..n+8 where n is the SentencePiece vocabulary size (64,789 for chatglm3-6b).

A conversation is `[gMASK] sop` + for every message `<|role|>` + encode(f"{metadata}\\n") + encode(content); a
system message that carries `tools` gets them appended as JSON. Message text is always encoded by SentencePiece
alone, so text that merely looks like a special token ("<|user|>" typed by a user) never becomes one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")

# "sop" and "eop" are ordinary words too ("isopropyl"); matching them inside typed text would corrupt it, so only
# tokens that cannot occur by accident are recognised when raw text is tokenized.
_MATCHED_IN_TEXT = tuple(token for token in SPECIAL_TOKENS if token not in ("sop", "eop"))

# The original tokenizer's aliases for the SentencePiece control pieces.
_COMMAND_ALIASES = {"<bos>": "<s>", "<eos>": "</s>", "<pad>": "<unk>", "<unk>": "<unk>"}

_ASSETS = Path(__file__).resolve().parent / "assets"


def tiny_tokenizer_path() -> Path:
    """The small SentencePiece model shipped for tests and tiny runs (built by `assets/build_tiny_tokenizer.py`)."""
    return _ASSETS / "tiny_tokenizer.model"


def load_tiny_tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer(vocab_file=str(tiny_tokenizer_path()))


def message_text(role: str, content: str, tools: Any = None) -> str:
    """The text that stands for a message's content: a system message's tools are appended as JSON, as ChatGLM3
    was trained (indent 4, non-ASCII kept)."""
    if tools is not None and role == "system":
        return content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    return content


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self, vocab_file: str, padding_side: str = "left", clean_up_tokenization_spaces: bool = False, **kwargs
    ):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
        n = self.sp_model.get_piece_size()
        self._special_ids = {token: n + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: token for token, i in self._special_ids.items()}
        self._base_vocab: dict[str, int] | None = None

        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("pad_token", "<unk>")
        # A saved config may carry these tokens with other flags (the published one marks some non-special and
        # "sop" as matchable); ours win so that every checkpoint tokenizes the same way.
        loaded = kwargs.pop("added_tokens_decoder", {}) or {}
        self._added_tokens_decoder = {int(i): tok for i, tok in loaded.items() if int(i) not in self._special_by_id}
        for token in _MATCHED_IN_TEXT:
            self._added_tokens_decoder[self._special_ids[token]] = AddedToken(
                token, lstrip=False, rstrip=False, single_word=False, normalized=False, special=True
            )
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # --- ChatGLM3 API (same names and results as the original tokenization_chatglm.py) ---

    def get_command(self, token: str) -> int:
        """Id of a special token: one of SPECIAL_TOKENS, or `<bos>`, `<eos>`, `<pad>`, `<unk>`."""
        if token in self._special_ids:
            return self._special_ids[token]
        if token in _COMMAND_ALIASES:
            return self.sp_model.piece_to_id(_COMMAND_ALIASES[token])
        raise ValueError(f"{token!r} is not a ChatGLM3 special token")

    def get_prefix_tokens(self) -> list[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def sp_encode(self, text: str) -> list[int]:
        """SentencePiece ids of `text`, with no special-token matching."""
        return self.sp_model.encode(text)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return [self.get_command(f"<|{role}|>")] + self.sp_encode(f"{metadata}\n") + self.sp_encode(message)

    def build_message(self, message: Mapping[str, Any]) -> list[int]:
        """Ids of one message given as a mapping with role, content and optional metadata and tools."""
        role = message["role"]
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"content of a {role} message must be a string, got {type(content).__name__}")
        metadata = message.get("metadata") or ""
        return self.build_single_message(role, metadata, message_text(role, content, message.get("tools")))

    def build_chat_input(
        self,
        query: str,
        history: Sequence[Mapping[str, Any]] | None = None,
        role: str = "user",
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """Prompt for the model's next turn: prefix, the history, `query` as a `role` message, then `<|assistant|>`."""
        ids = self.get_prefix_tokens()
        for item in history or []:
            ids += self.build_message(item)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return self.pad({"input_ids": [ids]}, padding=False, return_tensors=return_tensors)

    def encode_conversation(
        self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and a mask that is 1 on the tokens an assistant produced (after its role
        token)."""
        ids = self.get_prefix_tokens()
        mask = [0] * len(ids)
        for message in conversation:
            message_ids = self.build_message(message)
            ids += message_ids
            produced = 1 if message["role"] == "assistant" else 0
            mask += [0] + [produced] * (len(message_ids) - 1)
        if add_generation_prompt:
            ids.append(self.get_command("<|assistant|>"))
            mask.append(0)
        return ids, mask

    def apply_chat_template(
        self,
        conversation,
        tools: list[dict] | None = None,
        documents=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        sanitize_control_tokens: bool = False,
        padding=False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors=None,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        """ChatGLM3's prompt format built from ids, exactly as the model was trained; the Jinja template of the
        published tokenizer_config.json renders different ids and is used only when `chat_template` is passed.

        `tools` (or `tools` on a system message) is rendered as JSON on the system message; when the conversation
        has no leading system message, one with empty content is added for them. Returns the ids (a list, or a list
        of lists for a batch), a BatchEncoding with `return_dict=True`, or with `tokenize=False` a readable string
        that is for display only (re-tokenizing it does not give the same ids).
        """
        if chat_template is not None:
            return super().apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=tokenize, sanitize_control_tokens=sanitize_control_tokens, padding=padding,
                truncation=truncation, max_length=max_length, return_tensors=return_tensors, return_dict=return_dict,
                return_assistant_tokens_mask=return_assistant_tokens_mask, tokenizer_kwargs=tokenizer_kwargs, **kwargs,
            )
        if documents:
            raise ValueError("ChatGLM3's chat format has no place for documents")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        encoded = [
            self.encode_conversation(_with_tools(list(conv), tools), add_generation_prompt) for conv in conversations
        ]
        if truncation and max_length is not None:
            cut = (lambda seq: seq[-max_length:]) if self.truncation_side == "left" else (lambda seq: seq[:max_length])
            encoded = [(cut(ids), cut(mask)) for ids, mask in encoded]

        if not tokenize:
            texts = [self.decode(ids) for ids, _ in encoded]
            return texts if batched else texts[0]
        if not return_dict:
            if return_tensors is None:
                ids = [ids for ids, _ in encoded]
                return ids if batched else ids[0]
            return self.pad({"input_ids": [ids for ids, _ in encoded]}, padding=padding, max_length=max_length,
                            return_tensors=return_tensors)["input_ids"]
        features: dict[str, Any] = {"input_ids": [ids for ids, _ in encoded]}
        if return_assistant_tokens_mask:
            features["assistant_masks"] = [mask for _, mask in encoded]
        if not batched and return_tensors is None:
            single = {key: value[0] for key, value in features.items()}
            return self.pad(single, padding=padding, max_length=max_length)
        if return_assistant_tokens_mask and padding:
            raise ValueError("return_assistant_tokens_mask with padding is not supported")
        return self.pad(features, padding=padding, max_length=max_length, return_tensors=return_tensors)

    # --- slow-tokenizer interface of transformers 5 ---

    @property
    def vocab_size(self) -> int:
        # The special tokens are part of the model's vocabulary, as in the original tokenizer.
        return self.sp_model.get_piece_size() + len(SPECIAL_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_model.get_piece_size())}
            vocab.update(self._special_ids)
            self._base_vocab = vocab
        return {**self._base_vocab, **self._added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._special_ids:
            return self._special_ids[token]
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._special_by_id:
            return self._special_by_id[index]
        return self.sp_model.id_to_piece(index)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return [1 if self._is_control(int(i)) else 0 for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._join(tokens, self._special_ids.__contains__, self.sp_model.decode_pieces)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """Special tokens are rendered by name unless skipped; `<s>`, `</s>` and the pad never show (as in the
        original). Ids outside the vocabulary (from a padded output layer) and negative ids (-100 labels) have no
        text and are dropped."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        size = self.vocab_size
        kept = []
        for index in map(int, token_ids):
            if index < 0 or index >= size or index in self._invisible_ids:
                continue
            if skip_special_tokens and index in self._special_by_id:
                continue
            kept.append(index)
        text = self._join(kept, self._special_by_id.__contains__, self.sp_model.decode_ids, self._special_by_id.get)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    @property
    def _invisible_ids(self) -> set[int]:
        return {self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()} - {-1}

    def _is_control(self, index: int) -> bool:
        return index in self._special_by_id or index in self._invisible_ids

    @staticmethod
    def _join(items, is_special, decode, name=lambda item: item) -> str:
        # SentencePiece decodes each run between special tokens on its own, as the original did, so a run's
        # dummy-prefix space is dropped: "<|user|>" + [▁, \n, …] reads "<|user|>\n…".
        parts, run = [], []
        for item in items:
            if is_special(item):
                if run:
                    parts.append(decode(run))
                    run = []
                parts.append(name(item))
            else:
                run.append(item)
        if run:
            parts.append(decode(run))
        return "".join(parts)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = Path(save_directory) / name
        path.write_bytes(self.sp_model.serialized_model_proto())
        return (str(path),)


def _with_tools(conversation: list[Mapping[str, Any]], tools: list[dict] | None) -> list[Mapping[str, Any]]:
    if not tools:
        return conversation
    if conversation and conversation[0].get("role") == "system":
        if conversation[0].get("tools") is not None:
            raise ValueError("tools given both as an argument and on the system message")
        return [{**conversation[0], "tools": tools}, *conversation[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *conversation]
