"""Where the ablation rows start (rcp_lib/experiments/ablation_start.py): clip ratio against the rotated FP weights and level
offsets from the uniform grid, on hand-built quantizers."""

import pytest
import torch

from rcp_lib.experiments import ablation_start as C
from rcp_lib.quant.quantizers import WeightQuantConfig, WeightQuantizer


class _Lin(torch.nn.Module):
    def __init__(self, w: torch.Tensor, cfg: WeightQuantConfig):
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())
        self.weight_quantizer = WeightQuantizer(tuple(w.shape), cfg).init_from(w)


def test_ratio_is_taken_against_the_reference_weight_not_the_latent_one():
    """A static range set to half of each group's min-max: ratio 0.5 against the FP weight. Once the latent weight is
    replaced by values inside [lo, hi] (what GPTQ on the grid leaves), the module's own ratio is 1 while the ratio
    against the FP weight stays 0.5; widening the range moves it, and ``compare`` takes the mean per-group change."""
    w = torch.tensor([[-4.0, -1.0, 2.0, 4.0, -2.0, 0.0, 1.0, 2.0]])  # two groups of 4: min-max 8 and 4
    cfg = WeightQuantConfig(bits=2, group_size=4, lwc=True, range_mode="static", clip_init="const", lwc_init=0.0)
    m = torch.nn.Sequential(_Lin(w, cfg))
    q = m[0].weight_quantizer
    torch.testing.assert_close(q.lo.detach(), torch.tensor([[-2.0, -1.0]]))  # sigmoid(0) * min
    torch.testing.assert_close(q.hi.detach(), torch.tensor([[2.0, 1.0]]))
    ref = {"0": w.clone()}
    start = C.clip_ratios(m, ref)
    torch.testing.assert_close(start["0"], torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    with torch.no_grad():  # latent weight on the grid's ends: its own min-max is the range
        m[0].weight.copy_(torch.tensor([[-2.0, -2.0, 2.0, 2.0, -1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(q.clip_ratio(m[0].weight), torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(C.clip_ratios(m, ref)["0"], start["0"])
    with torch.no_grad():
        q.hi.add_(torch.tensor([[0.8, -0.4]]))  # group 1: 4.8 / 8 = 0.6; group 2: 1.6 / 4 = 0.4
    trained = C.clip_ratios(m, ref)
    got = C.compare(start, trained)
    assert got["clip_ratio_start"] == pytest.approx(0.5) and got["clip_ratio_trained"] == pytest.approx(0.5)
    assert got["clip_shift"] == pytest.approx(0.1) and got["groups"] == 2  # the mean hides it, the per-group |Δ| not
    assert C.mean_abs(C.level_offsets(m)) == pytest.approx(0.0, abs=1e-12)  # ldp_init="uniform": the uniform grid
    with pytest.raises(KeyError, match="no reference weight"):
        C.clip_ratios(m, {})
    with pytest.raises(ValueError, match="different layers"):
        C.compare(start, {})


def test_start_model_of_rcp_and_without_clip(monkeypatch):
    """The start of the ablation's RCP has the searched clip (ratio < 1 against its own FP weights) and "w/o Clip"
    min-max (ratio 1), on the first two decoder layers of the smoke profile's embedded model (no GPTQ, no training;
    the clip search of all 30 layers took a minute and shows nothing more)."""
    import copy
    import importlib

    from rcp_lib.experiments import method
    from rcp_lib.profiles import get_profile

    build = importlib.import_module("rcp_lib.experiments.build")  # the module (the package exports its build())

    P = get_profile("smoke")
    fp, tok = build.base_model(P)
    small = copy.deepcopy(fp)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    monkeypatch.setattr(build, "base_model", lambda profile: (small, tok))
    ratios = {}
    for name in ("RCP", "RCP w/o Clip"):
        model = C.start_model(method(name, "W2A4KV4"), P)
        ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_quantizer")}
        ratios[name] = C.compare(*(C.clip_ratios(model, ref),) * 2)
        ratios[name]["levels"] = C.mean_abs(C.level_offsets(model))
    assert ratios["RCP w/o Clip"]["clip_ratio_start"] == pytest.approx(1.0)
    assert ratios["RCP"]["clip_ratio_start"] < 0.9 and ratios["RCP"]["clip_shift"] == 0.0
    assert ratios["RCP"]["levels"] > 0.01  # Lloyd-Max levels inside the searched range: off the uniform grid
