"""adapter.py on a tiny real LlavaForConditionalGeneration: exact start, exact teacher, merge,
save/load."""
import json
import os

import pytest
import torch

import adapter


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def train_a_little(model, inputs, params, steps=3):
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        loss = model(**inputs).logits.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_wraps_only_language_model_targets_and_freezes_the_rest(llava):
    params = adapter.add_adapter(llava, rank=4, alpha_r=8.0)
    layers = adapter.adapter_layers(llava)
    n_layers = llava.config.text_config.num_hidden_layers
    assert len(layers) == 2 * n_layers
    assert all(".language_model." in name and name.endswith(("q_proj", "v_proj"))
               for name in layers)
    trainable = {id(p) for p in llava.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params} and len(params) == 4 * n_layers


def test_unknown_target_lists_the_linear_names(llava):
    with pytest.raises(ValueError, match="o_proj") as error:
        adapter.add_adapter(llava, targets=("q_proj", "qkv"))
    assert "'qkv'" in str(error.value)


def test_at_init_the_student_is_exactly_the_base(llava, llava_inputs):
    base = logits(llava, llava_inputs)
    adapter.add_adapter(llava)
    assert torch.equal(logits(llava, llava_inputs), base)


def test_after_training_disabled_is_the_base_and_only_adapter_weights_moved(llava, llava_inputs):
    base = logits(llava, llava_inputs)
    before = {name: p.detach().clone() for name, p in llava.named_parameters()}
    params = adapter.add_adapter(llava)
    llava.train()
    train_a_little(llava, llava_inputs, params)
    llava.eval()
    assert not torch.equal(logits(llava, llava_inputs), base)  # the student moved
    with adapter.adapter_disabled(llava):
        assert torch.equal(logits(llava, llava_inputs), base)  # the teacher did not
    # and the adapter is back on after the block
    assert not torch.equal(logits(llava, llava_inputs), base)
    for name, p in llava.named_parameters():
        original = name.replace(".base.", ".")
        if original in before:
            assert torch.equal(p, before[original]), name


def test_merge_equals_unmerged_and_leaves_a_plain_model(llava, llava_inputs, tmp_path):
    params = adapter.add_adapter(llava)
    train_a_little(llava, llava_inputs, params)
    unmerged = logits(llava, llava_inputs)
    adapter.merge_adapter(llava)
    assert not adapter.adapter_layers(llava)
    torch.testing.assert_close(logits(llava, llava_inputs), unmerged, rtol=1e-5, atol=1e-5)
    assert all(not isinstance(m, adapter.AdapterLinear) for m in llava.modules())
    llava.save_pretrained(tmp_path)  # a normal transformers checkpoint again
    from transformers import LlavaForConditionalGeneration

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, llava_inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_reproduces_the_logits(llava, llava_inputs, tmp_path, processor):
    import toyworld

    params = adapter.add_adapter(llava, rank=4, alpha_r=4.0)
    train_a_little(llava, llava_inputs, params)
    trained = logits(llava, llava_inputs)
    adapter.save_adapter(llava, tmp_path)
    # no pickle
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    assert settings["rank"] == 4 and settings["targets"] == ["q_proj", "v_proj"]
    fresh = toyworld.make_model(processor.tokenizer, image_size=32, seed=0)  # same base weights
    adapter.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, llava_inputs), trained)


def test_loading_into_a_model_of_other_shapes_is_a_clear_error(llava, tmp_path):
    adapter.add_adapter(llava, rank=4)
    adapter.save_adapter(llava, tmp_path)
    other = toyworld_model_with_rank(8)
    with pytest.raises(ValueError, match=r"has shape \(4, 96\).*needs \(8, 96\)"):
        adapter.load_adapter(other, tmp_path)


def toyworld_model_with_rank(rank):
    import toyworld

    model = toyworld.make_model(toyworld.make_tokenizer(), image_size=32)
    adapter.add_adapter(model, rank=rank)
    return model


