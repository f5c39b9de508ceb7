"""Decoding for LLaVA / InternVL / Qwen2-VL checkpoints: greedy, sampled and contrastive (VCD), with
the KV cache.

Paper: SEED (arXiv 2507.04680) builds its data by *purified* decoding, the contrast of METHOD.md 2
applied at every generated token; VCD (Leng et al., CVPR 2024) decodes the same way at inference.
Both SEED's example making (seed.py) and POPE's answering (eval_pope.py) decode through this file,
so each can be copied without the other.

Ours: one generator per question for the distortion and the sampling noise (answers never depend
on the batch), image placeholders suppressed. What differs between the families (where the pixels
are, the positions, the placeholders) is models.py's, called by name.
"""
import torch

import models
import purge


def seeded_generator(seed, item):
    """The CPU generator of one item (a question, an example, a step): every noise draw is one of
    these, so no result depends on the batch or on where a resumed run restarted."""
    return torch.Generator().manual_seed(seed * 1_000_003 + item)


def _sample_next(logits, generators, temperature, top_p):
    """One token per row: Gumbel-max with each row's own generator, after the top-p filter."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest set reaching top_p
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # argmax(logits + Gumbel) is a draw from softmax(logits); per-row noise keeps rows independent
    # of the batch they happen to share.
    uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators])
    uniform = uniform.to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
    return (logits + gumbel).argmax(-1)


def unsupported_batch(inputs):
    """Why the decoding loop below would decode `inputs` wrongly, or None: it takes left-padded
    batches of image prompts (a new token is at the last position; the contrast needs images)."""
    if "pixel_values_videos" in inputs or "video_grid_thw" in inputs:
        return ("video inputs are not supported (their temporal positions are not computed here); "
                "images only")
    if "pixel_values" not in inputs:
        return "a text-only batch (no pixel_values): every prompt needs its image"
    if not bool(inputs["attention_mask"][:, -1].all()):
        return "a right-padded batch: pad on the left (padding_side='left', as prompt_batch does)"
    return None


def _record_kept(logits, finished, recorded):
    """Append to recorded[row] the kept tokens of each row still answering, (ids, purified logits):
    the voids are everything else."""
    rows, ids = torch.isfinite(logits).nonzero(as_tuple=True)  # row-major: each row's ids in a run
    counts = torch.bincount(rows, minlength=logits.shape[0]).tolist()
    kept_ids, kept_logits = ids.cpu().split(counts), logits[rows, ids].cpu().split(counts)
    for row, done in enumerate(finished.tolist()):
        if not done:
            recorded[row].append((kept_ids[row], kept_logits[row]))


@torch.no_grad()
def generate(model, inputs, max_new_tokens=8, sample=False, contrast=False, generators=None,
             temperature=1.0, top_p=1.0, alpha=purge.ALPHA, beta=purge.BETA,
             noise_step=purge.NOISE_STEP, eos_token_id=None, suppress_token_ids=(), record=False):
    """Decode a left-padded batch from the processor; returns a list of generated token-id lists.

    contrast=True is VCD decoding: a second pass on the distorted image at every token, and the next
    token is chosen from purge.purify(clean, distorted) instead of the clean logits. The image
    placeholders (models.placeholder_token_ids(model), plus suppress_token_ids) are never emitted.
    record=True also returns, per row, the distribution each token was chosen from, exactly sparse
    under the contrast: [(kept token ids, their purified logits)] at every position of the answer
    and of its end token (appended at the length limit too): (generated, recorded).
    """
    refused = unsupported_batch(inputs)
    if refused:
        raise ValueError(f"decode.generate: {refused}")
    batch = inputs["input_ids"].shape[0]
    if (sample or contrast) and generators is None:
        generators = [seeded_generator(0, i) for i in range(batch)]
    attention_mask = inputs["attention_mask"]
    # image_sizes (LLaVA-NeXT), image_grid_thw (Qwen2-VL); Qwen's token types: position_ids's
    extra = {k: v for k, v in inputs.items()
             if k not in ("input_ids", "attention_mask", "pixel_values", "mm_token_type_ids")}
    streams = [inputs["pixel_values"].to(model.dtype)]  # clean, and distorted under the contrast
    if contrast:
        streams.append(models.distort_per_question(model, streams[0], inputs["input_ids"],
                                                   noise_step=noise_step, generators=generators))
    suppressed = torch.tensor(models.placeholder_token_ids(model) + list(suppress_token_ids),
                              dtype=torch.long, device=attention_mask.device)
    positions = models.position_ids(model, inputs["input_ids"], attention_mask,
                                    inputs.get("image_grid_thw"))
    # logits at the last position only: the one the loop reads (not [batch, length, vocabulary],
    # several GB at InternVL's tiles and Qwen2's 151k-token vocabulary)
    outputs = [model(input_ids=inputs["input_ids"], attention_mask=attention_mask,
                     position_ids=positions, pixel_values=pixels, use_cache=True,
                     logits_to_keep=1, **extra)
               for pixels in streams]
    finished = torch.zeros(batch, dtype=torch.bool, device=attention_mask.device)
    tokens, recorded = [], [[] for _ in range(batch)]
    for step in range(max_new_tokens + record):
        # Suppressed on the clean logits, before the plausibility cut, so the cut is taken among the
        # tokens that may be emitted (-inf minus a finite distorted logit stays -inf).
        logits = outputs[0].logits[:, -1].float().index_fill(-1, suppressed, float("-inf"))
        if contrast:
            logits = purge.purify(logits, outputs[1].logits[:, -1], alpha, beta)
        if record:
            _record_kept(logits, finished, recorded)
            if step == max_new_tokens:  # only what follows the last token, at the end token
                break
        next_token = (_sample_next(logits, generators, temperature, top_p) if sample
                      else logits.argmax(-1))
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens.append(next_token)
        if bool(finished.all()) or (step == max_new_tokens - 1 and not record):
            break  # no pass whose logits go unread
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
        positions = positions[..., -1:] + 1  # M-RoPE's three rows too: text advances all three
        outputs = [model(input_ids=next_token[:, None], attention_mask=attention_mask,
                         position_ids=positions, cache=out.cache, use_cache=True)
                   for out in outputs]
    generated = [_cut_at(row, eos_token_id) for row in torch.stack(tokens, dim=1).tolist()]
    return (generated, recorded) if record else generated


def _cut_at(row, end_token_id):
    """A row of token ids up to its first end token (all of it without one, or when it is None)."""
    return row[:row.index(end_token_id)] if end_token_id in row else row


