"""ChatGLM3's tokenizer as a stock `tokenizers` fast tokenizer (`tokenizer.json`) plus a Jinja chat template, so
that transformers' `AutoTokenizer` and `apply_chat_template` reproduce glm-ft's ids with no code of ours.

The SentencePiece model is converted by transformers' own converter (`SpmConverter.build_tokenizer_from_spm_proto`,
which follows the model's normalizer spec), in its "legacy" form: every chunk of text between two added tokens gets
SentencePiece's dummy prefix, exactly as glm-ft encodes `metadata + "\\n"` and the content of each message on their
own. The nine special tokens are appended at glm-ft's ids (n..n+8, n = the SentencePiece vocabulary size).

The template writes `<|role|>` + metadata + "\\n" and, for non-empty content, " " + content: the space stands for
the content's own dummy prefix, so one chunk "▁{metadata}\\n▁{content}" is the concatenation of the two encodings.

One difference remains, documented in the README: a rendered chat is plain text, so control tokens typed inside
a message ("<|user|>", "[gMASK]", a lone word "sop") are matched as tokens by a plain `apply_chat_template`;
glm-ft never matches them in message text. transformers' `sanitize_control_tokens=True` encodes them as text.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tokenization import ROLES, SPECIAL_TOKENS

# Published stop tokens: eos, then the two role tokens after which the model waits for someone else.
WORDS = ("sop", "eop")
# How transformers 5 loaded a tokenizer; nothing a reader of the files needs.
_BOOKKEEPING = ("backend", "is_local", "local_files_only", "name_or_path", "_name_or_path")
STOP_TOKENS = ("</s>", "<|user|>", "<|observation|>")

# Tools given to apply_chat_template(tools=...) go on the first system message (one with empty content is added
# when there is none), as glm-ft's tokenizer does; tools on a system message itself are rendered the same way.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(tools_pending=(tools is defined and tools is not none and tools | length > 0)) -%}"
    "[gMASK]sop"
    "{%- if ns.tools_pending and (messages | length == 0 or messages[0].role != 'system') -%}"
    "<|system|>{{ '\\n \\n' ~ (tools | tojson(indent=4)) }}"
    "{%- set ns.tools_pending = false -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role not in " + repr(list(ROLES)) + " -%}"
    "{{ raise_exception('unknown role ' ~ message.role ~ '; expected one of " + ", ".join(ROLES) + "') }}"
    "{%- endif -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{%- if message.role == 'system' -%}"
    "{%- if message.tools is defined and message.tools is not none -%}"
    "{%- set content = content ~ '\n' ~ (message.tools | tojson(indent=4)) -%}"
    "{%- elif loop.first and ns.tools_pending -%}"
    "{%- set content = content ~ '\n' ~ (tools | tojson(indent=4)) -%}"
    "{%- endif -%}"
    "<|system|>"
    "{%- elif message.role == 'user' -%}<|user|>"
    "{%- elif message.role == 'assistant' -%}<|assistant|>"
    "{%- else -%}<|observation|>"
    "{%- endif -%}"
    "{{ (message.metadata if message.metadata is string else '') ~ '\\n' }}"
    "{%- if content -%}{{ ' ' ~ content }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_fast_tokenizer(sp_model_file: str | Path):
    """A `tokenizers.Tokenizer` encoding like glm-ft's ChatGLMTokenizer, special tokens at the published ids."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model_file).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tokenizer is None:
        raise ValueError(f"{sp_model_file}: not a BPE or Unigram SentencePiece model")
    n = len(proto.pieces)
    # Added in order, so they take ids n, n+1, ...: the ids the model was trained with.
    # "sop"/"eop" are also letters inside words ("isopropyl"): matched only as a whole word, which the template's
    # "[gMASK]sop<|" is.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False, single_word=token in WORDS)
                                  for token in SPECIAL_TOKENS])
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != n + i:
            raise ValueError(f"{token} got id {tokenizer.token_to_id(token)}, expected {n + i}")
    return tokenizer


def save_fast_tokenizer(sp_model_file: str | Path, out: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json in `out`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(sp_model_file),
        unk_token="<unk>", eos_token="</s>", pad_token="<unk>", padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out))
    # transformers 5 writes the template to chat_template.jinja and names its own backend class; the template goes
    # into tokenizer_config.json and the class is the one transformers 4 knows too, so older stacks load it.
    jinja = out / "chat_template.jinja"
    jinja.unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in _BOOKKEEPING}
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
