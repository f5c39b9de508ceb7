"""Fitting one GPU: the micro-batch of a SEED step and the decoding batches, tried before any work.

Paper: SEED (arXiv 2507.04680) trains LLaVA-1.5 on GPUs; how a step fits one is ours. A SEED step
keeps about 170 KB per token per decoder layer for its backward at LLaVA-1.5-7B's widths, the
adapter on every linear layer (`python bench.py --shape llava-7b --memory`; docs/REAL_RUN.md turns
the figures into peaks), so 32 rows of 631 tokens need about 120 GiB: more than an 80 GB GPU.
Before the first long phase train.py makes one full training step (forward and backward, no
optimiser step) at the longest batch the run can produce, and one decoding pass of each decoding
batch, so that an out-of-memory shows in the first minute with the flags that cure it, not after
hours of example making:
- `micro_batch(...)`: the largest micro-batch (halving from the batch) whose step fits, or the one
  asked for, checked;
- `check_decoding(...)`: a prefill and a step of purified (two-pass) decoding at the longest prompt.
On the CPU nothing is tried (no out-of-memory error to catch, and the toy model is tiny).
"""
import torch

import adapter
import decode
import models

# the share of the GPU's memory a step may peak at: the rest is left to fragmentation and to what
# grows later (the optimiser's moments, the allocator's caches)
HEADROOM = 0.9
# kept tokens a position of the synthetic recorded teacher (the toy world's sets hold 1-11)
TEACHER_WIDTH = 64


class DoesNotFit(Exception):
    """An out-of-memory found before the work, with the one line that says what to change."""


def device_of(model):
    return next(model.parameters()).device


def out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def longest_image(images):
    """The image among `images` (paths or PIL images) that the processor turns into the most image
    tokens, as far as their sizes tell: the largest and the most elongated of them (InternVL's
    tiles follow the aspect ratio, Qwen2-VL's patches the area; LLaVA's 576 tokens neither). Only
    the files' headers are read."""
    from PIL import Image

    def size(image):
        if isinstance(image, str):
            with Image.open(image) as opened:
                return opened.size
        return image.size

    sizes = [size(image) for image in images]
    picks = {max(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1]),
             max(range(len(sizes)), key=lambda i: sizes[i][0] / sizes[i][1]),
             max(range(len(sizes)), key=lambda i: sizes[i][1] / sizes[i][0])}
    return [images[i] for i in sorted(picks)]


def longest_prompt(processor, images, prompts):
    """(image, text, tokens) of the longest prompt the run can make: the candidate image
    (longest_image) and the prompt whose processed prompt has the most tokens."""
    candidates = [(image, text) for image in longest_image(images) for text in prompts]
    lengths = [models.prompt_batch(processor, [image], [text])["input_ids"].shape[1]
               for image, text in candidates]
    longest = max(range(len(candidates)), key=lengths.__getitem__)
    return (*candidates[longest], lengths[longest])


def longest_batch(model, processor, prompt, rows, response_tokens):
    """A training batch of `rows` copies of the longest row the run can make: `prompt`, the
    (image, text, tokens) of longest_prompt, `response_tokens` response tokens, and a recorded
    teacher of TEACHER_WIDTH kept tokens at every response position."""
    import seed

    image, text, _ = prompt
    filler = next(i for i in range(len(processor.tokenizer)) if i not in
                  set(models.placeholder_token_ids(model, processor)) | {
                      processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id})
    example = {"image": 0, "prompt": text, "response": [filler] * response_tokens}
    batch = seed.collate([example] * rows, processor, [image])
    n = int(batch["response_mask"][:, 1:].sum())
    vocab = model.get_output_embeddings().weight.shape[0]
    batch["teacher_ids"] = torch.arange(TEACHER_WIDTH).remainder(vocab).repeat(n, 1)
    batch["teacher_logits"] = torch.zeros(n, TEACHER_WIDTH)
    return batch


