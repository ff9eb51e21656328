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


def test_model_name_with_first_layers_is_parsed_and_checked():
    assert models.split_model_name("smollm2-135m") == ("smollm2-135m", None)
    assert models.split_model_name("smollm2-135m@layers=4") == ("smollm2-135m", 4)
    assert models.split_model_name("org/model@layers=12") == ("org/model", 12)
    for bad in ("smollm2-135m@layers=0", "smollm2-135m@layers=x", "smollm2-135m@layers=", "@layers=3",
                "smollm2-135m@layers=04", "smollm2-135m@layers=\u00b2", "smollm2-135m@layers=-1"):
        with pytest.raises(ValueError, match="bad model name"):
            models.split_model_name(bad)
    d = models.model_dims("smollm2-135m@layers=4")
    assert d.n_layers == 4 and d == models.EMBEDDED_DIMS.__class__(**{**models.EMBEDDED_DIMS.__dict__, "n_layers": 4})
    with pytest.raises(ValueError, match="first 31 decoder layers"):
        models.model_dims("smollm2-135m@layers=31")
    assert models.describe("smollm2-135m@layers=4").startswith("the first 4 decoder layers of SmolLM2-135M")
    with pytest.raises(ValueError, match="first 31 decoder layers"):  # before any weight is read
        models.load("smollm2-135m@layers=31")
    m = models.tiny_llama()
    n = len(models.decoder_layers(m))
    with pytest.raises(ValueError, match=f"first {n + 1} decoder layers"):
        models.keep_first_layers(m, n + 1)
    assert len(models.decoder_layers(m)) == n == m.config.num_hidden_layers  # untouched


def test_first_layers_of_the_embedded_model_are_its_own(embedded):
    """``"smollm2-135m@layers=4"`` (the smoke profile's model) is the embedded model cut after its 4th decoder layer:
    the same weights, the tied head, and the logits of the full model's first 4 layers, norm and head."""
    import copy

    full, tok = embedded
    small, tok4 = models.load("smollm2-135m@layers=4")
    assert len(models.decoder_layers(small)) == 4 == small.config.num_hidden_layers
    assert small.lm_head.weight is small.model.embed_tokens.weight
    ref = copy.deepcopy(full)
    ref.model.layers = ref.model.layers[:4]
    ref.config.num_hidden_layers = 4
    sd, rd = small.state_dict(), ref.state_dict()
    assert sd.keys() == rd.keys() and all(torch.equal(sd[k], rd[k]) for k in sd)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(small(ids).logits, ref(ids).logits)
    assert tok4("The capital").input_ids == tok("The capital").input_ids


def test_first_layers_of_a_local_folder_and_of_a_family_with_layer_types(tmp_path):
    """A local folder whose name happens to contain the suffix is taken as it is; a family whose config lists one
    attention kind per layer (Qwen2's ``layer_types``) keeps the kinds of the kept layers, so it saves and reloads."""
    odd = tmp_path / "run@layers=2"
    odd.mkdir()
    assert models.split_model_name(str(odd)) == models.split_model_name(odd) == (str(odd), None)  # a Path too
    m = models.tiny_model("qwen2", layers=3)
    if getattr(m.config, "layer_types", None) is None:
        pytest.skip("this transformers version keeps no layer_types")
    models.keep_first_layers(m, 2)
    assert len(m.config.layer_types) == 2 == m.config.num_hidden_layers
    m.save_pretrained(tmp_path / "q2")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q2")
    assert len(models.decoder_layers(back)) == 2
