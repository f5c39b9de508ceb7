"""Every difference between the model families (LLaVA-1.5, InternVL, Qwen2-VL) and PEFT.

Paper: SEED (arXiv 2507.04680) is written for LLaVA-1.5 and InternVL2; the formulas (METHOD.md 1-5)
do not change with the family, but where a family keeps its pixels, positions and placeholders does.
Each function reads LLaVA's case first and each other family's branch after it:
- loading a checkpoint folder and its processor (InternVL's and Qwen2-VL's without torchvision);
- the chat prompt and a left-padded batch of image prompts;
- the projected vision features (a list per image, or one tensor), the positions (M-RoPE);
- the distortion's layout (Qwen2-VL's flattened patches, shared by a still image's temporal copies),
  and which pixel rows belong to which question (InternVL's tiles);
- the placeholder token ids, never a valid answer token;
- a PEFT wrapper: the transformers model under it, and its own way of turning the adapter off.
"""
import json
import os

import torch

import adapter
import purge

# ---------------------------------------------------------------------------------------------
# Loading, prompts and batches

def load_processor(path):
    """The folder's own processor, for images: AutoProcessor's, or, where the processor class also
    takes a video processor (InternVL's, Qwen2-VL's), which needs torchvision, and torchvision is
    not installed, the same class built from the image processor, the tokenizer, the chat template
    and the processor settings alone (the image path never reads the video processor)."""
    import transformers
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available

    settings, _ = ProcessorMixin.get_processor_dict(path)
    name = settings.get("processor_class")
    # Qwen2.5-VL's place
    if name is None and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            name = json.load(f).get("processor_class")
    full = getattr(transformers, name or "", None)
    if full is None or is_torchvision_available() or "video_processor" not in full.get_attributes():
        return AutoProcessor.from_pretrained(path)
    # ProcessorMixin loads and checks exactly the attributes that get_attributes lists, so the
    # video processor is left out of that list
    attributes = [a for a in full.get_attributes() if a != "video_processor"]
    images_only = type(name, (full,), {"get_attributes": classmethod(lambda cls: attributes)})
    return images_only.from_pretrained(path)


def load_model(path, device="cpu", dtype=None):
    """Any local image-text-to-text checkpoint in transformers form, with its processor
    (load_processor)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path)
    if not hasattr(processor, "image_processor"):  # AutoProcessor falls back to the tokenizer alone
        raise ValueError(f"{path}: AutoProcessor gave a {type(processor).__name__}, not an "
                         f"image-text processor: the folder's processor could not be built (no "
                         f"preprocessor_config.json?)")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32)
    model = model.to(device).eval()
    return model, processor


def chat_prompt(processor, text):
    """One image and one question in the processor's own chat template (the real models' path)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def prompt_batch(processor, images, texts, device="cpu"):
    """One image (a path or a PIL image) + one question per row, through the chat template,
    left-padded for generation (processed_prompts)."""
    return processed_prompts(processor, images, texts, "left").to(device)


