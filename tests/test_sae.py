"""labkit.sae: the SAE's arithmetic, foreign layouts, streaming, measurements, feature reading,
feature steering and clamping — each value checked against an independent computation (numpy
loops, hand-written hooks through TransformerLens's own ``run_with_hooks``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import labkit
import labkit.sae.model
from labkit.cache import cache_activations
from labkit.hooks import count_hooks
from labkit.sae import (
    FeatureClamp,
    SparseAutoencoder,
    activation_batches,
    count_rows,
    feature_activations,
    feature_statistics,
    feature_vector,
    load_sae,
    measure_sae,
    prompt_difference_features,
    read_sae_lens,
    read_sparsify,
    top_contexts,
    vector_features,
)
from labkit.steering import residual_activations

HOOK = "blocks.1.hook_resid_pre"
PROMPTS = ["the cat sat on a mat", "love and hate wedding party", "what happened in the city", "one two three four five"]


def random_sae(d_model=32, d_sae=48, activation="topk", k=4, seed=0, hook=HOOK, model_name="tiny-llama") -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    threshold = torch.rand(d_sae, generator=g) * 0.3 if activation == "jumprelu" else None
    return SparseAutoencoder(
        hook_name=hook, W_enc=torch.randn(d_model, d_sae, generator=g) / 4, b_enc=torch.randn(d_sae, generator=g) / 10,
        W_dec=torch.randn(d_sae, d_model, generator=g) / 4, b_dec=torch.randn(d_model, generator=g) / 10,
        activation=activation, k=k if activation == "topk" else None, threshold=threshold, model_name=model_name,
    )


def numpy_encode(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    """The encoder rules written out row by row (Gao et al. 2024 §2.3; Rajamanoharan et al. 2024 eq. 2)."""
    W, b, bd = sae.W_enc.double().numpy(), sae.b_enc.double().numpy(), sae.b_dec.double().numpy()
    out = np.zeros((x.shape[0], sae.d_sae))
    for i, row in enumerate(x.astype(np.float64)):
        pre = (row - bd) @ W + b
        if sae.activation == "relu":
            out[i] = np.maximum(pre, 0)
        elif sae.activation == "jumprelu":
            out[i] = pre * (pre > sae.threshold.double().numpy())
        else:
            top = np.argsort(-pre)[: sae.k]
            out[i, top] = np.maximum(pre[top], 0)
    return out


# -- the SAE's arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_encode_decode_match_the_rules_written_out(activation):
    sae = random_sae(activation=activation)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(sae.encode(x).numpy(), numpy_encode(sae, x.numpy()), atol=1e-5)
    features = sae.encode(x)
    expected = features.double().numpy() @ sae.W_dec.double().numpy() + sae.b_dec.double().numpy()
    np.testing.assert_allclose(sae.decode(features).numpy(), expected, atol=1e-5)
    if activation == "topk":
        values, indices = sae.encode_sparse(x)
        dense = torch.zeros(20, 48).scatter_(-1, indices, values)
        torch.testing.assert_close(dense, features)
        assert int((features != 0).sum(-1).max()) <= 4


def by_hand_encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """matmul + bias + the rule on whole float64 tensors (TopK: ReLU of the k largest, a mask)."""
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    if sae.activation == "relu":
        return pre.clamp_min(0)
    if sae.activation == "jumprelu":
        return torch.where(pre > sae.threshold.double(), pre, torch.zeros_like(pre))
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.argsort(-1, descending=True)[..., : sae.k], True)
    return torch.where(mask, pre.clamp_min(0), torch.zeros_like(pre))


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_blocked_fast_encoders_equal_a_by_hand_computation(activation, monkeypatch):
    """A wide SAE (64·k <= d_sae, so TopK takes the bounded selection) encoded 7 rows per block
    (5 blocks for 33 rows, the last one short) gives the by-hand values within float32 rounding;
    the sparse form scatters to exactly the dense one; the autograd path agrees and differentiates."""
    monkeypatch.setattr(labkit.sae.model, "BLOCK_ELEMENTS", 7 * 512)
    sae = random_sae(d_sae=512, activation=activation, k=8)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(5))
    features = sae.encode(x)
    assert features.shape == (3, 11, 512) and features.dtype == torch.float32
    torch.testing.assert_close(features.double(), by_hand_encode(sae, x), atol=2e-6, rtol=1e-5)
    if activation == "topk":
        values, indices = sae.encode_sparse(x)
        assert values.shape == indices.shape == (3, 11, 8)
        assert torch.equal(torch.zeros(3, 11, 512).scatter_(-1, indices, values), features)
        alone = sae.encode_sparse(x[0, 0])  # one row: a matrix-vector product, rounded its own way
        assert torch.equal(alone[1].sort().values, indices[0, 0].sort().values)
        torch.testing.assert_close(alone[0].sort().values, values[0, 0].sort().values, atol=1e-6, rtol=1e-6)
    leaf = x.clone().requires_grad_(True)
    graph = sae.encode(leaf)
    torch.testing.assert_close(graph.detach(), features, atol=1e-6, rtol=1e-6)
    graph.sum().backward()
    active = by_hand_encode(sae, x) > 0
    expected_grad = active.double() @ sae.W_enc.double().T
    torch.testing.assert_close(leaf.grad.double(), expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_of_rows_selects_a_top_k_of_every_row(dtype):
    """The bounded selection against torch.topk: the same values (as multisets), indices that
    point at those values, no index twice; the same indices wherever the k-th value is not tied.
    Rows with NaN, -inf, many +inf and all-equal entries are in the batch."""
    from labkit.sae.model import topk_of_rows

    g = torch.Generator().manual_seed(6)
    pre = torch.randn(64, 2048, generator=g).to(dtype)
    pre[1, 100] = float("nan")
    pre[2] = float("-inf")
    pre[3, :50] = float("inf")
    pre[4] = 1.5
    pre[5, ::2] = 2.0
    original = pre.clone()
    values, indices = topk_of_rows(pre, 32)
    ref_values, ref_indices = original.topk(32, dim=-1, sorted=False)
    nan = torch.tensor(float("inf"), dtype=dtype)  # NaN compares as largest in torch.topk
    assert torch.equal(values.nan_to_num(nan=nan).sort(-1).values, ref_values.nan_to_num(nan=nan).sort(-1).values)
    assert torch.equal(original.gather(1, indices).nan_to_num(nan=nan), values.nan_to_num(nan=nan))
    assert all(len(set(row)) == 32 for row in indices.tolist())
    kth = ref_values.nan_to_num(nan=nan).amin(-1, keepdim=True)
    untied = (original == kth).sum(-1) == 1
    assert int(untied.sum()) >= (48 if dtype == torch.float32 else 8)  # bfloat16 rows mostly tie at the k-th value
    assert torch.equal(indices[untied].sort(-1).values, ref_indices[untied].sort(-1).values)
    out = (torch.empty(64, 32, dtype=dtype), torch.empty(64, 32, dtype=torch.long))
    topk_of_rows(original.clone(), 32, out=out)
    assert torch.equal(out[0].sort(-1).values.nan_to_num(nan=nan), values.sort(-1).values.nan_to_num(nan=nan))
    base = torch.randn(40, 2085, generator=g).to(dtype)
    uneven = base[:, 3:].clone()  # 2082 = 32 groups of 65 + 2 left over
    values, indices = topk_of_rows(base[:, 3:], 32)  # a strided view, overwritten in place
    ref_values, ref_indices = uneven.topk(32, dim=-1, sorted=False)
    assert torch.equal(values.sort(-1).values, ref_values.sort(-1).values)
    assert torch.equal(uneven.gather(1, indices), values)


@pytest.mark.parametrize("layout", ["sae_lens_topk", "sae_lens_jumprelu", "sparsify"])
def test_foreign_layouts_encode_by_hand_on_the_fast_path(tmp_path, layout, monkeypatch):
    """sae-lens (TopK, JumpReLU) and eai-sparsify folders, wide enough for the bounded TopK and
    encoded in blocks, give the by-hand values."""
    monkeypatch.setattr(labkit.sae.model, "BLOCK_ELEMENTS", 5 * 512)
    activation = "jumprelu" if layout == "sae_lens_jumprelu" else "topk"
    sae = random_sae(d_sae=512, activation=activation, k=8)
    if layout == "sparsify":
        loaded = read_sparsify(write_sparsify(tmp_path / "layers.1", sae))
    else:
        loaded = read_sae_lens(write_sae_lens(tmp_path / "f", sae, architecture=activation))
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loaded.encode(x).double(), by_hand_encode(sae, x), atol=2e-6, rtol=1e-5)


def test_save_load_roundtrip_and_bfloat16_storage(tmp_path):
    sae = random_sae(activation="jumprelu")
    sae.save(tmp_path / "sae")
    back = SparseAutoencoder.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert (back.hook_name, back.activation, back.model_name) == (HOOK, "jumprelu", "tiny-llama")
    sae.save(tmp_path / "half", dtype=torch.bfloat16)
    meta = json.loads((tmp_path / "half.json").read_text())
    assert meta["storage_dtype"] == "bfloat16"
    half = SparseAutoencoder.load(tmp_path / "half")
    assert torch.equal(half.W_dec, sae.W_dec.bfloat16().float())


def test_bad_sae_input_names_what_was_received():
    good = random_sae()
    with pytest.raises(ValueError, match=r"W_dec has shape \(10, 32\).*must be \(48, 32\)"):
        SparseAutoencoder(HOOK, good.W_enc, good.b_enc, torch.zeros(10, 32), good.b_dec, k=4)
    with pytest.raises(ValueError, match="k, an int in 1..d_sae=48, got 0"):
        SparseAutoencoder(HOOK, good.W_enc, good.b_enc, good.W_dec, good.b_dec, k=0)
    with pytest.raises(ValueError, match="JumpReLU needs its per-feature threshold"):
        SparseAutoencoder(HOOK, good.W_enc, good.b_enc, good.W_dec, good.b_dec, activation="jumprelu")
    with pytest.raises(ValueError, match="activation='gated' is not allowed"):
        SparseAutoencoder(HOOK, good.W_enc, good.b_enc, good.W_dec, good.b_dec, activation="gated")
    with pytest.raises(ValueError, match=r"input must be a float tensor \(..., d_model=32\)"):
        good.encode(torch.zeros(3, 31))


# -- foreign layouts ----------------------------------------------------------------------------


def write_sae_lens(folder, sae: SparseAutoencoder, *, architecture, meta_key="meta", model_name="tiny-llama", extra=None):
    """A folder in sae-lens 6's layout (SAE.save_model), written by hand."""
    folder.mkdir(parents=True)
    metadata = {"model_name": model_name, "hook_name": sae.hook_name, "hook_layer": 1, "prepend_bos": True}
    cfg = {"d_in": sae.d_model, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": architecture, **(extra or {})}
    if meta_key is None:
        cfg.update(metadata)
    else:
        cfg[meta_key] = metadata
    if architecture == "topk":
        cfg["k"] = sae.k
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def write_sparsify(folder, sae: SparseAutoencoder, *, extra=None):
    """A folder in eai-sparsify's layout (SparseCoder.save_to_disk), written by hand."""
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": sae.d_sae, "k": sae.k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_model, **(extra or {})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc, "W_dec": sae.W_dec.contiguous(),
               "b_dec": sae.b_dec}, str(folder / "sae.safetensors"))
    return folder


