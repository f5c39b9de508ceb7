"""Shared fixtures: tiny models of the *real* transformers classes, built from configs (no download)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval_pope  # noqa: E402
import toyworld  # noqa: E402


@pytest.fixture(scope="session")
def processor():
    return toyworld.make_processor(image_size=32)


@pytest.fixture
def llava(processor):
    """An untrained tiny LlavaForConditionalGeneration, float32, eval mode."""
    return toyworld.make_model(processor.tokenizer, image_size=32, seed=0)


@pytest.fixture
def generate_calls(monkeypatch):
    """The contrast settings of every eval_pope.generate call (the real generate still runs)."""
    seen, real = [], eval_pope.generate

    def recording(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("contrast", "alpha", "beta", "noise_step")})
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_pope, "generate", recording)
    return seen


@pytest.fixture
def llava_inputs(processor):
    """A left-padded batch of two image + question prompts, as eval_pope builds them."""
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (40, 40, 200))]
    prompts = [eval_pope.chat_prompt(processor, "Is there a cat in the image?"),
               eval_pope.chat_prompt(processor, "Describe the image.")]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def tiny_internvl():
    """A tiny InternVLForConditionalGeneration (InternViT + Qwen2) from a config, with its input ids."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False),
        image_token_id=5, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).eval()