def processed_prompts(processor, images, texts, padding_side):
    """processor(images, chat prompts of texts, padded on `padding_side`), with every distinct image
    (the same path, or the same PIL object) read and preprocessed once however many of the rows ask
    about it: SEED's probes come six to an image, POPE's questions six to an image.

    Each distinct image goes through the processor once, with its first prompt; the other prompts
    on it are tokenized alone and get that call's expansion of the image placeholder (the tokens
    between the text before the placeholder and the text after it: 576 <image> tokens for LLaVA,
    <img> + tiles x 256 <IMG_CONTEXT> + </img> for InternVL, the grid's <|image_pad|> for Qwen2-VL)
    and its pixel rows. Special tokens split the text, so the rest is tokenized as the processor
    tokenizes it (tested equal to one processor call over all the rows, on all three families).
    The rows are padded here, never by the tokenizer, which is left as it was and may be used by
    another thread meanwhile (loading.prefetched). A processor whose text does not split so (no
    single placeholder in a prompt) gets all the rows at once, as they are.
    """
    prompts = [chat_prompt(processor, text) for text in texts]
    keys = [image if isinstance(image, (str, os.PathLike)) else id(image) for image in images]
    tokenizer, placeholder = processor.tokenizer, processor.image_token_id
    once, rows = {}, []  # image key -> (the placeholder's expansion, the image's other outputs)
    for key, image, prompt in zip(keys, images, prompts):
        raw = tokenizer(prompt)["input_ids"]
        at = raw.index(placeholder) if raw.count(placeholder) == 1 else None
        if key not in once and at is not None:
            first = processor(images=[open_image(image)], text=[prompt], return_tensors="pt")
            expanded, after = first["input_ids"][0].tolist(), len(raw) - at - 1
            if raw[:at] == expanded[:at] and raw[at + 1:] == expanded[len(expanded) - after:]:
                with_token_types = "mm_token_type_ids" in first
                once[key] = (expanded[at:len(expanded) - after],
                             {k: v for k, v in first.items()
                              if k not in ("input_ids", "attention_mask", "mm_token_type_ids")})
        if at is None or key not in once:  # this processor's text does not split there
            return processor(images=[open_image(i) for i in images], text=prompts,
                             return_tensors="pt", padding=True, padding_side=padding_side)
        rows.append(raw[:at] + once[key][0] + raw[at + 1:])
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        place = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, place], attention_mask[i, place] = torch.tensor(ids), 1
    outputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    outputs.update({name: torch.cat([once[key][1][name] for key in keys])
                    for name in once[keys[0]][1]})  # pixel_values, image_grid_thw: row by row
    if with_token_types:  # Qwen2-VL's processor marks the image tokens
        outputs["mm_token_type_ids"] = torch.tensor(
            processor.create_mm_token_type_ids(input_ids.tolist()))
    from transformers import BatchFeature

    return BatchFeature(outputs)


def open_image(image):
    """An RGB PIL image from a file path (read now, the file closed after) or from a PIL image.

    Runs over many photos carry paths and read pixels only when a batch needs them: 83k COCO images
    as PIL images would be tens of GB of memory, as paths a few MB. A file that cannot be read is an
    error naming it.
    """
    if not isinstance(image, (str, os.PathLike)):
        return image.convert("RGB")
    from PIL import Image

    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{image}: cannot read the image ({error})") from None


# ---------------------------------------------------------------------------------------------
# Features, positions, placeholders

def image_features(model, pixel_values, image_grid_thw=None):
    """Projected vision features, one row per image token: (n_image_tokens_in_batch, hidden).

    image_grid_thw: Qwen2-VL's (time, height, width) patch grid per image, which its vision tower
    needs to read the flattened patches; None for LLaVA and InternVL.
    """
    grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    output = model.get_image_features(pixel_values=pixel_values, **grid)
    features = getattr(output, "pooler_output", output)
    # LLaVA and Qwen2-VL return one tensor per image, InternVL one tensor
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features), dim=0)
    return features.reshape(-1, features.shape[-1])


