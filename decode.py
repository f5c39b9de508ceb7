"""Decoding for LLaVA / InternVL checkpoints: greedy, sampled and contrastive (VCD), with the KV cache.

Paper: SEED (arXiv 2507.04680) builds its data by *purified* decoding, the contrast of METHOD.md 2
applied at every generated token; VCD (Leng et al., CVPR 2024) decodes the same way at inference.
Both SEED's example making (seed.py) and POPE's answering (eval_pope.py) decode through this file,
so each can be copied without the other.

Ours: one generator per question for the distortion and the sampling noise (answers never depend
on the batch), image placeholders suppressed, prompts through the processor's own chat template.
"""
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


def distort_per_question(pixel_values, input_ids, image_token_id, noise_step, generators):
    """Each question's images (all of its tiles) distorted with that question's own generator.

    InternVL cuts an image into 1..12 tiles, so pixel_values has one row per tile, not per question;
    a question's share of the rows follows its share of the image placeholders. Noise drawn per
    question keeps each answer independent of the batch it was answered in.
    """
    placeholders = (input_ids == image_token_id).sum(-1).tolist()  # per question
    per_tile = sum(placeholders) // pixel_values.shape[0]  # placeholders per tile (LLaVA: one tile per image)
    if per_tile == 0 or per_tile * pixel_values.shape[0] != sum(placeholders):
        raise ValueError(f"{sum(placeholders)} image placeholders do not split evenly over {pixel_values.shape[0]} "
                         f"image tiles")
    tiles = torch.split(pixel_values, [n // per_tile for n in placeholders])
    return torch.cat([purge.distort(t, noise_step, g) for t, g in zip(tiles, generators)])


@torch.no_grad()
def generate(model, inputs, max_new_tokens=8, sample=False, contrast=False, generators=None,
             temperature=1.0, top_p=1.0, alpha=purge.ALPHA, beta=purge.BETA, noise_step=purge.NOISE_STEP,
             eos_token_id=None, suppress_token_ids=()):
    """Decode a left-padded batch from the processor; returns a list of generated token-id lists.

    contrast=True is VCD decoding: a second pass on the distorted image at every token, and the
    next token is chosen from purge.purify(clean, distorted) instead of the clean logits.
    The image placeholders (placeholder_token_ids(model), plus suppress_token_ids) are never emitted.
    """
    batch = inputs["input_ids"].shape[0]
    if (sample or contrast) and generators is None:
        generators = [seeded_generator(0, i) for i in range(batch)]
    attention_mask = inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    pixel_values = inputs["pixel_values"].to(model.dtype)
    streams = [pixel_values]
    if contrast:
        # the image placeholder itself, as seed.response_logits reads it (not the first of the sorted
        # placeholder ids, which could be a video token's)
        streams.append(distort_per_question(pixel_values, inputs["input_ids"],
                                            image_token_id=model.config.image_token_id, noise_step=noise_step,
                                            generators=generators))
    suppressed = torch.tensor(placeholder_token_ids(model) + list(suppress_token_ids), dtype=torch.long,
                              device=attention_mask.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = [model(input_ids=inputs["input_ids"], attention_mask=attention_mask, position_ids=position_ids,
                     pixel_values=pixels, use_cache=True, **extra) for pixels in streams]
    finished = torch.zeros(batch, dtype=torch.bool, device=attention_mask.device)
    tokens = []
    for _ in range(max_new_tokens):
        # Suppressed on the clean logits, before the plausibility cut, so the cut is taken among the
        # tokens that may be emitted (-inf minus a finite distorted logit stays -inf).
        logits = outputs[0].logits[:, -1].float().index_fill(-1, suppressed, float("-inf"))
        if contrast:
            logits = purge.purify(logits, outputs[1].logits[:, -1], alpha, beta)
        next_token = _sample_next(logits, generators, temperature, top_p) if sample else logits.argmax(-1)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens.append(next_token)
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        outputs = [model(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                         cache=out.cache, use_cache=True) for out in outputs]
    generated = torch.stack(tokens, dim=1).tolist()
    if eos_token_id is not None:  # cut each row at its first end-of-sequence token
        generated = [row[:row.index(eos_token_id)] if eos_token_id in row else row for row in generated]
    return generated


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


def load_model(path, device="cpu", dtype=None):
    """Any local image-text-to-text checkpoint in transformers form, with its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    return model, processor
