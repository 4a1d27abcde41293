"""Native ChatGLM3 for transformers: configuration, model, tokenizer, P-Tuning v2 prefix, tiny test model.

Importing this package is light (glm_ft.chatglm3.tiny's TINY_CONFIG is read by dry runs, tool_call by the data
readers); `register()` and the submodules other than tiny and tool_call import transformers and torch.
"""

_registered = False


def register() -> None:
    """Register model_type "chatglm" with transformers' Auto classes (idempotent).

    A THUDM/chatglm3-6b folder then loads through AutoConfig / AutoModel / AutoModelForCausalLM / AutoTokenizer with
    trust_remote_code False: transformers prefers a registered class over the folder's `auto_map` and never imports
    the folder's .py files. Called where models are loaded, not at import, so that importing glm_ft stays light.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .configuration import ChatGLMConfig
    from .modeling import ChatGLMForConditionalGeneration
    from .tokenization import ChatGLMTokenizer

    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    # The published auto_map sends AutoModel to the causal-LM class too.
    AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    _registered = True