@pytest.mark.parametrize("meta_key", ["meta", "metadata", None])
def test_sae_lens_jumprelu_folder_loads_with_its_thresholds(tmp_path, tiny_llama, meta_key):
    sae = random_sae(activation="jumprelu")
    folder = write_sae_lens(tmp_path / "jr", sae, architecture="jumprelu", meta_key=meta_key)
    loaded = load_sae(folder, tiny_llama, hook_name=HOOK, d_sae=48)
    assert loaded.activation == "jumprelu" and loaded.hook_name == HOOK and loaded.model_name == "tiny-llama"
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(loaded.encode(x).numpy(), numpy_encode(sae, x.numpy()), atol=1e-5)
    assert int((loaded.encode(x) != 0).sum()) > 0


def test_sae_lens_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    sae = random_sae()
    folder = write_sae_lens(tmp_path / "tk", sae, architecture="topk", extra={"rescale_acts_by_decoder_norm": True})
    loaded = read_sae_lens(folder)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    # sae-lens with the flag: top-k of ReLU(pre · ‖W_dec‖), decoded by W_dec / ‖W_dec‖ — written out here
    norms = sae.W_dec.double().norm(dim=-1).numpy()
    pre = (x.double().numpy() - sae.b_dec.double().numpy()) @ sae.W_enc.double().numpy() + sae.b_enc.double().numpy()
    pre = pre * norms
    dense = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row)[:4]
        dense[i, top] = np.maximum(row[top], 0)
    expected = dense @ (sae.W_dec.double().numpy() / norms[:, None]) + sae.b_dec.double().numpy()
    np.testing.assert_allclose(loaded.reconstruct(x).numpy(), expected, atol=1e-5)
    assert torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(48), atol=1e-5)


