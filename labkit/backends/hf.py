"""The Hugging Face backends: the TransformerLens bridge with its plain twin, and a plain model.

:class:`LabModel` is what ``labkit.load_model`` attaches to the bridge it returns
(``bridge.labkit``): the bridge, its plain Hugging Face twin (same parameter tensors), labkit's
tokenizer and the BOS rule. Interventions are eager hooks (:mod:`labkit.hooks`): steering on the
hook points the vectors name, expert masks on router modules, on the twin *and* on the modules
the bridge calls, so every forward pass inside the block sees them. :class:`PlainHFBackend`
serves a Hugging Face model labkit did not load (MoE routing traces and masks).
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from labkit.backends.base import CAPABILITIES, Backend, check_vector_fits
from labkit.backends.hf_capture import capture_batch, check_cache_point, probe_shapes, token_logprobs
from labkit.backends.hf_masking import open_masks, open_selections
from labkit.backends.hf_steering import Adder, CallState, row_hooks
from labkit.checks import check_layer, layer_of
from labkit.backends.hooks import attach, intervene, resolve_hook
from labkit.interventions import Selection
from labkit.moe.routers import family_of_config, find_routers_in
from labkit.tokens import encode_prompt, eos_token_ids, left_pad, trim_completion

__all__ = ["LabModel", "PlainHFBackend", "plain_backend"]


class HuggingFaceRuns(Backend):
    """What both Hugging Face backends run the same way: masks on routers, traces, the generate loop."""

    @property
    def n_ctx(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def vocab_size(self) -> int | None:
        """Rows of the input embedding (what a token id indexes), else ``config.vocab_size``."""
        module = self.module
        embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
        if embeddings is not None and hasattr(embeddings, "num_embeddings"):
            return int(embeddings.num_embeddings)
        return super().vocab_size

    @property
    def eos_ids(self) -> set[int]:
        return eos_token_ids(getattr(self.module, "generation_config", None), self.tokenizer)

    @property
    def pad_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return int(self.config.pad_token_id or 0)

    def mirrors(self, twin_module: torch.nn.Module) -> list[torch.nn.Module]:
        return [twin_module]

    # -- expert masks ---------------------------------------------------------------------

    def open_selections(self, layer: int) -> list[Selection]:
        """The selections of the masks open on MoE ``layer`` now (what a new mask merges with)."""
        routers = {r.layer: r for r in find_routers_in(self.module)}
        return open_selections(routers[layer].router) if layer in routers else []

    @contextlib.contextmanager
    def masked(self, selections: Mapping[int, Selection]) -> Iterator[torch.nn.Module]:
        """Hook each masked layer's router (twin and bridge side) with the family's exact routing."""
        family = family_of_config(self.config)
        routers = {r.layer: r for r in find_routers_in(self.module)}
        plan = []
        for layer, selection in sorted(selections.items()):
            moe_layer = routers[layer]
            device = next(moe_layer.router.parameters()).device
            moved = Selection(
                selection.off.to(device), selection.on.to(device), None if selection.bias is None else selection.bias.to(device)
            )
            plan.append((moe_layer, moved, self.mirrors(moe_layer.router)))
        with open_masks(plan, family):
            yield self.module

    # -- runs -----------------------------------------------------------------------------

    def generate_loop(self, rows: Sequence[Sequence[int]], *, max_new_tokens: int, streamer: Any = None, **config: Any) -> list[list[int]]:
        """The one generation loop of the Hugging Face path: ``generate`` on left-padded token rows.

        Rows are left-padded into one batch with an attention mask (``generate`` derives position
        ids from it, so each row equals its solo run). Greedy unless ``config`` asks for sampling.
        Whatever hooks are attached (steering, expert masks) apply.

        Returns:
            The new token ids of each row, up to and including its first end-of-sequence token.
        """
        from transformers import GenerationConfig

        module = self.module
        device = next(module.parameters()).device
        eos_ids = self.eos_ids
        input_ids, attention_mask, _ = left_pad(rows, self.pad_id, device)
        width = input_ids.shape[1]
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(eos_ids) or None,
            **{"do_sample": False, **config},
        )
        with torch.no_grad():
            sequences = module.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, streamer=streamer
            )
        return [trim_completion(row.tolist(), eos_ids, self.pad_id) for row in sequences[:, width:].cpu()]

    def generate_ids(
        self,
        rows: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        streamer: Any = None,
        use_cache: bool = True,
        steering_per_row: Sequence[Sequence[Any]] | None = None,
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """New token ids per row under the open interventions (+ per-row steering), see ``labkit.generate``.

        Raises:
            ValueError: a keyword that is not a ``transformers.GenerationConfig`` field (the
                message suggests the nearest).
        """
        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict())
        unknown = sorted(set(generate_kwargs) - known)
        if unknown:
            names = [*known, "max_new_tokens", "temperature", "top_p", "top_k", "seed", "chat", "prepend_bos", "streamer", "use_cache", "steering", "steering_per_row"]
            close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hints = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
            raise ValueError(
                f"generate: unknown keyword argument(s) {hints}; extra keywords must be "
                "transformers GenerationConfig fields (e.g. min_new_tokens, repetition_penalty)."
            )
        sampling = temperature > 0
        width = max(len(row) for row in rows)  # the left-padded prompt block every row shares
        device = next(self.module.parameters()).device
        with contextlib.ExitStack() as stack:
            if seed is not None:
                devices = [device] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(seed)
            if steering_per_row is not None:
                stack.enter_context(self.steered([], rows=steering_per_row))
            stack.enter_context(self.generating(width))
            return self.generate_loop(
                rows,
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=top_k if sampling else None,
                bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
                use_cache=use_cache,
                **generate_kwargs,
            )

    @contextlib.contextmanager
    def generating(self, prompt_length: int) -> Iterator[None]:
        """Nothing to declare on a plain model (no steering observer reads it)."""
        yield

    def record_routing(
        self, rows: Sequence[Sequence[int]], keep_from: Sequence[int], *, include_router_logits: bool = False
    ) -> list[dict[str, Tensor]]:
        """Run the rows as one left-padded batch and read every router's own output.

        Returns:
            One dict per row: ``topk_indices`` ``[layer, kept, k]``, ``topk_weights`` (float32) and,
            if asked, ``router_logits`` ``[layer, kept, expert]`` for the row's tokens from
            ``keep_from`` on (padding dropped).
        """
        from labkit.backends.hooks import module_hooks

        routers = find_routers_in(self.module)
        device = next(self.module.parameters()).device
        input_ids, attention_mask, position_ids = left_pad(rows, self.pad_id, device)
        width = input_ids.shape[1]
        records: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in routers]

        def reader(slot, moe_layer):
            def hook(_module, _inputs, output):
                router_logits, topk_weights, topk_indices = moe_layer.read(output)
                slot.append((router_logits.detach(), topk_weights.detach(), topk_indices.detach()))

            return hook

        with torch.inference_mode(), module_hooks([(m.router, reader(slot, m)) for slot, m in zip(records, routers)]):
            self.module(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, logits_to_keep=1
            )
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, row in enumerate(rows):
            keep[b, width - len(row) + keep_from[b] :] = True
        counts = keep.sum(-1).tolist()
        flat_keep = keep.to(device).reshape(-1)
        fields = ["topk_indices", "topk_weights"] + (["router_logits"] if include_router_logits else [])
        per_layer = []
        for record in records:
            (logits, weights, indices), = record
            picked = {"topk_indices": indices[flat_keep], "topk_weights": weights[flat_keep].float()}
            if include_router_logits:
                picked["router_logits"] = logits[flat_keep].float()
            per_layer.append({k: v.cpu() for k, v in picked.items()})
        out = [{} for _ in rows]
        for name in fields:
            stacked = torch.stack([layer[name] for layer in per_layer])  # (layer, kept tokens, ...)
            for b, part in enumerate(torch.split(stacked, counts, dim=1)):
                out[b][name] = part
        return out


class LabModel(HuggingFaceRuns):
    """labkit's side of one model handle: the bridge, its plain twin, tokenizer and rules.

    ``load_model`` returns the TransformerBridge (the object a user holds); its ``labkit``
    attribute is this record. Everything labkit runs on the model goes through it: the twin
    (shared parameters, kept in sync after ``model.to(...)``), the tokenisation rule
    (:meth:`encode`, the bridge's BOS rule), the original Hugging Face modules the bridge wraps
    (where interventions hook so that the bridge's own forward, ``run_with_cache`` and
    ``generate`` see them), and the prompt length of a running ``labkit.generate`` call.

    Attributes:
        name: the canonical name of the model (steering vectors and masks record it).
        bridge: the TransformerBridge.
        tokenizer: labkit's tokenizer (left padding, pad token set); never the caller's object.
        prepend_bos: the model's BOS rule (``bridge.cfg.default_prepend_bos``): whether a BOS
            token starts every plain prompt.
        module_paths: ``id(module) -> dotted path`` of every module of the original Hugging
            Face model, recorded before booting.
        original_modules: ``dotted path -> module`` of those same original modules (the
            objects the bridge's components call).
        prompt_length: the padded prompt width of the ``labkit.generate`` call running now,
            else ``None`` (set by :meth:`generating`).
    """

    kind = "transformer_lens"
    capabilities = frozenset(CAPABILITIES)

    def __init__(self, name, bridge, twin, tokenizer, original_modules: dict[str, torch.nn.Module]):
        self.name = name
        self.bridge = bridge
        self._twin = twin
        self.tokenizer = tokenizer
        self.original_modules = original_modules
        self.module_paths = {id(module): path for path, module in original_modules.items()}
        #: hook name -> per-position shape, probed once (:meth:`activation_shapes`)
        self.activation_shape_memo: dict[str, tuple[int, ...]] = {}
        self.prompt_length: int | None = None
        self.hook_index = None  # labkit.hooks' name index and probe results, built on first use
        self._twin_modules = dict(twin.named_modules())
        self._twin_paths = {id(module): path for path, module in self._twin_modules.items()}

    # -- the plain twin ---------------------------------------------------------------------

    @property
    def twin(self) -> torch.nn.Module:
        """The plain Hugging Face twin, re-linked to the bridge's current tensors first.

        ``model.to(dtype)`` converts parameters in place (the twin shares them) but replaces
        buffers (rotary tables) and, under some settings, parameters; this puts the bridge's
        current tensors back into the twin so both always compute with the same weights.
        """
        self.sync()
        return self._twin

    def sync(self) -> None:
        """Make every twin module hold the very tensors of its original (bridge-side) module."""
        for path, original in self.original_modules.items():
            mirror = self._twin_modules.get(path)
            if mirror is None:
                continue
            for store in ("_parameters", "_buffers"):
                theirs, ours = getattr(original, store), getattr(mirror, store)
                for key, tensor in theirs.items():
                    if ours.get(key) is not tensor:
                        ours[key] = tensor

    def mirrors(self, twin_module: torch.nn.Module) -> list[torch.nn.Module]:
        """``[twin_module, original_module]``: a twin module and the module the bridge calls in its place.

        Interventions that hook Hugging Face modules directly (expert masks on routers) hook
        both, so the bridge's own forward sees them as well as labkit's twin runs.
        """
        path = self._twin_paths.get(id(twin_module))
        original = self.original_modules.get(path) if path is not None else None
        return [twin_module] if original is None or original is twin_module else [twin_module, original]

    # -- the BOS rule and tokenisation ------------------------------------------------------

    @property
    def prepend_bos(self) -> bool:
        return bool(getattr(self.bridge.cfg, "default_prepend_bos", True))

    def encode(self, prompt: str, *, chat: bool = False, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of one prompt, exactly as the bridge's ``to_tokens`` makes them.

        See :func:`encode_prompt`; ``prepend_bos=None`` uses the model's rule.
        """
        cfg = self.bridge.cfg
        return encode_prompt(
            self.tokenizer,
            prompt,
            chat=chat,
            prepend_bos=self.prepend_bos if prepend_bos is None else bool(prepend_bos),
            tokenizer_prepends_bos=bool(getattr(cfg, "tokenizer_prepends_bos", False)),
            tokenizer_appends_eos=bool(getattr(cfg, "tokenizer_appends_eos", False)),
        )

    # -- generation context -----------------------------------------------------------------

    @contextlib.contextmanager
    def generating(self, prompt_length: int) -> Iterator[None]:
        """Tell interventions that the calls inside generate after a ``prompt_length`` prompt."""
        previous, self.prompt_length = self.prompt_length, int(prompt_length)
        try:
            yield
        finally:
            self.prompt_length = previous

    # -- the backend protocol -----------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        return self.twin

    def check_hook_point(self, hook_name: str, where: str) -> None:
        """Raise unless ``hook_name`` is a module input/output of the twin (where steering runs).

        Raises:
            ValueError: a layer out of range, an unknown hook point, or one served by the bridge only.
        """
        layer = layer_of(hook_name)
        if layer is not None:
            check_layer(layer, int(self.bridge.cfg.n_layers), f"{where} {hook_name!r}")
        site = resolve_hook(self, hook_name)
        if not site.on_twin:
            raise ValueError(
                f"{where}: hook point {hook_name!r} exists only inside the TransformerLens bridge; "
                "steering runs on the plain twin and supports hook points that are a module's "
                "input or output: blocks.{L}.hook_resid_pre / hook_resid_mid / hook_resid_post / "
                "hook_attn_out / hook_mlp_out, hook_embed."
            )

    def check_vector(self, vector: Any) -> None:
        """Raise unless a steering vector applies here: its model, its width, its hook point.

        Raises:
            ValueError: another model name, another width, a layer out of range, or a hook
                point that does not map onto a module of the twin.
        """
        check_vector_fits(vector, self.name, int(self.bridge.cfg.d_model))
        self.check_hook_point(vector.hook_name, "SteeringVector")

    @contextlib.contextmanager
    def steered(self, vectors: Sequence[Any], rows: Sequence[Sequence[Any]] | None = None) -> Iterator[torch.nn.Module]:
        """Hook every vector at its hook point on the twin and the bridge until the block ends.

        ``vectors`` apply to every batch row; ``rows[b]`` to row ``b`` only, after them (a
        one-batch sweep). Vectors are checked first. Yields the plain twin.
        """
        vectors = list(vectors)
        state = CallState(self)
        per_row = row_hooks(rows, state) if rows is not None else []
        for vector in vectors + [v for _name, adder in per_row for v in adder.vectors if v is not None]:
            self.check_vector(vector)
        if not vectors and not per_row:
            yield self.twin
            return
        hooks = [(vector.hook_name, Adder([vector], state, broadcast=True)) for vector in vectors] + per_row
        with intervene(self, hooks, observe=state.observe, caller="steered"):
            yield self.twin

    def residual_activations(self, rows: Sequence[Sequence[int]], hook_name: str) -> list[Tensor]:
        """Activations at one hook point per token row (left-padded batch, pads dropped), on the CPU."""
        device = next(self.twin.parameters()).device
        input_ids, mask, position_ids = left_pad(rows, self.tokenizer.pad_token_id, device)
        width = input_ids.shape[1]
        captured: list[Tensor] = []

        def capture(activation: Tensor, _site) -> None:
            captured.append(activation.detach())

        with torch.no_grad(), attach(self, {hook_name: capture}) as runner:
            runner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        acts = captured[0].float().cpu()
        return [acts[row, width - len(ids):] for row, ids in enumerate(rows)]

    # -- activation caching (labkit.backends.hf_capture) ----------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.twin.parameters()).device

    def check_cache_point(self, hook_name: str, where: str) -> None:
        check_cache_point(self, hook_name, where)

    def activation_shapes(self, hook_names: Sequence[str], row: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Per-position shape of each hook point: probed once per name with a forward pass on
        ``row``, then remembered (a hook point's shape does not depend on the prompt)."""
        missing = [name for name in hook_names if name not in self.activation_shape_memo]
        if missing:
            self.activation_shape_memo.update(probe_shapes(self, missing, row))
        return {name: self.activation_shape_memo[name] for name in hook_names}

    def capture(self, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]], hook_names: Sequence[str]) -> dict[str, Tensor]:
        return capture_batch(self, rows, keep, hook_names)

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[Tensor]:
        return token_logprobs(self, rows)

    def __repr__(self) -> str:
        return f"LabModel({self.name!r}, prepend_bos={self.prepend_bos})"



class PlainHFBackend(HuggingFaceRuns):
    """A Hugging Face ``PreTrainedModel`` labkit did not load: MoE routing traces and expert masks.

    It has no bridge (no TransformerLens hook points) and no tokenizer of its own (pass one to
    ``trace_routing``, or token ids). Wrap the model with ``labkit.models.from_hf`` for the rest.
    """

    kind = "hugging_face"
    capabilities = frozenset({"mask", "trace"})
    alternative = "Wrap it with labkit.models.from_hf(hf_model, tokenizer) to get a labkit bridge."

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.model = hf_model
        self.tokenizer = None

    @property
    def name(self) -> str:  # read each time: a caller may relabel config.name_or_path
        return getattr(self.model.config, "name_or_path", None) or type(self.model).__name__

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    @property
    def prepend_bos(self) -> bool:
        return False

    def encode(self, prompt: str, *, chat: bool = False, prepend_bos: bool | None = None) -> list[int]:
        raise ValueError(
            "A plain Hugging Face model has no tokenizer attached: pass tokenizer=..., or "
            "prompts as lists of token ids, or wrap it with labkit.models.from_hf."
        )

    def __repr__(self) -> str:
        return f"PlainHFBackend({self.name!r})"


_PLAIN: "weakref.WeakKeyDictionary[torch.nn.Module, PlainHFBackend]" = weakref.WeakKeyDictionary()


def plain_backend(model: Any) -> PlainHFBackend:
    """The backend of a plain Hugging Face model (one per model object).

    Raises:
        TypeError: not a ``torch.nn.Module`` with a ``config``, or a TransformerBridge labkit did not make.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"{type(model).__name__} was not loaded by labkit. Load it with labkit.load_model(name) "
            "or wrap a Hugging Face model with labkit.models.from_hf(hf_model, tokenizer)."
        )
    if type(model).__name__ == "TransformerBridge":
        raise TypeError(
            "This TransformerBridge was not made by labkit, so it has no plain twin to route on. "
            "Wrap the Hugging Face model with labkit.models.from_hf(hf_model, tokenizer)."
        )
    backend = _PLAIN.get(model)
    if backend is None:
        backend = _PLAIN[model] = PlainHFBackend(model)
    return backend
