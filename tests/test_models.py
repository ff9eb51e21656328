import pytest
import torch

from rcp_lib import models


def test_embedded_config(embedded):
    model, tok = embedded
    d = models.dims(model)
    assert (d.hidden, d.intermediate, d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim, d.vocab) == (
        576, 1536, 30, 9, 3, 64, 49152)
    assert d.tied and model.lm_head.weight is model.model.embed_tokens.weight
    assert d == models.EMBEDDED_DIMS == models.model_dims("smollm2-135m")  # what runs are validated against, unloaded
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n_params < 135_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"


def test_embedded_greedy_generation_is_sane(embedded):
    model, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text


def test_unknown_name_gives_clear_error():
    with pytest.raises(models.ModelNotFoundError) as e:
        models.load("definitely-not-a-model-xyz")
    assert "smollm2-135m" in str(e.value)
    assert "definitely-not-a-model-xyz" in str(e.value)


def test_unsupported_architecture_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(models.UnsupportedModelError, match="llama"):
        models.check_supported(m)


def test_untie_embeddings_copies():
    m = models.tiny_llama(tied=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    models.untie_embeddings(m)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    with torch.no_grad():
        m.lm_head.weight.mul_(2)
    assert not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