def position_ids(model, input_ids, attention_mask, image_grid_thw=None):
    """The positions of a padded batch as the family reads them: 1-D over the attended tokens; for
    Qwen2-VL's M-RoPE, (4, batch, length) as its generate builds them (row 0 the 1-D ones, rows 1-3
    get_rope_index's (time, height, width)). Passed explicitly, so the model never infers them from
    the state it keeps between calls (rope_deltas)."""
    text = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = getattr(model, "model", None)
    if image_grid_thw is None or not hasattr(inner, "get_rope_index"):
        return text
    token_types = (input_ids == model.config.image_token_id).long()  # 1 on image tokens, 0 on text
    mrope, _ = inner.get_rope_index(input_ids, mm_token_type_ids=token_types,
                                    image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return torch.cat([text[None], mrope.to(text.device)], dim=0)


def placeholder_token_ids(model=None, processor=None):
    """Ids of the tokens that stand for an image or video (and the markers a processor writes around
    them), from the model's config and the processor: never a valid token of an answer, since the
    next pass would read it as a placeholder."""
    ids = set()
    if model is not None:
        ids |= {getattr(model.config, name, None)
                for name in ("image_token_id", "image_token_index", "video_token_id")}
    if processor is not None:
        ids |= set(processor.image_token_ids) | set(processor.video_token_ids)
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# The distortion's layout

def distort_images(model, pixel_values, noise_step, generator=None):
    """purge.distort on a batch's image tensor, in the layout the model's family gives it.

    LLaVA and InternVL: images (or tiles) as (n, 3, H, W), distorted as they are. Qwen2-VL: each
    image flattened into rows of patches, every row holding `temporal_patch_size` copies of the same
    frame (a still image is a video of repeated frames); the noise is drawn for one frame and shared
    by its copies, as if the one image had been distorted before the processor copied it.
    """
    frames = getattr(getattr(model.config, "vision_config", None), "temporal_patch_size", 1) or 1
    if pixel_values.dim() != 2 or frames == 1:
        return purge.distort(pixel_values, noise_step, generator)
    rows, width = pixel_values.shape  # a row is (channels, frames, patch, patch), flattened
    channels = getattr(model.config.vision_config, "in_channels", 3)
    per_frame = pixel_values.view(rows, channels, frames, width // (channels * frames))
    one_frame = purge.distort(per_frame[:, :, :1], noise_step, generator)
    return one_frame.expand_as(per_frame).reshape(rows, width)


def distort_per_question(model, pixel_values, input_ids, noise_step, generators):
    """Each question's rows of pixel_values (its tiles, image or patches) distorted with its own
    generator, so that an answer does not depend on the batch it was answered in."""
    parts = torch.split(pixel_values, pixel_rows_per_question(model, pixel_values, input_ids))
    return torch.cat(
        [distort_images(model, part, noise_step, g) for part, g in zip(parts, generators)])


def pixel_rows_per_question(model, pixel_values, input_ids):
    """How many rows of pixel_values belong to each question (row of input_ids): its share of the
    image placeholders: one for LLaVA, its tiles for InternVL, its patches for Qwen2-VL."""
    placeholders = (input_ids == model.config.image_token_id).sum(-1).tolist()
    rows, total = pixel_values.shape[0], sum(placeholders)
    shares = [n * rows // total if total else 0 for n in placeholders]
    if total == 0 or sum(shares) != rows or any(n * rows % total for n in placeholders):
        raise ValueError(
            f"{total} image placeholders do not split evenly over {rows} rows of pixel values")
    return shares


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing, with dropout off

def checkpoint_decoder_layers(model, enable=True):
    """Recompute each decoder layer of the language model in the backward instead of keeping its
    activations (torch.utils.checkpoint, non-reentrant): a layer then keeps only its input for the
    backward. transformers' own gradient_checkpointing_enable checkpoints only in training mode,
    and SEED keeps the model in eval mode (no dropout: the teacher and the student differ by the
    adapter alone), so the wrap is ours, on each layer's forward; the recomputation is that very
    forward, adapter included, so the gradients are the ones without it. Passes without gradient
    (the teacher's, decoding) run the layer as it is. enable=False takes the wrap off."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def checkpointed(layer, forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(layer, *args, **kwargs)
        return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)

    for layer in adapter.language_model(transformers_model(model)).layers:
        if enable:
            layer.forward = functools.partial(checkpointed, layer, type(layer).forward)
        else:
            layer.__dict__.pop("forward", None)


# ---------------------------------------------------------------------------------------------
# PEFT

def transformers_model(model):
    """The transformers model under a PEFT wrapper (its `.model` is the whole model, not the
    decoder stack response_logits runs); PEFT's LoRA layers stay in place."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def teacher_mode(model):
    """The context in which `model` is the teacher, its adapter off (METHOD.md 4): PEFT's own
    disable_adapter() for a peft.PeftModel, else adapter.adapter_disabled."""
    if hasattr(model, "get_base_model") and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return adapter.adapter_disabled(model)
