"""glm-ft: Hydra-composed fine-tuning of ChatGLM3 (LoRA, P-Tuning v2, full SFT) on today's transformers.

Importing glm_ft registers the native ChatGLM3 (`model_type` "chatglm") with transformers' Auto classes, so a
THUDM/chatglm3-6b folder loads with trust_remote_code left False. The registration waits until transformers is
imported: composing and validating a config (a dry run) must not pay for torch and transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


def register() -> None:
    from glm_ft.chatglm3 import register as _register

    _register()


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Runs `register()` right after `import transformers` finishes, whoever imports it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    register()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