def test_sparsify_folder_loads_and_maps_its_module_name(tmp_path, tiny_llama):
    sae = random_sae(hook="blocks.1.hook_resid_post", model_name="")
    folder = write_sparsify(tmp_path / "layers.1", sae)
    loaded = load_sae(folder, tiny_llama, model_name="tiny-llama")
    assert loaded.hook_name == "blocks.1.hook_resid_post" and loaded.k == 4 and loaded.model_name == "tiny-llama"
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    # eai-sparsify's encoder: top-k of ReLU((x - b_dec) Wᵀ + b)
    np.testing.assert_allclose(loaded.encode(x).numpy(), numpy_encode(sae, x.numpy()), atol=1e-5)
    assert read_sparsify(write_sparsify(tmp_path / "layers.2.mlp", sae)).hook_name == "blocks.2.hook_mlp_out"


def test_sparsify_parity_with_the_library_when_installed(tmp_path):
    """Where eai-sparsify is installed (the recipe's trainer), its SparseCoder and ours agree."""
    sparsify = pytest.importorskip("sparsify")
    import sparsify.sparse_coder as module
    from sparsify.utils import eager_decode

    module.decoder_impl = eager_decode
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=48, k=4))
    coder.b_dec.data = torch.randn(32) / 10
    coder.encoder.bias.data = torch.randn(48) / 10
    coder.save_to_disk(tmp_path / "layers.1")
    ours = read_sparsify(tmp_path / "layers.1")
    x = torch.randn(64, 32)
    out = coder(x)
    torch.testing.assert_close(ours.reconstruct(x), out.sae_out, atol=1e-5, rtol=1e-5)
    fvu = float((ours.reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert math.isclose(fvu, float(out.fvu), rel_tol=1e-5)


def test_mismatched_model_width_or_hook_point_is_refused(tmp_path, tiny_llama):
    sae = random_sae(activation="jumprelu")
    other = write_sae_lens(tmp_path / "gpt2", sae, architecture="jumprelu", model_name="gpt2")
    with pytest.raises(ValueError, match="trained on model 'gpt2' and refuses to run on 'tiny-llama'"):
        load_sae(other, tiny_llama)
    wide = write_sae_lens(tmp_path / "wide", random_sae(d_model=64, activation="jumprelu"), architecture="jumprelu")
    with pytest.raises(ValueError, match="reads d_model=64 activations, but model 'tiny-llama' has d_model=32"):
        load_sae(wide, tiny_llama)
    ok = write_sae_lens(tmp_path / "ok", sae, architecture="jumprelu")
    with pytest.raises(ValueError, match="reads hook point 'blocks.1.hook_resid_pre', not the expected 'blocks.2.hook_resid_pre'"):
        load_sae(ok, tiny_llama, hook_name="blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match="has width d_sae=48, not the expected 4096"):
        load_sae(ok, tiny_llama, d_sae=4096)
    deep = write_sae_lens(tmp_path / "deep", random_sae(hook="blocks.9.hook_resid_pre", activation="jumprelu"), architecture="jumprelu")
    with pytest.raises(ValueError, match="'blocks.9.hook_resid_pre', which model 3-layer"):
        load_sae(deep, tiny_llama)
    gated = write_sae_lens(tmp_path / "gated", sae, architecture="gated")
    with pytest.raises(ValueError, match="architecture 'gated'.*is not supported"):
        load_sae(gated)
    normed = write_sae_lens(tmp_path / "normed", sae, architecture="jumprelu", extra={"normalize_activations": "layer_norm"})
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        load_sae(normed)
    coder = write_sparsify(tmp_path / "layers.1", random_sae(), extra={"transcode": True})
    with pytest.raises(ValueError, match="is a transcoder"):
        load_sae(coder)
    with pytest.raises(FileNotFoundError, match="nothing at"):
        load_sae(tmp_path / "nowhere")


# -- streaming and measurements -----------------------------------------------------------------


def test_activation_batches_stream_every_row_but_the_first_once_per_epoch(tmp_path, tiny_llama):
    cache = cache_activations(tiny_llama, PROMPTS * 3, [HOOK], out_dir=tmp_path / "c", shard_bytes=2048, progress=False)
    everything = cache[HOOK]
    wanted = everything[cache.position != 0]
    batches = list(activation_batches(cache, HOOK, 7, seed=3, epochs=2, skip_positions={0}))
    assert [b.shape[0] for b in batches[:-1]] == [7] * (len(batches) - 1)
    streamed = torch.cat(batches)
    assert streamed.shape[0] == 2 * wanted.shape[0] == 2 * count_rows(cache, {0})
    key = lambda t: sorted(map(tuple, t.round(decimals=5).tolist()))  # noqa: E731
    assert key(streamed[: wanted.shape[0]]) == key(wanted)  # epoch 1 = each row once
    again = torch.cat(list(activation_batches(cache, HOOK, 7, seed=3, epochs=2, skip_positions={0})))
    assert torch.equal(again, streamed)
    with pytest.raises(ValueError, match="held in memory"):
        next(activation_batches(cache_activations(tiny_llama, PROMPTS, [HOOK], progress=False), HOOK, 4))


def identity_relu_sae(d_model=32) -> SparseAutoencoder:
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: reconstructs x exactly (relu(x) - relu(-x))."""
    eye = torch.eye(d_model)
    return SparseAutoencoder(HOOK, torch.cat([eye, -eye], 1), torch.zeros(2 * d_model), torch.cat([eye, -eye], 0),
                             torch.zeros(d_model), activation="relu", model_name="tiny-llama")


def test_measurements_against_a_hand_computation(tiny_llama):
    sae = random_sae(activation="topk", k=4)
    m = measure_sae(tiny_llama, sae, PROMPTS, batch_size=3)
    rows = [acts[1:] for acts in residual_activations(tiny_llama, [ids for ids in _ids(tiny_llama)], HOOK)]
    x = torch.cat(rows).double()
    f = torch.from_numpy(numpy_encode(sae, x.numpy()))
    recon = f @ sae.W_dec.double() + sae.b_dec.double()
    fve = 1 - float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert m.tokens == x.shape[0]
    assert math.isclose(m.fraction_variance_explained, fve, rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(m.l0, float((f != 0).sum(-1).double().mean()), rel_tol=1e-6)
    assert math.isclose(m.dead_fraction, float(((f != 0).sum(0) == 0).double().mean()))
    assert math.isclose(m.dense_fraction, float(((f != 0).double().mean(0) > 0.1).double().mean()))
    assert math.isclose(m.ce_clean, _loss_by_hand(tiny_llama, None), rel_tol=1e-5)
    assert math.isclose(m.ce_zero_ablated, _loss_by_hand(tiny_llama, lambda a: torch.zeros_like(a)), rel_tol=1e-5)
    gap = m.ce_zero_ablated - m.ce_clean  # a random model can do better zero-ablated: no score then
    assert math.isclose(m.ce_loss_recovered, (m.ce_zero_ablated - m.ce_spliced) / gap) if gap > 0 else math.isnan(m.ce_loss_recovered)
    exact = measure_sae(tiny_llama, identity_relu_sae(), PROMPTS)
    assert exact.fraction_variance_explained == pytest.approx(1.0, abs=1e-6)
    assert exact.ce_spliced == pytest.approx(exact.ce_clean, abs=1e-5)


def _ids(model):
    from labkit.cache import tokenize_prompts

    return tokenize_prompts(model, PROMPTS)


@torch.no_grad()
def _loss_by_hand(model, replace):
    """Mean next-token loss, prompt by prompt through TransformerLens's run_with_hooks (all but position 0 replaced)."""
    total, count = 0.0, 0
    for ids in _ids(model):
        tokens = torch.tensor([ids])

        def hook(activation, hook=None):
            if replace is None:
                return activation
            out = activation.clone()
            out[:, 1:] = replace(activation[:, 1:])
            return out

        logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook)])
        log_probs = torch.log_softmax(logits[0, :-1].double(), -1)
        total += float(-log_probs.gather(-1, tokens[0, 1:, None]).sum())
        count += len(ids) - 1
    return total / count


