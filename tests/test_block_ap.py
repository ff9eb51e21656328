"""Block-AP pre-stage: on a tiny random LLaMA (rotated, W2A4KV4) it lowers every block's reconstruction MSE and
trains only the block's latent weights and quantizer parameters."""

import copy
import math

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.block_ap import block_ap, block_mse, quantizers_off
from rcp_lib.qat import QATConfig, train
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def _student(seed=0):
    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=seed)
    st = copy.deepcopy(fp)
    rotate_model(st, RotationConfig(r1="random_hadamard"))
    quantize_model(st, preset("W2A4KV4", w_group_size=32))
    return fp, st


@pytest.mark.heavy
def test_block_ap_lowers_block_mse_on_tiny_llama():
    torch.manual_seed(0)
    fp, st = _student()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    emb = M.embedding(st).weight.clone()
    stats = block_ap(st, calib, steps=30, lr_weights=1e-3, lr_quant=1e-2, grad_clip=1.0, progress=False)
    assert [s["layer"] for s in stats] == [0, 1]
    for s in stats:
        assert math.isfinite(s["mse_before"]) and s["mse_after"] < 0.8 * s["mse_before"], s
    assert torch.equal(M.embedding(st).weight, emb)  # only the blocks were trained
    assert not any(p.requires_grad for p in st.parameters())


def test_quantizers_off_gives_the_fp_block():
    """With its quantizers off, a rotated quantized block computes the rotated FP block (the Block-AP target)."""
    fp, st = _student(seed=2)
    ref = copy.deepcopy(fp)
    rotate_model(ref, RotationConfig(r1="random_hadamard"))
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        with quantizers_off(M.decoder_layers(st)[0]), quantizers_off(M.decoder_layers(st)[1]):
            y = st(input_ids=x).logits
        y_ref = ref(input_ids=x).logits
        y_q = st(input_ids=x).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y_q, y_ref, atol=1e-3)  # and the quantizers are back on


def test_train_runs_block_ap_first():
    fp, st = _student(seed=3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (1, 3000), generator=g)
    cfg = QATConfig(steps=2, seqlen=32, warmup_steps=0, val_every=1000, checkpoint_every=1000, val_windows=1,
                    block_ap_steps=5, block_ap_samples=2)
    res = train(st, fp, data, cfg, progress=False)
    assert [b["layer"] for b in res.block_ap] == [0, 1] and res.steps == 2
