"""Inference engines beyond the single-process Hugging Face path.

``labkit.load_model(name, engine="vllm", tensor_parallel_size=N)`` returns a
:class:`labkit.engines.vllm.VLLMModel`, a :class:`labkit.backends.Backend` like the Hugging Face
handles, so every public function takes it unchanged. Importing this package imports no engine
(vLLM is an optional dependency).
"""

from __future__ import annotations

__all__: list[str] = []