def test_adapter_output_is_w_x_plus_alpha_over_r_b_a_x():
    """The formula itself, with B away from zero: h = W x + (alpha_r / r) B A x."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = adapter.AdapterLinear(base, rank=4, alpha_r=16.0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 12)
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, layer.A, layer.B))
    expected = x.double() @ W.T + b + (16.0 / 4) * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    layer.enabled = False
    torch.testing.assert_close(layer(x).double(), x.double() @ W.T + b, rtol=1e-6, atol=1e-6)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2)).eval()


def test_a_text_only_causal_lm_takes_the_adapter_as_its_decoder(tmp_path):
    """No language_model and no vision part: the whole model is the decoder; teacher, merge and
    reload exact."""
    model = tiny_llama()
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 3, 7]])}
    base = logits(model, inputs)
    params = adapter.add_adapter(model, rank=4, alpha_r=8.0)
    assert sorted(adapter.adapter_layers(model)) == [f"model.layers.{i}.self_attn.{p}"
                                                     for i in (0, 1) for p in ("q_proj", "v_proj")]
    train_a_little(model, inputs, params)
    student = logits(model, inputs)
    assert not torch.allclose(student, base, atol=1e-4)  # the adapter has moved
    with adapter.adapter_disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=0)
    adapter.save_adapter(model, str(tmp_path / "a"))
    reloaded = tiny_llama()
    adapter.load_adapter(reloaded, str(tmp_path / "a"))
    torch.testing.assert_close(logits(reloaded, inputs), student, rtol=1e-6, atol=1e-6)
    adapter.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), student, rtol=1e-5, atol=1e-5)


def test_a_model_with_a_vision_part_and_no_language_model_needs_its_decoder_named(tmp_path):
    class Captioner(torch.nn.Module):  # a vision tower with its own q_proj beside a text decoder
        def __init__(self):
            super().__init__()
            self.vision_tower = torch.nn.ModuleDict(
                {"q_proj": torch.nn.Linear(4, 4), "v_proj": torch.nn.Linear(4, 4)})
            self.text = tiny_llama()

    model = Captioner()
    with pytest.raises(ValueError,
                       match="has a vision part but no `language_model`.*decoder='qualified.name'"):
        adapter.add_adapter(model)
    assert not adapter.adapter_layers(model)
    adapter.add_adapter(model, decoder="text")
    assert adapter.adapter_layers(model) and all(n.startswith("text.")
                                                 for n in adapter.adapter_layers(model))
    adapter.save_adapter(model, str(tmp_path / "a"))
    fresh = Captioner()
    adapter.load_adapter(fresh, str(tmp_path / "a"))  # the decoder's name travels with the adapter
    assert sorted(adapter.adapter_layers(fresh)) == sorted(adapter.adapter_layers(model))


def test_merging_into_bfloat16_loses_no_more_of_a_small_update_than_the_unmerged_bf16_layer():
    """A realistic small update (|dW| / |W| = 1e-3) on bf16 weights: the merged layer is as close to
    the exact float64 output as the unmerged adapter run in bf16, and both are far from exact."""
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 1024, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.normal_(0, 0.02)
    layer = adapter.AdapterLinear(base, rank=8, alpha_r=16.0)
    with torch.no_grad():
        layer.B.normal_()
        update = layer.scale * layer.B @ layer.A
        layer.B.mul_(1e-3 * base.weight.float().abs().mean() / update.abs().mean())
    x = torch.randn(64, 1024).to(torch.bfloat16)
    W, dW = base.weight.double(), (layer.scale * layer.B @ layer.A).double().detach()
    exact_update = x.double() @ dW.T
    with torch.no_grad():
        unmerged = layer(x).double() - x.double() @ W.T
        merged = torch.nn.Linear(1024, 1024, bias=False).to(torch.bfloat16)
        merged.weight.copy_(
            (base.weight.float() + layer.scale * layer.B @ layer.A).to(torch.bfloat16))
        merged = merged(x).double() - x.double() @ W.T
    error = lambda y: ((y - exact_update).norm() / exact_update.norm()).item()  # noqa: E731
    assert error(merged) <= 1.05 * error(unmerged)
    assert error(unmerged) > 0.5  # bf16 rounding really does swallow much of such an update


def moved_adapter(model, rank=4, seed=3, targets=("q_proj", "v_proj")):
    """Attach an adapter and move B away from zero: a state where a wrong key, scale or layer
    shows."""
    adapter.add_adapter(model, rank=rank, alpha_r=2.0 * rank + 3, targets=targets)
    torch.manual_seed(seed)
    for layer in adapter.adapter_layers(model).values():
        torch.nn.init.normal_(layer.B, std=0.3)
    return model


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "attention", "all-linear"])
def test_the_peft_format_adapter_loads_in_peft_with_equal_logits_and_merge(llava, llava_inputs,
                                                                           tmp_path, targets):
    import copy

    from peft import PeftModel

    base = copy.deepcopy(llava)
    moved_adapter(llava, targets=adapter.parse_targets(targets))
    path = adapter.save_peft_adapter(llava, str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 11.0
    assert config["target_modules"] and all(".language_model." in t
                                            for t in config["target_modules"])
    with torch.no_grad():
        ours = llava(**llava_inputs).logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        theirs = peft_model(**llava_inputs).logits
        plain = base(**llava_inputs).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter has moved the model
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # PEFT wrapped exactly our layers: none in the vision tower
    lora_layers = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                         and len(m.lora_A))
    assert [n.removeprefix("base_model.model.")
            for n in lora_layers] == sorted(adapter.adapter_layers(llava))
    merged_peft = peft_model.merge_and_unload()
    adapter.merge_adapter(llava)
    merged_ours = dict(llava.named_parameters())
    for name, value in merged_peft.named_parameters():
        torch.testing.assert_close(value, merged_ours[name], rtol=1e-6, atol=1e-6)


def test_adapter_targets_name_the_language_models_linear_layers(llava):
    assert adapter.parse_targets("q_proj,v_proj") == ("q_proj", "v_proj")
    assert adapter.parse_targets("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert adapter.parse_targets("attention, mlp") == ("q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj")
    assert adapter.parse_targets("q_proj,all-linear") == ("all-linear",)
    text = llava.config.text_config
    hidden, inner, n_layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    params = adapter.add_adapter(llava, rank=8, targets=("all-linear",))
    layers = adapter.adapter_layers(llava)
    # every linear layer of every decoder layer, none of the tower, projector or output head
    assert len(layers) == 7 * n_layers and all(".language_model.layers." in n for n in layers)
    shapes = {name.rpartition(".")[2]: (layer.A.shape, layer.B.shape)
              for name, layer in layers.items()}
    assert shapes["q_proj"] == ((8, hidden), (hidden, 8))
    assert shapes["gate_proj"] == ((8, hidden), (inner, 8))
    assert shapes["down_proj"] == ((8, inner), (hidden, 8))
    assert len(params) == 2 * len(layers)
    assert llava._adapter_settings["targets"] == ["all-linear"]


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_a_wider_adapter_merges_to_its_unmerged_logits_and_reloads(llava, llava_inputs, tmp_path,
                                                                    processor, targets):
    import toyworld

    params = adapter.add_adapter(llava, rank=16, alpha_r=32.0,
                                 targets=adapter.parse_targets(targets))
    train_a_little(llava, llava_inputs, params)
    unmerged = logits(llava, llava_inputs)
    adapter.save_adapter(llava, tmp_path)
    fresh = toyworld.make_model(processor.tokenizer, image_size=32, seed=0)
    adapter.load_adapter(fresh, tmp_path)  # the targets travel with the adapter
    assert sorted(adapter.adapter_layers(fresh)) == sorted(adapter.adapter_layers(llava))
    assert torch.equal(logits(fresh, llava_inputs), unmerged)
    adapter.merge_adapter(llava)
    torch.testing.assert_close(logits(llava, llava_inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_remove_adapter_gives_back_the_model_as_it_was(llava, llava_inputs):
    before = logits(llava, llava_inputs)
    moved_adapter(llava)
    assert not torch.allclose(logits(llava, llava_inputs), before, atol=1e-4)
    adapter.remove_adapter(llava)
    assert not adapter.adapter_layers(llava)
    assert torch.equal(logits(llava, llava_inputs), before)
