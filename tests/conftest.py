"""Shared fixtures: tiny models of the *real* transformers classes, built from configs (no download)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import decode  # noqa: E402
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
    prompts = [decode.chat_prompt(processor, "Is there a cat in the image?"),
               decode.chat_prompt(processor, "Describe the image.")]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")


def tiny_internvl(vocab_size=64, image_token_id=5):
    """A tiny InternVLForConditionalGeneration (InternViT + Qwen2) from a config, with its input ids."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False),
        image_token_id=image_token_id, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).eval()


def tiny_internvl_processor():
    """An InternVLProcessor with InternVL's real tiling (the PIL GotOcr2ImageProcessorPil with
    crop_to_patches: an image is cut into 1..4 tiles by its aspect ratio, plus a thumbnail when it
    is cut), tiles of 32 pixels instead of 448, and a word-level tokenizer carrying InternVL's image
    tokens (<img>, </img>, <IMG_CONTEXT>).

    InternVLProcessor insists on a video processor, which needs torchvision, and torchvision does not
    import beside this CPU torch build. So the processor is built from the image processor and the
    tokenizer alone: a subclass whose `get_attributes` names only those two (ProcessorMixin checks
    and stores exactly the attributes it lists); everything an image takes is InternVLProcessor's own.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import InternVLProcessor, PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    vocab = {w: i for i, w in enumerate(specials + toyworld.WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                               max_patches=4, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    template = toyworld.CHAT_TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n")  # InternVL's image content
    # image_seq_length: tokens per tile = (32 / 8 patches) ** 2 * downsample_ratio ** 2 = 4 (tiny_internvl)
    class InternVLImageProcessor(InternVLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return InternVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                  chat_template=template)
