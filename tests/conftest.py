"""Shared fixtures: tiny models of the *real* transformers classes, built from configs (no
download)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import decode  # noqa: E402
import models  # noqa: E402
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
    """The contrast settings of every decode.generate call (the real generate still runs)."""
    seen, real = [], decode.generate

    def recording(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("contrast", "alpha", "beta", "noise_step")})
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "generate", recording)
    return seen


@pytest.fixture
def llava_inputs(processor):
    """A left-padded batch of two image + question prompts, as eval_pope builds them."""
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (40, 40, 200))]
    prompts = [models.chat_prompt(processor, "Is there a cat in the image?"),
               models.chat_prompt(processor, "Describe the image.")]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True,
                     padding_side="left")


def tiny_internvl(vocab_size=64, image_token_id=5):
    """A tiny InternVLForConditionalGeneration (InternViT + Qwen2) from a config, with its input
    ids."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=48,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False),
        image_token_id=image_token_id, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).eval()


def word_level_core(specials):
    """The toy world's word-level tokenizer core, with a family's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(specials + toyworld.WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")
    return core


def take_seed_steps(model, batch, parameters, lr, steps=3):
    """A few SEED steps (reverse KL, noise step 600, step s's noise seeded by s), each loss
    finite."""
    import seed

    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(steps):
        loss, _, _ = seed.seed_step(model, batch, "reverse", noise_step=600,
                                    generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def check_the_teacher_is_the_purified_base(model, base, batch, noise_seed, distorted_pixel_values,
                                           **inputs):
    """After the student has moved: seed_step's student equals the model's own logits at the
    response positions, and its teacher equals purify(base clean, base distorted), computed by full
    forwards of an untouched copy of the base model. distorted_pixel_values: the distortion of
    noise_seed's generator."""
    import purge
    import seed

    _, teacher, student = seed.seed_step(model, batch, "reverse", noise_step=600,
                                         generator=torch.Generator().manual_seed(noise_seed))
    at = batch["response_mask"][:, 1:]
    inputs.update(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        clean = base(**inputs, pixel_values=batch["pixel_values"]).logits[:, :-1][at]
        distorted = base(**inputs, pixel_values=distorted_pixel_values).logits[:, :-1][at]
        moved = model(**inputs, pixel_values=batch["pixel_values"]).logits[:, :-1][at]
    assert not torch.allclose(student, clean, atol=1e-3)  # the adapter has really moved the student
    torch.testing.assert_close(student, moved, rtol=1e-5, atol=1e-5)
    expected = purge.purify(clean, distorted)
    assert torch.equal(torch.isinf(teacher), torch.isinf(expected))
    torch.testing.assert_close(teacher[~torch.isinf(teacher)], expected[~torch.isinf(expected)],
                               rtol=1e-4, atol=1e-4)


def tiny_internvl_processor():
    """An InternVLProcessor with InternVL's real tiling (the PIL GotOcr2ImageProcessorPil with
    crop_to_patches: an image is cut into 1..4 tiles by its aspect ratio, plus a thumbnail when it
    is cut), tiles of 32 pixels instead of 448, and a word-level tokenizer carrying InternVL's image
    tokens (<img>, </img>, <IMG_CONTEXT>).

    InternVLProcessor insists on a video processor, which needs torchvision, and torchvision does
    not import beside this CPU torch build. So the processor is built from the image processor and
    the tokenizer alone: a subclass whose `get_attributes` names only those two (ProcessorMixin
    checks and stores exactly the attributes it lists); everything an image takes is
    InternVLProcessor's own.
    """
    from transformers import InternVLProcessor, PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    core = word_level_core(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32},
                                               crop_to_patches=True, min_patches=1, max_patches=4,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # InternVL's image content
    template = toyworld.CHAT_TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n")
    # image_seq_length: tiny_internvl's tokens per tile, (32 / 8 patches) ** 2 * 0.5 ** 2 = 4
    class InternVLImageProcessor(InternVLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return InternVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_length=4, chat_template=template)


def tiny_qwen_vl_processor():
    """A Qwen2.5-VL processor (Qwen2_5_VLProcessor, which Qwen2-VL's processor equals in what is
    used here) with Qwen2-VL's real image processor (Qwen2VLImageProcessorPil: an image resized to a
    multiple of patch x merge pixels and flattened into rows of patches, two temporal copies per
    row, its grid in image_grid_thw), 8-pixel patches instead of 14, and a word-level tokenizer
    carrying Qwen's special tokens. Built from the image processor and the tokenizer alone, as
    tiny_internvl_processor is, because the video processor it insists on needs torchvision (see
    there).
    """
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<unk>"]
    core = word_level_core(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 16 * 16,
                                                     "longest_edge": 64 * 64})
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in "
                "message['content'] %}{% if c['type'] == 'image' "
                "%}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ "
                "c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                # Qwen's, for one image
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    class QwenVLImageProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return QwenVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=template)


def tiny_qwen_vl(processor, family="qwen2_5_vl"):
    """A tiny Qwen2_5_VLForConditionalGeneration (or Qwen2VLForConditionalGeneration) from a
    config."""
    import transformers

    tokenizer = processor.tokenizer
    text = dict(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, tie_word_embeddings=False,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 2, 2]})
    ids = dict(image_token_id=processor.image_token_id,
               video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      out_hidden_size=48, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        model_class = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).eval()
    # sharper than the default init (std 0.02), whose logits are so flat that a wrong position
    # never flips a greedy token; at 0.1 it does
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.1)
    return model