# -- reading features ---------------------------------------------------------------------------


def test_feature_activations_statistics_and_contexts(tiny_llama):
    sae = random_sae()
    (ids,) = [r for r in _ids(tiny_llama)[1:2]]
    acts = feature_activations(tiny_llama, sae, PROMPTS[1])
    (x,) = residual_activations(tiny_llama, [ids], HOOK)
    np.testing.assert_allclose(acts.activations.numpy(), numpy_encode(sae, x.numpy()), atol=1e-5)
    assert acts.token_ids == ids and len(acts.tokens) == len(ids)
    peak = numpy_encode(sae, x.numpy())[1:].max(0)
    assert [f for f, _ in acts.top(3)] == list(np.argsort(-peak, kind="stable")[:3])

    cache = cache_activations(tiny_llama, PROMPTS, [HOOK], progress=False)
    stats = feature_statistics(sae, cache, n=3, chunk_rows=5)
    keep = cache.position != 0
    dense = numpy_encode(sae, cache[HOOK][keep].numpy())
    rows = torch.arange(len(cache))[keep].numpy()
    np.testing.assert_allclose(stats.firing_rate.numpy(), (dense > 0).mean(0), atol=1e-6)
    np.testing.assert_allclose(stats.max_activation.numpy(), dense.max(0), atol=1e-5)
    feature = int(np.argmax((dense > 0).sum(0)))
    best = np.argsort(-dense[:, feature], kind="stable")[:3]
    assert stats.top_rows[feature].tolist() == rows[best].tolist()
    contexts = top_contexts(stats, cache, labkit.models.tokenizer_of(tiny_llama), feature, window=2)
    assert contexts[0].value == pytest.approx(float(dense[best[0], feature]), abs=1e-5)
    row = int(rows[best[0]])
    assert contexts[0].token == labkit.models.tokenizer_of(tiny_llama).decode([int(cache.token_ids[row])])
    assert "<b" in contexts[0].html() and contexts[0].position == int(cache.position[row])


