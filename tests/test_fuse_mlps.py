"""Gated MLPs fused for deployment (issue 36): :func:`rcp_lib.deploy.fuse_gated_mlps` puts a
:class:`~rcp_lib.kernels.packed_linear.GatedMLP` (gate / up merged, the SiLU and product handed to ``down_proj``'s
activation quantizer) in the place of each block's MLP. On the CPU paths it must compute what the MLP it replaces
computes; the reference is the deployed model itself, merged the same way (the same gate / up product)."""

import copy

import pytest
import torch
from torch import nn

from rcp_lib import models as M
from rcp_lib.deploy import PackedLinear, deploy, fuse_gated_mlps, merge_shared_inputs, save_quantized
from rcp_lib.kernels.packed_linear import GatedMLP
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def _deployed(family="llama", layers=2, intermediate=96):
    m = M.tiny_model(family, hidden=64, intermediate=intermediate, heads=2, kv_heads=1, layers=layers, vocab=96, seed=0)
    rotate_model(m, RotationConfig(r1="random_hadamard", seed=0))
    quantize_model(m, preset("W2A4KV4", w_group_size=32))
    return m, deploy(copy.deepcopy(m), torch.float32)


@pytest.mark.parametrize("decode_cache", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_model_computes_the_deployed_model(family, decode_cache):
    """Per block one GatedMLP of the packed tensors (down_proj the same module, R4 kept on it); the logits of the
    merged model bit for bit (on the CPU decode cache and on the W2A4 op's reference), those of the unmerged one to
    BLAS blocking, and the same greedy generation. Fusing a merged model reuses its gate / up group."""
    _, packed = _deployed(family)
    for m in packed.modules():
        if isinstance(m, PackedLinear):
            m.decode_cache = decode_cache
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    merged = copy.deepcopy(packed)
    merge_shared_inputs(merged)
    downs = [M.mlp(b).down_proj for b in M.decoder_layers(packed)]
    fused = copy.deepcopy(packed)
    with pytest.warns(UserWarning, match=r"2 of 2 blocks"):  # R4 of 96 = 12 · 8: not a pre-kernel order
        assert fuse_gated_mlps(fused) == 2
    blocks = [M.mlp(b) for b in M.decoder_layers(fused)]
    assert all(isinstance(b, GatedMLP) for b in blocks)
    assert all(b.gate_up_proj.out_features == 2 * 96 and b.down_proj.in_features == 96 for b in blocks)
    assert all(torch.equal(b.down_proj.qweight, d.qweight) and b.down_proj.input_transform is not None
               for b, d in zip(blocks, downs))
    from_merged = copy.deepcopy(merged)
    group = M.mlp(M.decoder_layers(from_merged)[0]).merged_gate_proj_up_proj.linear
    with pytest.warns(UserWarning, match="online Hadamard"):
        assert fuse_gated_mlps(from_merged) == 2
    assert M.mlp(M.decoder_layers(from_merged)[0]).gate_up_proj is group
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        assert torch.equal(fused(input_ids=ids).logits, want)
        assert torch.equal(from_merged(input_ids=ids).logits, want)
        plain = packed(input_ids=ids).logits
        assert ((want - plain).abs().max() / plain.abs().max()).item() < 1e-5
        gen = packed.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        assert torch.equal(fused.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), gen)


def test_forward_glu_is_forward_on_the_product():
    """``PackedLinear.forward_glu([gate | up])`` is ``forward(F.silu(gate) * up)`` bit for bit on the CPU paths, and
    refuses an input that is not twice as wide."""
    _, packed = _deployed(layers=1)
    down = M.mlp(M.decoder_layers(packed)[0]).down_proj
    gu = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(0)) * 2
    for cache in (True, False):
        down.decode_cache = cache
        with torch.no_grad():
            assert torch.equal(down.forward_glu(gu), down(nn.functional.silu(gu[..., :96]) * gu[..., 96:]))
    with pytest.raises(ValueError, match=r"\[gate \| up\]"):
        down.forward_glu(gu[..., :96])


def test_fuse_refuses_what_it_cannot_fuse_and_changes_nothing(tmp_path):
    """Validate, then mutate: a block that is not a SiLU-gated MLP of packed projections is refused with its name
    and no block changes; a fused model is refused a second fusion and a save (a deploy-time layout)."""
    fq, packed = _deployed(layers=2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj is a QuantLinear"):
        fuse_gated_mlps(fq)
    gelu = copy.deepcopy(packed)
    M.mlp(M.decoder_layers(gelu)[1]).act_fn = nn.GELU()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp is not a SiLU-gated MLP"):
        fuse_gated_mlps(gelu)
    assert not any(isinstance(m, GatedMLP) for m in gelu.modules())  # layer 0 untouched too
    half = copy.deepcopy(packed)
    M.mlp(M.decoder_layers(half)[1]).up_proj = copy.deepcopy(M.mlp(M.decoder_layers(fq)[1]).up_proj)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj is a QuantLinear"):
        fuse_gated_mlps(half)
    assert not any(isinstance(m, GatedMLP) for m in half.modules())
    with pytest.warns(UserWarning, match="online Hadamard"):
        assert fuse_gated_mlps(packed) == 2
    with pytest.raises(ValueError, match="already fused"):
        fuse_gated_mlps(packed)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp is a fused GatedMLP"):
        merge_shared_inputs(packed)
    with pytest.raises(ValueError, match="save the model before fusing"):
        save_quantized(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    down = M.mlp(M.decoder_layers(packed)[0]).down_proj  # 64 outputs, 96 inputs
    with pytest.raises(ValueError, match="twice as many"):
        GatedMLP(PackedLinear.concat([down, down]), down)


def test_glu_in_kernel_says_where_the_product_runs():
    """``GatedMLP.glu_in_kernel``: True only on the fused path with an R4 the pre-kernel builds (192 = 12 · 16, the
    same rule as SmolLM2's 1536 = 12 · 128); no warning then. The reference backend, or an R4 of an order the
    pre-kernel does not build (96 = 12 · 8), keeps the SiLU and the product as torch ops, and says so."""
    import warnings

    _, packed = _deployed(layers=1, intermediate=192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fuse_gated_mlps(packed) == 1
    mlp = M.mlp(M.decoder_layers(packed)[0])
    mlp.down_proj.backend = "torch"
    assert not mlp.glu_in_kernel
    mlp.down_proj.backend = "triton"
    assert mlp.glu_in_kernel
    mlp.down_proj.input_transform = None  # no R4: nothing to build, the product still in the kernel
    assert mlp.glu_in_kernel
    _, mixed = _deployed(layers=2, intermediate=96)  # the first block without R4: the warning names a torch-R4 one
    M.mlp(M.decoder_layers(mixed)[0]).down_proj.input_transform = None
    with pytest.warns(UserWarning, match=r"order 96, block None\) in 1 of 2 blocks"):
        fuse_gated_mlps(mixed)
    _, other = _deployed(layers=1, intermediate=96)
    with pytest.warns(UserWarning, match=r"order 96, block None\) in 1 of 1 blocks"):
        fuse_gated_mlps(other)
    down = M.mlp(M.decoder_layers(other)[0]).down_proj
    down.backend = "triton"
    assert not M.mlp(M.decoder_layers(other)[0]).glu_in_kernel