def training_step_peak(model, batch, step_loss):
    """Peak GPU bytes of one forward and backward of `batch` (no optimiser step; the gradients are
    dropped after), from an empty peak counter."""
    device = device_of(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        loss = step_loss({k: v.to(device) for k, v in batch.items()})
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    finally:
        for parameter in model.parameters():
            parameter.grad = None


def find_fit(try_rows, rows, limit):
    """The largest of rows, rows / 2, ..., 1 for which try_rows(n) (peak bytes, or an out-of-memory
    error) stays within `limit`, or None; a float division of rows that is not a power of two ends
    at 1 all the same. Returns (rows that fit or None, {rows tried: peak bytes or None})."""
    tried = {}
    n = rows
    while n >= 1:
        try:
            tried[n] = try_rows(n)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            tried[n] = None
        if tried[n] is not None and tried[n] <= limit:
            return n, tried
        n = n // 2 if n > 1 else 0
    return None, tried


def micro_batch(model, processor, images, prompts, config, step_loss, say=print):
    """The micro-batch size the run trains with: config.micro_batch_size, checked, or with 0 the
    largest that fits (halving from this process's rows of the batch), found by full training
    steps on longest_batch; the CPU takes the whole batch unchecked. Raises DoesNotFit with the
    flags that would make it fit. The model's adapter, if any, is left as it was; a temporary one
    is attached for the try and removed."""
    import distributed

    rows = -(-config.batch_size // distributed.world_size())
    device = device_of(model)
    if device.type != "cuda":
        return config.micro_batch_size or rows
    asked = config.micro_batch_size
    total = torch.cuda.get_device_properties(device).total_memory
    prompt = longest_prompt(processor, images, prompts)  # found once, for every try
    response_tokens = config.description_tokens + 1
    length = longest_batch(model, processor, prompt, 1, response_tokens)["input_ids"].shape[1]
    attached = not adapter.adapter_layers(model)
    if attached:
        adapter.add_adapter(model, rank=config.rank, alpha_r=config.alpha_r,
                            targets=adapter.parse_targets(config.adapter_targets))
    try:
        def try_rows(n):
            return training_step_peak(model, longest_batch(model, processor, prompt, n,
                                                           response_tokens), step_loss)

        fit, tried = find_fit(try_rows, asked or rows, HEADROOM * total)
    finally:
        if attached:
            adapter.remove_adapter(model)
    if fit is not None and (not asked or fit == asked):
        peak = tried[fit]
        say(f"memory: a training step of {fit} rows of {length} tokens peaks at "
            f"{peak / 2**30:.1f} of {total / 2**30:.0f} GiB" + (
                "" if asked else f" (--micro-batch-size {fit}, the largest that fits)"))
        return fit
    cure = "" if config.gradient_checkpointing else " or --gradient-checkpointing"
    if fit is not None:
        raise DoesNotFit(f"--micro-batch-size {asked}: a training step of {asked} rows of {length} "
                         f"tokens does not fit this GPU ({total / 2**30:.0f} GiB); "
                         f"--micro-batch-size {fit} fits{cure}")
    raise DoesNotFit(f"a training step of one row of {length} tokens does not fit this GPU "
                     f"({total / 2**30:.0f} GiB) at --micro-batch-size 1" + (
                         ": add --gradient-checkpointing" if cure else
                         ", even with --gradient-checkpointing: a larger GPU, or several "
                         "(torchrun) do not help a single row"))


def check_decoding(model, processor, images, prompts, new_tokens, batch_size, flag, say=print):
    """One purified (two-pass) decoding pass of `batch_size` copies of the longest prompt, its text
    lengthened by `new_tokens` words, so that the KV cache is as long as the longest answer's:
    raises DoesNotFit naming `flag` and the largest batch that fits. The CPU is not tried."""
    device = device_of(model)
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    image = longest_image(images)[0]
    text = max(prompts, key=len) + " and" * new_tokens

    def try_rows(n):
        inputs = models.prompt_batch(processor, [image] * n, [text] * n, device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            decode.generate(model, inputs, max_new_tokens=2, contrast=True)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    fit, tried = find_fit(try_rows, batch_size, HEADROOM * total)
    if fit == batch_size:
        say(f"memory: decoding {batch_size} rows ({flag}) peaks at {tried[fit] / 2**30:.1f} of "
            f"{total / 2**30:.0f} GiB")
        return
    raise DoesNotFit(f"{flag} {batch_size}: a decoding pass of {batch_size} rows does not fit this "
                     f"GPU ({total / 2**30:.0f} GiB); " + (f"{flag} {fit} fits" if fit else
                                                           "not even one row fits"))


def fit(model, processor, images, object_names, description, config, step_loss, say=print):
    """Before any long phase: the micro-batch the run trains with (micro_batch), and whether its
    decoding batch fits (check_decoding: SEED's purified examples and POPE's answers, at the longest
    of their prompts and answers). Returns the micro-batch size; raises DoesNotFit."""
    import seed

    prompts = [description, seed.probe_text(max(object_names, key=len))]
    if device_of(model).type == "cuda":  # (the CPU tries nothing)
        # the few images that could make the longest prompt, every file's header read once for
        # all the tries below (longest_image of them picks the same ones again)
        images = longest_image(images)
    micro = micro_batch(model, processor, images, prompts, config, step_loss, say)
    check_decoding(model, processor, images, prompts, max(config.description_tokens, 4),
                   config.eval_batch_size, "--eval-batch-size", say)
    if getattr(config, "chair_images", None):  # CHAIR's long descriptions
        import eval_chair

        check_decoding(model, processor, images, [eval_chair.PROMPT], config.chair_tokens,
                       config.chair_batch_size, "--chair-batch-size", say)
    return micro