def test_vector_and_prompt_difference_features(tiny_llama):
    sae = random_sae()
    vector = labkit.actadd(tiny_llama, "wedding", "the", layer=1)
    matches = vector_features(sae, vector, n=5)
    direction = vector.activations.sum(0).double().numpy()
    unit = sae.W_dec.double().numpy() / np.linalg.norm(sae.W_dec.double().numpy(), axis=1, keepdims=True)
    cosines = unit @ direction / np.linalg.norm(direction)
    assert matches.features == list(np.argsort(-cosines)[:5])
    np.testing.assert_allclose(matches.scores, np.sort(cosines)[::-1][:5], atol=1e-5)
    one = feature_vector(sae, 7, 3.0)
    assert vector_features(sae, one, n=1).features == [7]
    diff = prompt_difference_features(tiny_llama, sae, PROMPTS[1], PROMPTS[0], n=4)
    a = feature_activations(tiny_llama, sae, PROMPTS[1]).activations[-1]
    b = feature_activations(tiny_llama, sae, PROMPTS[0]).activations[-1]
    assert diff.features == (a - b).topk(4).indices.tolist()
    with pytest.raises(ValueError, match="acts at 'blocks.2.hook_resid_pre', the SAE reads 'blocks.1.hook_resid_pre'"):
        vector_features(sae, labkit.actadd(tiny_llama, "wedding", "the", layer=2))


