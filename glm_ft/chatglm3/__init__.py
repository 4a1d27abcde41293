"""Native ChatGLM3 for transformers: configuration, model, tokenizer, P-Tuning v2 prefix, tiny test model.

Importing this package is light (glm_ft.chatglm3.tiny's TINY_CONFIG is read by dry runs); `register()` and the
submodules other than tiny import transformers and torch.
"""

import sys
import types

_MODULES = ("configuration", "modeling", "tokenization")
_registered = False
_pending = False


def register() -> None:
    """Register model_type "chatglm" with transformers' Auto classes (idempotent).

    A THUDM/chatglm3-6b folder then loads through AutoConfig / AutoModel / AutoModelForCausalLM / AutoTokenizer with
    trust_remote_code False: transformers prefers a registered class over the folder's `auto_map` and never imports
    the folder's .py files.
    """
    global _registered, _pending
    if _registered:
        return
    try:
        from .configuration import ChatGLMConfig
        from .modeling import ChatGLMForConditionalGeneration
        from .tokenization import ChatGLMTokenizer
    except ImportError:
        # `glm_ft` registers right after transformers is first imported. When that first import happens inside one
        # of our own modules, that module is only half-defined now; the registration waits until it is complete.
        if not _half_imported():
            raise
        _pending = True
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    # The published auto_map sends AutoModel to the causal-LM class too.
    AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    _registered, _pending = True, False


def _half_imported() -> bool:
    modules = (sys.modules.get(f"{__name__}.{name}") for name in _MODULES)
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False) for m in modules)


class _Package(types.ModuleType):
    """Python sets each submodule as an attribute of its package as soon as the submodule has finished importing:
    the moment to finish a registration that had to wait."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if _pending and isinstance(value, types.ModuleType):
            register()


sys.modules[__name__].__class__ = _Package
