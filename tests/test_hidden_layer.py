"""The one hidden-layer resolver of the integrations (sveb_kernels/integrations/_layers.py): for
tiny random models of the families transformers ships, and a PEFT-wrapped one, the hooked tensor at
every index equals `output_hidden_states=True`'s, on left-padded rows of different lengths."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sveb_kernels.integrations._layers import resolve_layer  # noqa: E402

VOCAB, HIDDEN, LAYERS = 97, 32, 3
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, pad_token_id=0)


def tiny(family):
    t = transformers
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**COMMON, num_key_value_heads=2))
    if family == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**COMMON, num_key_value_heads=2))
    if family == "gemma":
        return t.GemmaForCausalLM(t.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=8))
    if family == "phi":
        return t.PhiForCausalLM(t.PhiConfig(**COMMON))
    if family == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**COMMON))
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                                              n_positions=64, pad_token_id=0))
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "gemma", "phi", "gpt_neox", "gpt2"]


def rows(generator):
    ids = torch.randint(1, VOCAB, (3, 11), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # left padding: rows of different lengths
    attention[2, :7] = 0
    return ids, attention


def check_every_index(model, seed):
    model.eval()
    ids, attention = rows(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
    assert len(want) == LAYERS + 1
    for layer in range(-(LAYERS + 1), LAYERS + 1):
        seen = []
        handle = resolve_layer(model, layer).hook(seen.append)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention)
        handle.remove()
        assert len(seen) == 1, (layer, len(seen))
        torch.testing.assert_close(seen[0], want[layer], rtol=0, atol=0, msg=f"layer {layer}")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_index_of_every_family(family, seed):
    torch.manual_seed(seed)
    check_every_index(tiny(family), seed)


def test_peft_wrapped_model(seed):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    check_every_index(model, seed)


def test_bad_layer_and_unknown_model():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"hidden_layer must be an int in \[-4, 3\]"):
        resolve_layer(model, 4)
    with pytest.raises(TypeError, match="hidden_layer"):
        resolve_layer(model, 1.0)
    with pytest.raises(TypeError, match="layer"):
        resolve_layer(model, True, name="layer")
    with pytest.raises(ValueError, match="decoder layers of Linear"):
        resolve_layer(torch.nn.Linear(2, 2), 0)
