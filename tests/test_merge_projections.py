"""Merged projections (issue 36, "merged q|k|v and gate|up"): :meth:`PackedLinear.concat` stacks the rows of layers
that read one input, and :func:`rcp_lib.deploy.merge_shared_inputs` puts such merged layers into a deployed model in
place of q / k / v and gate / up, the model's own forward unchanged. The merged model must compute what the
separate projections compute; the reference for every comparison is the unmerged layer or model itself."""

import copy

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.deploy import PackedLinear, deploy, merge_shared_inputs, save_quantized
from rcp_lib.kernels import pack_codes
from rcp_lib.kernels.packed_linear import SharedInputLinear, SharedInputSlice
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model
from rcp_lib.rotation.online import OnlineHadamard


def _packed(N, K=128, G=32, seed=0, bias=True, act_bits=4, clip=0.9, transform=None, lut_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), generator=g, dtype=torch.uint8)
    lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.to(lut_dtype)
    b = torch.randn(N, generator=g) if bias else None
    return PackedLinear(pack_codes(codes, 2), lut, K, G, 2, b, act_bits, clip, transform)


@pytest.mark.parametrize("decode_cache", [True, False])
@pytest.mark.parametrize("act_bits", [4, None])
def test_concat_slices_are_the_layers_outputs(decode_cache, act_bits):
    """Each slice of the merged product is its layer's output: on the CPU decode cache (F.linear on the decoded
    weights) and on the W2A4 op's reference; the stacked buffers are the layers' own rows."""
    t = OnlineHadamard(128, 32)
    layers = [_packed(n, seed=i, act_bits=act_bits, transform=t) for i, n in enumerate((48, 16, 16))]
    for m in layers:
        m.decode_cache = decode_cache
    merged = PackedLinear.concat(layers, ["q", "k", "v"])
    assert (merged.out_features, merged.in_features, merged.input_transform) == (80, 128, t)
    assert merged.decode_cache is decode_cache
    assert torch.equal(merged.qweight, torch.cat([m.qweight for m in layers]))
    assert torch.equal(merged.lut, torch.cat([m.lut for m in layers]))
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        want = torch.cat([m(x) for m in layers], -1)
        got = merged(x)
    assert got.shape == want.shape == (2, 5, 80)
    # the same codes and levels per row; only the product's summation order may depend on N (BLAS blocking)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6


@pytest.mark.parametrize("change, what", [
    (dict(clip=1.0), "act_clip_ratio"), (dict(act_bits=None), "act_bits"), (dict(G=64), "group_size"),
    (dict(K=256), "in_features"), (dict(bias=False), "bias"), (dict(transform=OnlineHadamard(128)), "input transform"),
    (dict(lut_dtype=torch.float16), "lut dtype"),
])
def test_concat_refuses_layers_that_do_not_share_an_input(change, what):
    a = _packed(16)
    b = _packed(16, seed=1, **change)
    with pytest.raises(ValueError, match=f"cannot merge q and k: {what}"):
        PackedLinear.concat([a, b], ["q", "k"])
    with pytest.raises(ValueError, match="at least two"):
        PackedLinear.concat([a])


def test_shared_input_computes_once_per_input_and_never_serves_a_stale_output():
    """One merged product per input tensor; another tensor, an in-place change of the same tensor, or a slice
    taken twice computes anew, so each output is always the merged layer's on the argument."""
    merged = PackedLinear.concat([_packed(16), _packed(8, seed=1)])
    calls = []
    merged.register_forward_hook(lambda mod, inp, out: calls.append(inp[0]))
    shared = SharedInputLinear(merged, [16, 8], ["gate_proj", "up_proj"])
    gate, up = SharedInputSlice(shared, 0), SharedInputSlice(shared, 1)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged(x)
        calls.clear()
        assert torch.equal(gate(x), want[:, :16]) and torch.equal(up(x), want[:, 16:])
        assert len(calls) == 1 and shared._pending is None  # computed once; nothing kept after the last slice
        y = x + 1
        assert torch.equal(up(y), merged(y)[:, 16:])  # another input: computed for it
        calls.clear()
        g1 = gate(x)
        x.mul_(2)  # the same tensor object, changed in place after the first slice was taken
        assert torch.equal(up(x), merged(x)[:, 16:]) and torch.equal(g1, want[:, :16])
        z = torch.randn(3, 128)
        gate(z)
        assert torch.equal(gate(z), merged(z)[:, :16])  # a slice taken twice: computed again
    with pytest.raises(ValueError, match="do not split"):
        SharedInputLinear(merged, [16, 9], ["gate_proj", "up_proj"])


