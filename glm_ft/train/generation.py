"""Greedy decoding in which a row leaves the batch (and the KV cache) as soon as it stops.

`model.generate` decodes every row of a batch until the longest one ends: a row that stopped after 5 tokens still
costs a full forward slot at each of the remaining steps. Here a finished row is removed from the input, the
attention mask and every cache layer, so each step only pays for rows still writing. The result is the tensor
`generate` returns after the prompt (finished rows right-padded with pad_token_id, width = the longest row), so
callers can use either path.

Only plain greedy decoding is done here; anything else in the generation config (sampling, beams, logits
processors such as repetition_penalty, ZeRO-3's synced steps) goes to `model.generate` (`supports`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration

# Settings whose default leaves greedy decoding unchanged; any other value needs generate's logits processors.
_NEUTRAL = {
    "do_sample": (False, None), "num_beams": (1, None), "num_return_sequences": (1, None),
    "repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None), "min_length": (0, None),
    "min_new_tokens": (0, None), "bad_words_ids": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "encoder_repetition_penalty": (1.0, None), "renormalize_logits": (False, None),
    "max_time": (None,), "stop_strings": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,),
    "exponential_decay_length_penalty": (None,), "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None),
}


def _core_model(model):
    """The native ChatGLM3 under a PEFT wrapper (LoRA layers live inside it), or None if it is not one."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):  # DDP / DeepSpeed engine
        model = model.module
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        # Only adapters that sit inside the layers: PEFT's own prompt/prefix tuning feeds generate() extra inputs.
        if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
            return None
        model = model.get_base_model()
    return model if isinstance(model, ChatGLMForConditionalGeneration) else None


def supports(model, generation_config, synced_gpus: bool = False) -> bool:
    """True when `greedy_generate` gives exactly what `model.generate` would."""
    if synced_gpus or generation_config.max_new_tokens is None or _core_model(model) is None:
        return False
    return all(getattr(generation_config, key, None) in values for key, values in _NEUTRAL.items())


def greedy_generate(model, input_ids, attention_mask, generation_config):
    """Greedy continuations of left-padded prompts: [batch, steps] ids, pad_token_id after a row's stop token."""
    core = _core_model(model)
    stops = generation_config.eos_token_id
    stops = torch.tensor([stops] if isinstance(stops, int) else list(stops or []), device=input_ids.device)
    pad = generation_config.pad_token_id
    if pad is None:  # generate() pads with the first stop id then
        pad = int(stops[0]) if len(stops) else 0
    batch = input_ids.shape[0]
    out = torch.full((batch, generation_config.max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    rows = torch.arange(batch, device=input_ids.device)  # the original row of each row still in the batch
    cache = DynamicCache(config=core.config)
    mask, step_ids, steps = attention_mask, input_ids, 0
    with torch.no_grad():
        while steps < generation_config.max_new_tokens and len(rows):
            logits = core(input_ids=step_ids, attention_mask=mask, cache=cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]
            token = logits.float().argmax(-1)
            out[rows, steps] = token
            steps += 1
            going = ~torch.isin(token, stops)
            if not bool(going.all()):
                keep = going.nonzero().squeeze(-1)
                rows, token, mask = rows[keep], token[keep], mask[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat((mask, mask.new_ones(len(rows), 1)), dim=1)
            step_ids = token[:, None]
    return out[:, :steps]


def generate(model, input_ids, attention_mask, generation_config, synced_gpus: bool = False):
    """`greedy_generate` where it is exact, else `model.generate`; the continuation only (prompt removed)."""
    if supports(model, generation_config, synced_gpus):
        return greedy_generate(model, input_ids, attention_mask, generation_config)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                               generation_config=generation_config, synced_gpus=synced_gpus)
    return generated[:, input_ids.shape[1]:]
