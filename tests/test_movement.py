"""The movement columns of QAT rows, on a hand-built example (numbers worked out by hand in the comments)."""

import math

import pytest
import torch

from rcp_lib.movement import movement, snapshot
from rcp_lib.quant.quantizers import WeightQuantConfig, WeightQuantizer


def test_movement_on_hand_built_snapshots():
    before = {
        "a": {"clip_ratio": torch.tensor([[1.0, 0.5]]), "fractions": torch.tensor([[[0, 1 / 3, 2 / 3, 1]]]),
              "weight": torch.tensor([[3.0, 4.0]])},  # ||W0||^2 = 25
        "b": {"clip_ratio": torch.tensor([[0.9]]), "fractions": torch.tensor([[[0, 0.25, 0.5, 1]]]),
              "weight": torch.tensor([[0.0]])},
    }
    after = {
        "a": {"clip_ratio": torch.tensor([[0.8, 0.5]]), "fractions": torch.tensor([[[0, 0.3, 0.7, 1]]]),
              "weight": torch.tensor([[3.0, 0.0]])},  # dW = (0, -4): 16
        "b": {"clip_ratio": torch.tensor([[0.6]]), "fractions": torch.tensor([[[0, 0.25, 0.4, 1]]]),
              "weight": torch.tensor([[3.0]])},  # dW = 3: 9
    }
    m = movement(before, after)
    assert m["clip_ratio_init"] == pytest.approx((1.0 + 0.5 + 0.9) / 3)
    assert m["clip_ratio_final"] == pytest.approx((0.8 + 0.5 + 0.6) / 3)
    assert m["clip_shift"] == pytest.approx((0.2 + 0 + 0.3) / 3)  # per-group |change|, not the change of the mean
    # interior shifts: |0.3-1/3|, |0.7-2/3|, |0.25-0.25|, |0.4-0.5| -> mean
    assert m["level_shift"] == pytest.approx((1 / 30 + 1 / 30 + 0 + 0.1) / 4)
    assert m["weight_shift"] == pytest.approx(math.sqrt((16 + 9) / 25))
    assert math.isnan(m["code_flips"])  # no codes in these snapshots
    assert math.isnan(m["range_shift"])  # nor spans
    for snap, codes in ((before, ([[0, 3]], [[1]])), (after, ([[0, 2]], [[2]]))):  # 2 of 3 codes change
        snap["a"]["codes"], snap["b"]["codes"] = (torch.tensor(c, dtype=torch.uint8) for c in codes)
    assert movement(before, after)["code_flips"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="different models"):
        movement(before, {"a": after["a"]})


def test_snapshot_of_a_quantizer_matches_its_definitions():
    torch.manual_seed(0)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 32))
            self.weight_quantizer = WeightQuantizer((4, 32), WeightQuantConfig(bits=2, group_size=16, lwc_init=0.0))

    m = Lin()
    s0 = snapshot(m)
    torch.testing.assert_close(s0[""]["clip_ratio"], torch.full((4, 2), 0.5, dtype=torch.float64))  # sigmoid(0)
    torch.testing.assert_close(s0[""]["fractions"][0, 0], torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))
    with torch.no_grad():
        m.weight_quantizer.theta[..., 0] += 1.0
        m.weight.mul_(2)
    mv = movement(s0, snapshot(m))
    assert mv["clip_ratio_final"] == pytest.approx(0.5) and mv["weight_shift"] == pytest.approx(1.0)
    assert mv["clip_shift"] == pytest.approx(0.0)
    assert mv["level_shift"] > 0.05
    assert s0[""]["codes"].dtype == torch.uint8 and s0[""]["codes"].shape == (4, 32)
    k1 = m.weight_quantizer.export(m.weight)[0]  # the moved level: codes by the quantizer's own export
    assert mv["code_flips"] == pytest.approx(float((k1 != s0[""]["codes"]).double().mean())) and mv["code_flips"] > 0


def test_range_shift_is_the_range_itself_not_the_ratio_over_moving_weights():
    """A static, scale-free range (``range_param="log"``): a frozen range moves ``range_shift`` by 0 exactly while the
    ratio over the moved latent group does move (``clip_shift`` > 0); stretching one end by ``e^s`` moves the span of
    that group by ``(e^s - 1) / 2`` (the end sits half a span from the centre), by hand."""

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))
            cfg = WeightQuantConfig(bits=2, group_size=16, method="ldp", range_mode="static", range_param="log")
            self.weight_quantizer = WeightQuantizer((4, 32), cfg)
            self.weight_quantizer.init_from(self.weight.detach())

    m = Lin()
    s0 = snapshot(m)
    with torch.no_grad():
        m.weight.mul_(1.5)  # the weights move, the range does not
    mv = movement(s0, snapshot(m))
    assert mv["range_shift"] == 0.0 and mv["clip_shift"] > 0.01
    with torch.no_grad():
        m.weight_quantizer.log_hi[0, 0] = math.log(1.2)  # one group's upper end 20 % further from the centre
    mv = movement(s0, snapshot(m))
    assert mv["range_shift"] == pytest.approx(0.1 / 8, rel=1e-6)  # (1.2 - 1) / 2 for 1 group of 8 (float32 log)
