"""glm-ft: Hydra-composed fine-tuning of ChatGLM3 (LoRA, P-Tuning v2, full SFT) on today's transformers.

Importing glm_ft is light: composing and validating a config (a dry run) must not pay for torch and transformers.
The native ChatGLM3 is registered with transformers' Auto classes explicitly, where models are loaded
(`glm_ft.chatglm3.register()`, called by `glm_ft.model`).
"""

__version__ = "0.1.0"