def test_feature_panel_clicks_through_features(tiny_llama):
    from labkit.sae.panel import FeaturePanel, feature_figure

    sae = random_sae()
    cache = cache_activations(tiny_llama, PROMPTS, [HOOK], progress=False)
    stats = feature_statistics(sae, cache, n=3)
    alive = [int(f) for f in (stats.firing_rate > 0).nonzero().squeeze(-1)[:2]]
    panel = FeaturePanel(stats, cache, labkit.models.tokenizer_of(tiny_llama), features=alive)
    assert panel.feature.value == alive[0] and "<b" in panel.contexts.value
    panel.next.click()
    assert panel.feature.value == alive[0] + 1
    panel.choices.value = alive[1]
    assert panel.feature.value == alive[1]
    figure = feature_figure(stats, alive[1])
    assert list(figure.data[0].y) == pytest.approx([v for v in stats.top_values[alive[1]].tolist() if v > 0])
    assert f"feature {alive[1]}" in panel.figure.layout.title.text


# -- steering and clamping ----------------------------------------------------------------------


def test_feature_vector_is_strength_times_unit_decoder_row(tiny_llama):
    sae = random_sae()
    vector = feature_vector(sae, 5, 4.0)
    row = sae.W_dec[5] / sae.W_dec[5].norm()
    assert torch.allclose(vector.steering_vector, 4.0 * row, atol=1e-6)
    assert vector.hook_name == HOOK and vector.positions == "all" and vector.source["feature"] == 5
    by_hand = labkit.SteeringVector(HOOK, row, coefficient=4.0, model_name="tiny-llama")
    a = labkit.generate(tiny_llama, PROMPTS[:2], steering=vector, max_new_tokens=6)
    b = labkit.generate(tiny_llama, PROMPTS[:2], steering=by_hand, max_new_tokens=6)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="feature 48 out of range; .* has 48 features"):
        feature_vector(sae, 48)


