import pytest
import torch

from rcp_lib import models as M
from rcp_lib.rotation import analysis as A


def test_kurtosis_reference_values():
    g = torch.Generator().manual_seed(0)
    assert A.kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert A.kurtosis(torch.rand(200_000, generator=g)) == pytest.approx(1.8, abs=0.02)


def test_lloyd_never_worse_than_uniform_and_recovers_clusters():
    g = torch.Generator().manual_seed(1)
    for dist in (torch.randn(64, 256, generator=g), torch.rand(64, 256, generator=g), torch.randn(64, 256, generator=g) ** 3):
        assert A.nonuniform_quant_error(dist, 2, 64) <= A.uniform_quant_error(dist, 2, 64) + 1e-12
    centres = torch.tensor([-3.0, -1.0, 0.5, 4.0], dtype=torch.float64)
    x = centres[torch.randint(0, 4, (1, 400), generator=g)] + 0.01 * torch.randn(1, 400, generator=g, dtype=torch.float64)
    lv = A.lloyd_max_levels(x, 2)
    assert torch.allclose(lv[0], centres, atol=0.01)


def test_rotation_gaussianises_outlier_weights():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(128, 256, generator=g, dtype=torch.float64)
    W[:, 7] *= 40  # an outlier input channel
    from rcp_lib.rotation.hadamard import hadamard

    Wr = A.rotated_weight(W, rot_in=hadamard(256))
    assert A.kurtosis(Wr) < A.kurtosis(W) and A.max_over_std(Wr) < A.max_over_std(W)
    assert torch.allclose((Wr**2).sum(), (W**2).sum())


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        A.uniform_quant_error(torch.randn(4, 96), 2, 64)


def test_layer_statistics_tiny_model():
    model = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2)
    none = A.layer_statistics(model, "none", group_size=32)
    assert len(none) == 2 * 7 and set(none.proj) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # "none" rows are the statistics of the norm-folded weights as they are
    lin = model.model.layers[1].self_attn.o_proj.weight
    row = none[(none.layer == 1) & (none.proj == "o_proj")].iloc[0]
    assert row["kurtosis"] == pytest.approx(A.kurtosis(lin)) and row["err_uniform"] == pytest.approx(A.uniform_quant_error(lin, 2, 32))
    gsr = A.layer_statistics(model, "gsr", group_size=32, layers=[0])
    assert len(gsr) == 7 and (gsr.block == 32).all()
    s = A.summarize(none)
    assert list(s.columns)[:1] == ["rotation"] and (s.nonuniform_gain >= 1).all()
