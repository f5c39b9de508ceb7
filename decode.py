"""Decoding for LLaVA / InternVL / Qwen2-VL checkpoints: greedy, sampled and contrastive (VCD), with the KV cache.

Paper: SEED (arXiv 2507.04680) builds its data by *purified* decoding, the contrast of METHOD.md 2
applied at every generated token; VCD (Leng et al., CVPR 2024) decodes the same way at inference.
Both SEED's example making (seed.py) and POPE's answering (eval_pope.py) decode through this file,
so each can be copied without the other.

Ours: one generator per question for the distortion and the sampling noise (answers never depend
on the batch), image placeholders suppressed, prompts through the processor's own chat template.
What differs between the families lives in one function each: `distort_images` (how a family lays
out its pixels), `pixel_rows_per_question` (tiles, patches) and `position_ids` (Qwen2-VL's M-RoPE).
"""
import json
import os

import torch

import purge


def seeded_generator(seed, item):
    """The CPU generator of one item (a question, an example, a step) under a run's seed.

    Every noise draw of the project comes from one of these, one per item, so a result never depends
    on the batch an item shared or on where a resumed run restarted.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + item)


def _sample_next(logits, generators, temperature, top_p):
    """One token per row: Gumbel-max with each row's own generator, after the top-p filter."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # argmax(logits + Gumbel) is a draw from softmax(logits); per-row noise keeps rows independent
    # of the batch they happen to share.
    uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
    return (logits + gumbel).argmax(-1)


def placeholder_token_ids(model=None, processor=None):
    """Ids of the tokens that stand for an image or video (and the markers a processor writes around
    them), from the model's config and the processor: never a valid token of an answer, since the
    next pass would read it as a placeholder."""
    ids = set()
    if model is not None:
        ids |= {getattr(model.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")}
    if processor is not None:
        ids |= set(processor.image_token_ids) | set(processor.video_token_ids)
    return sorted(i for i in ids if i is not None)


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
    """Each question's images (all of its tiles or patches) distorted with that question's own generator.

    pixel_values has rows per tile (InternVL cuts an image into 1..12), per image (LLaVA) or per
    patch (Qwen2-VL), not per question; a question's share of the rows follows its share of the
    image placeholders. Noise drawn per question keeps each answer independent of the batch it was
    answered in.
    """
    parts = torch.split(pixel_values, pixel_rows_per_question(model, pixel_values, input_ids))
    return torch.cat([distort_images(model, part, noise_step, g) for part, g in zip(parts, generators)])


def pixel_rows_per_question(model, pixel_values, input_ids):
    """How many rows of pixel_values belong to each question (row of input_ids): its share of the
    image placeholders. One per question for LLaVA, its tiles for InternVL, its patches for Qwen2-VL."""
    placeholders = (input_ids == model.config.image_token_id).sum(-1).tolist()
    rows, total = pixel_values.shape[0], sum(placeholders)
    shares = [n * rows // total if total else 0 for n in placeholders]
    if total == 0 or sum(shares) != rows or any(n * rows % total for n in placeholders):
        raise ValueError(f"{total} image placeholders do not split evenly over {rows} rows of pixel values")
    return shares


def position_ids(model, input_ids, attention_mask, image_grid_thw=None):
    """The positions of a padded batch, as the model's family reads them.

    Most families: 1-D positions counted over the attended tokens (left padding does not shift
    them). Qwen2-VL / Qwen2.5-VL (M-RoPE): image tokens have (time, height, width) positions from the
    image grid and the text after an image continues from their maximum; the model's own
    get_rope_index computes them, and they are stacked under the 1-D positions as the model's
    generate does: (4, batch, length), row 0 for the attention mask, rows 1-3 for the rotary embedding.
    Passing such positions explicitly is what keeps the decoding loop right: without them the
    model would infer positions from state it keeps between calls (rope_deltas).
    """
    text = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = getattr(model, "model", None)
    if image_grid_thw is None or not hasattr(inner, "get_rope_index"):
        return text
    token_types = (input_ids == model.config.image_token_id).long()  # 1 on image tokens, 0 on text
    mrope, _ = inner.get_rope_index(input_ids, mm_token_type_ids=token_types, image_grid_thw=image_grid_thw,
                                    attention_mask=attention_mask)
    return torch.cat([text[None], mrope.to(text.device)], dim=0)


def unsupported_batch(inputs):
    """Why the decoding loop below would decode `inputs` wrongly, or None: it takes left-padded batches
    of image prompts (a new token's position is the last one, the contrast distorts images)."""
    if "pixel_values_videos" in inputs or "video_grid_thw" in inputs:
        return "video inputs are not supported (their temporal positions are not computed here); images only"
    if "pixel_values" not in inputs:
        return "a text-only batch (no pixel_values): every prompt needs its image"
    if not bool(inputs["attention_mask"][:, -1].all()):
        return "a right-padded batch: pad on the left (padding_side='left', as prompt_batch does)"
    return None


@torch.no_grad()
def generate(model, inputs, max_new_tokens=8, sample=False, contrast=False, generators=None,
             temperature=1.0, top_p=1.0, alpha=purge.ALPHA, beta=purge.BETA, noise_step=purge.NOISE_STEP,
             eos_token_id=None, suppress_token_ids=(), record=False):
    """Decode a left-padded batch from the processor; returns a list of generated token-id lists.

    contrast=True is VCD decoding: a second pass on the distorted image at every token, and the
    next token is chosen from purge.purify(clean, distorted) instead of the clean logits.
    The image placeholders (placeholder_token_ids(model), plus suppress_token_ids) are never emitted.
    record=True also returns, per row, the distribution each token was chosen from, exactly sparse
    under the contrast: [(kept token ids, their purified logits)] at every position of the row's
    answer plus its end token (the end token appended where decoding stopped at the length limit
    too, one more pass computing what follows the last token): (generated, recorded).
    """
    refused = unsupported_batch(inputs)
    if refused:
        raise ValueError(f"decode.generate: {refused}")
    batch = inputs["input_ids"].shape[0]
    if (sample or contrast) and generators is None:
        generators = [seeded_generator(0, i) for i in range(batch)]
    attention_mask = inputs["attention_mask"]
    # image_sizes (LLaVA-NeXT), image_grid_thw (Qwen2-VL); Qwen's token types are rebuilt by position_ids
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values",
                                                           "mm_token_type_ids")}
    pixel_values = inputs["pixel_values"].to(model.dtype)
    streams = [pixel_values]
    if contrast:
        streams.append(distort_per_question(model, pixel_values, inputs["input_ids"], noise_step=noise_step,
                                            generators=generators))
    suppressed = torch.tensor(placeholder_token_ids(model) + list(suppress_token_ids), dtype=torch.long,
                              device=attention_mask.device)
    positions = position_ids(model, inputs["input_ids"], attention_mask, inputs.get("image_grid_thw"))
    outputs = [model(input_ids=inputs["input_ids"], attention_mask=attention_mask, position_ids=positions,
                     pixel_values=pixels, use_cache=True, **extra) for pixels in streams]
    finished = torch.zeros(batch, dtype=torch.bool, device=attention_mask.device)
    tokens, recorded = [], [[] for _ in range(batch)]
    for step in range(max_new_tokens + record):
        # Suppressed on the clean logits, before the plausibility cut, so the cut is taken among the
        # tokens that may be emitted (-inf minus a finite distorted logit stays -inf).
        logits = outputs[0].logits[:, -1].float().index_fill(-1, suppressed, float("-inf"))
        if contrast:
            logits = purge.purify(logits, outputs[1].logits[:, -1], alpha, beta)
        if record:  # the kept tokens of each row still answering (the voids are everything else)
            rows, ids = torch.isfinite(logits).nonzero(as_tuple=True)  # row-major: each row's ids in a run
            counts = torch.bincount(rows, minlength=batch).tolist()
            done = finished.tolist()
            kept_ids, kept_logits = ids.cpu().split(counts), logits[rows, ids].cpu().split(counts)
            for row in range(batch):
                if not done[row]:
                    recorded[row].append((kept_ids[row], kept_logits[row]))
            if step == max_new_tokens:  # only what follows the last token, at the end token appended
                break
        next_token = _sample_next(logits, generators, temperature, top_p) if sample else logits.argmax(-1)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens.append(next_token)
        if bool(finished.all()) or (step == max_new_tokens - 1 and not record):  # no pass whose logits go unread
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        positions = positions[..., -1:] + 1  # every row of M-RoPE's too: text after the image advances all three
        outputs = [model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=positions,
                         cache=out.cache, use_cache=True) for out in outputs]
    generated = torch.stack(tokens, dim=1).tolist()
    if eos_token_id is not None:  # cut each row at its first end-of-sequence token
        generated = [row[:row.index(eos_token_id)] if eos_token_id in row else row for row in generated]
    return (generated, recorded) if record else generated


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
    except (OSError, ValueError) as error:
        raise ValueError(f"{image}: cannot read the image ({error})") from None