def _clamp_by_hand(sae, values):
    """x + Σ (v_i − f_i(x)) W_dec[i] at every position but 0, written with numpy (TransformerLens hook)."""
    def hook(activation, hook=None):
        x = activation.detach().double().numpy()
        out = x.copy()
        for b in range(x.shape[0]):
            f = numpy_encode(sae, x[b].astype(np.float32))
            for i, v in values.items():
                out[b, 1:] += np.outer(v - f[1:, i], sae.W_dec[i].double().numpy())
        return torch.from_numpy(out).to(activation.dtype)

    return hook


def test_clamp_inside_the_forward_pass_matches_the_rule_on_every_entry_point(tiny_llama):
    sae = random_sae()
    tokens = torch.tensor([_ids(tiny_llama)[1]])
    clamp = FeatureClamp(sae, {3: 5.0, 11: 0.0})
    expected = tiny_llama.run_with_hooks(tokens, fwd_hooks=[(HOOK, _clamp_by_hand(sae, clamp.values))])
    clean = tiny_llama(tokens)
    with labkit.steered(tiny_llama, clamp):
        bridge = tiny_llama(tokens)
        _, cache = tiny_llama.run_with_cache(tokens)
        twin = labkit.models.lab_model(tiny_llama).twin(input_ids=tokens).logits
    torch.testing.assert_close(bridge, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(twin, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(bridge, clean, atol=1e-3)
    _, clean_cache = tiny_llama.run_with_cache(tokens)  # run_with_cache inside the block caches the clamped value
    torch.testing.assert_close(cache[HOOK], _clamp_by_hand(sae, clamp.values)(clean_cache[HOOK]), atol=1e-5, rtol=1e-5)
    # generate(steering=clamp) == generate inside steered(...), KV cache on or off
    a = labkit.generate(tiny_llama, PROMPTS, steering=clamp, max_new_tokens=6)
    with labkit.steered(tiny_llama, clamp):
        b = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=6)
    c = labkit.generate(tiny_llama, PROMPTS, steering=[clamp], max_new_tokens=6, use_cache=False)
    assert a.token_ids == b.token_ids == c.token_ids
    solo = [labkit.generate(tiny_llama, [p], steering=clamp, max_new_tokens=6).token_ids[0] for p in PROMPTS]
    assert solo == a.token_ids


def test_unedited_clamp_changes_nothing(tiny_llama):
    """Clamping a feature to the value it already has (0 for one that never fires) is the identity: identical logits."""
    sae = random_sae()
    cache = cache_activations(tiny_llama, PROMPTS, [HOOK], progress=False)
    silent = int((sae.encode(cache[HOOK]) > 0).sum(0).argmin())
    assert int((sae.encode(cache[HOOK])[:, silent] > 0).sum()) == 0
    tokens = torch.tensor([_ids(tiny_llama)[2]])
    clean_bridge, clean_gen = tiny_llama(tokens), labkit.generate(tiny_llama, PROMPTS, max_new_tokens=6)
    with labkit.steered(tiny_llama, FeatureClamp(sae, {silent: 0.0})):
        assert torch.equal(tiny_llama(tokens), clean_bridge)
        assert labkit.generate(tiny_llama, PROMPTS, max_new_tokens=6).token_ids == clean_gen.token_ids
    assert count_hooks(labkit.models.lab_model(tiny_llama).twin) == 0


def test_clamp_refusals_and_no_hook_left_after_an_exception(tiny_llama):
    sae = random_sae()
    clamp = FeatureClamp(sae, {1: 2.0})
    with pytest.raises(ValueError, match="runs the SAE inside the forward pass.*feature_vector"):
        labkit.generate(tiny_llama, PROMPTS[:2], steering_per_row=[clamp, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        FeatureClamp(sae, {})
    with pytest.raises(ValueError, match="feature 99 out of range"):
        FeatureClamp(sae, {99: 1.0})
    with pytest.raises(ValueError, match="refuses to run on 'tiny-llama'"):
        labkit.generate(tiny_llama, PROMPTS[:1], steering=FeatureClamp(random_sae(model_name="gpt2"), {1: 1.0}))
    twin = labkit.models.lab_model(tiny_llama).twin
    before = count_hooks(tiny_llama, tiny_llama.original_model, twin)
    with pytest.raises(RuntimeError, match="boom"):
        with labkit.steered(tiny_llama, clamp, feature_vector(sae, 2, 1.0)):
            raise RuntimeError("boom")
    assert count_hooks(tiny_llama, tiny_llama.original_model, twin) == before


def test_steering_panel_takes_a_feature_vector_and_a_clamp(tiny_llama):
    from labkit.widgets import SteeringPanel

    sae = random_sae()
    for loaded in (feature_vector(sae, 4, 1.0), FeatureClamp(sae, {4: 1.0})):
        panel = SteeringPanel(tiny_llama, vector=loaded, default_coefficient=6.0, max_new_tokens=4, autorun=True)
        assert panel.wait(60)
        expected = labkit.generate(tiny_llama, panel.prompt.value, steering=loaded.with_coefficient(6.0), max_new_tokens=4).texts[0]
        assert panel.steered_text == expected and not panel.error.value
        panel.close()