def _deployed(family="llama", layers=2, seed=0):
    m = M.tiny_model(family, hidden=64, intermediate=96, heads=2, kv_heads=1, layers=layers, vocab=96, seed=seed)
    rotate_model(m, RotationConfig(r1="random_hadamard", seed=0))
    quantize_model(m, preset("W2A4KV4", w_group_size=32))
    return m, deploy(copy.deepcopy(m), torch.float32)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_model_computes_the_deployed_model(family):
    """A deployed W2A4KV4 model (Qwen2: q/k/v with biases) merged in place: 2 groups per block, one registered
    merged layer per group (state_dict lists its tensors once), the same logits and the same greedy generation with
    a KV cache; a deep copy stays merged and agrees too."""
    fq, packed = _deployed(family)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = packed(input_ids=ids).logits
        gen = packed.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    merged = copy.deepcopy(packed)
    assert merge_shared_inputs(merged) == 4
    slices = [m for _, m in M.named_block_linears(merged) if isinstance(m, SharedInputSlice)]
    assert len(slices) == 10
    assert sum(isinstance(m, PackedLinear) for m in merged.modules()) == 2 * 4  # per block: 2 merged, o, down
    keys = [k for k in merged.state_dict() if "qweight" in k]
    assert len(keys) == 2 * 4 and sum(".self_attn.merged_q_proj_k_proj_v_proj.linear." in k for k in keys) == 2
    assert sum(".mlp.merged_gate_proj_up_proj.linear." in k for k in keys) == 2
    assert not any(".q_proj." in k or ".k_proj." in k or ".up_proj." in k for k in keys)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
        assert torch.equal(merged.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), gen)
        again = copy.deepcopy(merged)
        assert torch.equal(again(input_ids=ids).logits, got)


def test_merge_refuses_what_it_cannot_merge_and_changes_nothing(tmp_path):
    """Validate, then mutate: a model with a projection that is not packed is refused whole (no block merged); a
    merged model is refused a second merge and a save (merging is a deploy-time layout, not stored)."""
    fq, packed = _deployed(layers=2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is a QuantLinear"):
        merge_shared_inputs(fq)
    half = copy.deepcopy(packed)
    blk = M.decoder_layers(half)[1].mlp
    blk.up_proj = copy.deepcopy(M.decoder_layers(fq)[1].mlp.up_proj)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj is a QuantLinear"):
        merge_shared_inputs(half)
    assert not any(isinstance(m, SharedInputSlice) for m in half.modules())  # layer 0 untouched too
    assert merge_shared_inputs(packed) == 4
    with pytest.raises(ValueError, match="already merged"):
        merge_shared_inputs(packed)
    with pytest.raises(ValueError, match="save the model before merging"):
        save_quantized(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_kept_product_lives_for_one_call_of_its_owner():
    """What identity and version cannot see (an inference-mode tensor changed in place, or a change through
    ``.data``, between two slices) cannot reach a later call of the block: merge_shared_inputs registers the group on
    the module that calls its projections, whose forward pre-hook (a module-level function: a deep copy's hook
    clears the copy's own group) drops a kept product."""
    from rcp_lib.kernels.packed_linear import clear_shared_inputs

    _, packed = _deployed(layers=1)
    merge_shared_inputs(packed)
    attn = M.attention(M.decoder_layers(packed)[0])
    shared = attn.merged_q_proj_k_proj_v_proj
    assert list(attn._forward_pre_hooks.values()) == [clear_shared_inputs]
    assert list(M.mlp(M.decoder_layers(packed)[0])._forward_pre_hooks.values()) == [clear_shared_inputs]
    with torch.inference_mode():
        xi = torch.randn(1, 3, 64)
        attn.q_proj(xi)  # a product kept for k and v
        assert shared._pending is not None
        xi.mul_(3)  # no version counter: identity alone would serve the stale product to k_proj
        for hook in attn._forward_pre_hooks.values():  # what the next call of the attention runs first
            hook(attn, (xi,))
        assert shared._pending is None
        assert torch.equal(attn.k_proj(xi), shared.linear(xi)[..., 64:96])
    copied = M.attention(M.decoder_layers(copy.deepcopy(packed))[0])
    assert copied.q_proj.shared is copied.merged_q_proj_k_proj_v_proj is not shared
    assert list(copied._forward_pre_hooks.values()) == [clear_shared_inputs]


def test_concat_checks_every_layer_and_name():
    a, b, c = _packed(16), _packed(8, seed=1), _packed(8, seed=2)
    with pytest.raises(ValueError, match="one name each"):
        PackedLinear.concat([a, b, c], ["q", "k"])
    with pytest.raises(ValueError, match="q is a Linear"):
        PackedLinear.concat([torch.nn.Linear(128, 4), b], ["q", "k"])
    for change, what in ((dict(backend="torch"), "backend"), (dict(gemv_format="bitplane"), "gemv_format")):
        d = _packed(8, seed=3)
        for k, v in change.items():
            setattr(d, k, v)
        with pytest.raises(ValueError, match=f"cannot merge q and v: {what}"):
            PackedLinear.concat([a, d], ["q", "v"])