def chat_prompt(processor, text):
    """The processor's own chat template around one image and one question: the real models' path."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def prompt_batch(processor, images, texts, device="cpu"):
    """One image (a path or a PIL image) + one question per row, through the chat template, left-padded
    for generation."""
    images = [open_image(image) for image in images]
    prompts = [chat_prompt(processor, text) for text in texts]
    # Left padding, since generation appends on the right; set for this call, the tokenizer is left as it was.
    return processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left").to(device)


def load_processor(path):
    """The folder's own processor, for images: AutoProcessor's, or, where the processor class also
    takes a video processor (InternVL's, Qwen2-VL's), which needs torchvision, and torchvision is not
    installed, the same class built from the image processor, the tokenizer, the chat template and
    the processor settings alone. The image path never reads the video processor, so nothing is lost."""
    import transformers
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available

    settings, _ = ProcessorMixin.get_processor_dict(path)
    name = settings.get("processor_class")
    if name is None and os.path.isfile(os.path.join(path, "preprocessor_config.json")):  # Qwen2.5-VL's place
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            name = json.load(f).get("processor_class")
    full = getattr(transformers, name or "", None)
    if full is None or is_torchvision_available() or "video_processor" not in full.get_attributes():
        return AutoProcessor.from_pretrained(path)
    # ProcessorMixin loads and checks exactly the attributes get_attributes lists: leave the video one out
    attributes = [a for a in full.get_attributes() if a != "video_processor"]
    images_only = type(name, (full,), {"get_attributes": classmethod(lambda cls: attributes)})
    return images_only.from_pretrained(path)


def load_model(path, device="cpu", dtype=None):
    """Any local image-text-to-text checkpoint in transformers form, with its processor (load_processor)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path)
    if not hasattr(processor, "image_processor"):  # AutoProcessor falls back to the tokenizer alone
        raise ValueError(f"{path}: AutoProcessor gave a {type(processor).__name__}, not an image-text processor: the "
                         f"folder's processor could not be built (no preprocessor_config.json?)")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    return model, processor
