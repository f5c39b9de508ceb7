"""Self-Evolving Distillation: the SEED step and rounds of self-evolution.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680. Formulas: METHOD.md sections 3 (the loss) and 5 (rounds).

One round: freeze the model, let it answer unlabeled images with *purified* greedy decoding
(purge.purify at every token: no annotation is ever read), attach a fresh zero-initialised
adapter, and distil the purified distribution back into the model with the reverse KL
(Mode-Seeking Evolving). The teacher is the same weights with the adapter switched off.
Merge the adapter; the merged model is the next round's teacher. This file holds the step and its
label-free data (the examples, the probes, collating, the training batch, the held-out split); it
reads no file and knows no process. What differs between model families is models.py's; logging,
checkpoints and resume are runs.py's; train.py's `self_evolve` is the loop that uses them.

Not from the paper (ours): the probe and description prompts, the optimiser and step counts,
the reverse KL's void floor while training (1e-4, `train.py --void-eps`), and three economies that
do not change the result: logits are computed at response positions only (never a [batch, length,
vocabulary] float32 copy), the clean vision features are computed once per image and shared by the
teacher's clean pass and the student's pass (the adapter lives in the language model, so they are
identical), and the teacher's logits are freed before the student's backward.
"""
import random
import re

import torch

import decode
import losses
import models
import purge

# ---------------------------------------------------------------------------------------------
# Passes that share the vision features


def response_logits(model, input_ids, attention_mask, positions, features, response_mask):
    """Logits only at the positions that predict a response token: (n_response_tokens, vocab).

    The image placeholders are filled with precomputed `features`, so the vision tower is not rerun.
    positions: the family's own, from models.position_ids (1-D, or Qwen2-VL's M-RoPE from the image
    grid), computed once by the caller for all the passes over the same batch.
    """
    embeddings = model.get_input_embeddings()(input_ids)
    placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeddings = embeddings.masked_scatter(placeholders, features.to(embeddings.dtype))
    # no KV cache: nothing decodes after this pass, and a cache would outlive every layer
    hidden = model.model(inputs_embeds=embeddings, attention_mask=attention_mask,
                         position_ids=positions, use_cache=False).last_hidden_state  # (B, L, H)
    predicts_response = response_mask[:, 1:]  # position t predicts token t + 1
    return model.get_output_embeddings()(hidden[:, :-1][predicts_response])  # (N, V)


def seed_step(model, batch, divergence="reverse", alpha=purge.ALPHA, beta=purge.BETA,
              noise_step=purge.NOISE_STEP, generator=None, void_eps=1e-8):
    """One SEED step: the teacher (adapter off, no grad) on clean and distorted images, purify, the
    student, the KL.

    model: a transformers LVLM with this project's adapter (adapter.add_adapter) or wrapped by
    peft.get_peft_model; the teacher is the same model with its adapter off. divergence: "reverse"
    (SEED's mode-seeking KL) or "forward" (classic distillation). void_eps: the reverse KL's floor
    on void probabilities (losses.reverse_kl's eps; train.py trains at 1e-4). Returns (loss,
    purified teacher logits, student logits); call loss.backward() yourself.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    response_mask = batch["response_mask"]
    grid = batch.get("image_grid_thw")  # Qwen2-VL only
    net = models.transformers_model(model)
    # the same for all three passes
    positions = models.position_ids(net, input_ids, attention_mask, grid)
    with torch.no_grad():
        clean = models.image_features(net, batch["pixel_values"], grid)
        distorted_pixels = batch.get("distorted_pixel_values")  # drawn already: process_rows
        if distorted_pixels is None:
            distorted_pixels = models.distort_images(net, batch["pixel_values"], noise_step,
                                                     generator)
        distorted = models.image_features(net, distorted_pixels, grid)
        with models.teacher_mode(model):
            z = response_logits(net, input_ids, attention_mask, positions, clean, response_mask)
            z_distorted = response_logits(net, input_ids, attention_mask, positions, distorted,
                                          response_mask)
        teacher = purge.purify(z, z_distorted, alpha, beta)  # pt = softmax(teacher), voids at -inf
        del z, z_distorted, distorted, distorted_pixels
    student = response_logits(net, input_ids, attention_mask, positions, clean, response_mask)
    if divergence == "reverse":
        return losses.reverse_kl(student, teacher, eps=void_eps), teacher, student
    return losses.forward_kl(student, teacher), teacher, student


def recorded_seed_step(model, batch, divergence="reverse", void_eps=1e-8):
    """One SEED step against the purified teacher recorded while the examples were made
    (seed.collate puts it in the batch: teacher_ids, teacher_logits): the student's pass alone, no
    teacher pass and no distorted image. Within a round the teacher does not move, and purify's cut
    makes it exactly sparse, so this is the online seed_step's loss with each example's distortion
    fixed to the draw it was made with (METHOD.md 3).
    Returns (loss, (teacher_ids, teacher_logits), student logits)."""
    student = student_logits(model, batch)
    teacher = batch["teacher_ids"], batch["teacher_logits"]
    if divergence == "reverse":
        return losses.sparse_reverse_kl(student, *teacher, eps=void_eps), teacher, student
    return losses.sparse_forward_kl(student, *teacher), teacher, student


def student_logits(model, batch):
    """The student's logits at the response positions: the one pass of a recorded or plain step."""
    grid = batch.get("image_grid_thw")
    net = models.transformers_model(model)
    positions = models.position_ids(net, batch["input_ids"], batch["attention_mask"], grid)
    # the adapter lives in the language model: the vision features are the base's
    with torch.no_grad():
        clean = models.image_features(net, batch["pixel_values"], grid)
    return response_logits(net, batch["input_ids"], batch["attention_mask"], positions, clean,
                           batch["response_mask"])


def sft_step(model, batch):
    """Plain adapter fine-tuning on the same response tokens (bench.py's baseline)."""
    student = student_logits(model, batch)
    targets = batch["input_ids"][:, 1:][batch["response_mask"][:, 1:]]
    return torch.nn.functional.cross_entropy(student.float(), targets)


# ---------------------------------------------------------------------------------------------
# Label-free data: the model's own purified answers on unlabeled images

def probe_text(name):
    """A yes/no probe worded exactly as POPE asks (eval_pope.question_for + PROMPT_SUFFIX, tested
    equal), so SEED's data matches the evaluation's format."""
    article = "an" if name[0].lower() in "aeiou" else "a"
    return f"Is there {article} {name} in the image? Please answer this question with one word."


def mentions(text, object_names):
    """Every mention of an object name in a response (whole words, plural 's' allowed), one entry
    per occurrence, in the order of object_names: what CHAIR counts (Rohrbach et al., 2018)."""
    text = text.lower()
    return [n for n in object_names for _ in re.finditer(rf"\b{re.escape(n.lower())}s?\b", text)]


def mentioned_objects(text, object_names):
    """Object names a response mentions, each once, in the order of object_names."""
    return list(dict.fromkeys(mentions(text, object_names)))


def purified_batch(model, processor, images, prompts, items, kind, max_new_tokens, noise_seed,
                   alpha, beta, noise_step, inputs=None):
    """The teacher's answers to one batch of prompts: greedy decoding on purify(clean, distorted) at
    every token (METHOD.md 1-2), no labels read.

    prompts: [(image index, text)]; items: each prompt's place in the whole list, which seeds its
    distortion (decode.seeded_generator(noise_seed, item)), so an answer never depends on its batch.
    inputs: the prompts already through the processor (prompt_inputs), e.g. made on another thread
    while the model decoded the batch before. Returns a record per prompt: {"kind", "image",
    "prompt", "response" (token ids, the end token left out), "teacher" (the purified distribution
    at every response position and at the end token's, encode_teacher), "noise" ([noise_seed,
    item])}.
    """
    device = next(model.parameters()).device
    inputs = (inputs or prompt_inputs(processor, images, prompts)).to(device)
    responses, teachers = decode.generate(
        model, inputs, max_new_tokens, contrast=True, alpha=alpha, beta=beta, noise_step=noise_step,
        generators=[decode.seeded_generator(noise_seed, item) for item in items], record=True,
        eos_token_id=processor.tokenizer.eos_token_id,
        suppress_token_ids=models.placeholder_token_ids(model, processor))
    return [{"kind": kind, "image": i, "prompt": text, "response": response,
             "teacher": encode_teacher(teacher), "noise": [noise_seed, item]}
            for (i, text), response, teacher, item in zip(prompts, responses, teachers, items)]


def prompt_inputs(processor, images, prompts):
    """A batch of prompts [(image index, text)] through the processor, on the CPU: the images read
    and preprocessed, each once (models.prompt_batch)."""
    return models.prompt_batch(processor, [images[i] for i, _ in prompts],
                               [text for _, text in prompts])


def in_batches(batch_size):
    """make_examples' default `answer`: every prompt decoded here, a batch at a time, nothing
    written (train.py's is runs.examples_log: a resumable log, its images prepared a batch ahead,
    split under torchrun)."""
    def answer(prompts, decode_batch, kind, prepare=None):
        records = []
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            records += decode_batch(prompts[start:stop], list(range(start, stop)), None)
        return records
    return answer


def encode_teacher(positions):
    """A purified teacher, [(kept token ids, their purified logits)] per response position, as a
    JSON-able record: the kept-token count of each position, and all ids (int32) and logits
    (float32) as base64 bytes. Lossless (every other token is a void); 11 bytes a kept token."""
    import base64

    ids = torch.cat([i for i, _ in positions]).to(torch.int32).numpy().tobytes()
    logits = torch.cat([v for _, v in positions]).to(torch.float32).numpy().tobytes()
    return {"counts": [len(i) for i, _ in positions], "ids": base64.b64encode(ids).decode(),
            "logits": base64.b64encode(logits).decode()}


def decode_teacher(record):
    """(counts, ids, logits) of an encode_teacher record: a list, and two flat 1-D tensors."""
    import base64

    ids = torch.frombuffer(bytearray(base64.b64decode(record["ids"])), dtype=torch.int32).long()
    logits = torch.frombuffer(bytearray(base64.b64decode(record["logits"])), dtype=torch.float32)
    return record["counts"], ids, logits


def choose_probes(named, object_names, probes_per_image, rng):
    """Objects to ask about on each image, from the model's own descriptions (`named[i]`: the names
    description i mentions); no label is read.

    Up to half the probes go to objects the description names (its hallucinations are among them).
    Of the rest, half go to the unnamed objects that co-occur most with the named ones across all
    the descriptions, as POPE draws its adversarial negatives from co-occurrence (that is where a
    language prior lives; a random unnamed object is mostly one the model already rejects), and the
    others to random unnamed objects.
    """
    together = {}  # (a, b) -> number of descriptions naming both
    for names in named:
        for a in names:
            for b in names:
                if a != b:
                    together[a, b] = together.get((a, b), 0) + 1
    chosen_by_image = []
    for names in named:
        unnamed = [n for n in object_names if n not in names]
        chosen = rng.sample(names, min(len(names), probes_per_image // 2))
        score = {n: sum(together.get((a, n), 0) for a in names) for n in unnamed}
        ranked = sorted(unnamed, key=lambda n: (-score[n], rng.random()))  # ties broken at random
        co_occurring = [n for n in ranked[:(probes_per_image - len(chosen)) // 2] if score[n] > 0]
        rest = [n for n in unnamed if n not in co_occurring]
        chosen += co_occurring
        chosen += rng.sample(rest, min(len(rest), probes_per_image - len(chosen)))
        chosen_by_image.append(chosen)
    return chosen_by_image


def example_settings(images, probes_per_image=6, description="Describe the image.",
                     max_new_tokens=24, random_seed=0, alpha=purge.ALPHA, beta=purge.BETA,
                     noise_step=purge.NOISE_STEP):
    """What make_examples' answers depend on, as an examples log records it ("made_with")."""
    return {"seed": random_seed, "alpha": alpha, "beta": beta, "noise_step": noise_step,
            "description": description, "probes_per_image": probes_per_image,
            "max_new_tokens": max_new_tokens, "images": len(images)}


def make_examples(model, processor, images, object_names, probes_per_image=6,
                  description="Describe the image.", batch_size=32, max_new_tokens=24,
                  random_seed=0, alpha=purge.ALPHA, beta=purge.BETA, noise_step=purge.NOISE_STEP,
                  answer=None):
    """Prompts on unlabeled images, answered by the model itself with purified greedy decoding.

    images: file paths or PIL images (read a batch at a time). Each image gets one description
    prompt and `probes_per_image` yes/no probes chosen by `choose_probes` from what the descriptions
    name. answer(prompts, decode_batch, kind, prepare) -> records: how the prompts get answered,
    decode_batch(chunk, items, inputs) (purified_batch on this model) doing the decoding, prepare
    (prompt_inputs) the processor's part, which may run ahead: in_batches(batch_size) by default,
    all here and nothing written; train.py passes runs.examples_log, which appends them to a log and
    resumes it. Returns [{"image": index, "prompt": text, "response": ids, "teacher": the purified
    distribution at each response position, as decoding chose from it (encode_teacher), "noise": its
    generator's seed}].
    """
    answer = answer or in_batches(batch_size)
    rng = random.Random(random_seed)
    eos = processor.tokenizer.eos_token_id

    def purified(prompts, kind, tokens, noise_seed):
        def decode_batch(chunk, items, inputs):
            return purified_batch(model, processor, images, chunk, items, kind, tokens, noise_seed,
                                  alpha, beta, noise_step, inputs)
        return answer(prompts, decode_batch, kind,
                      prepare=lambda chunk: prompt_inputs(processor, images, chunk))

    descriptions = purified([(index, description) for index in range(len(images))], "description",
                            max_new_tokens, random_seed)
    named = [mentioned_objects(processor.tokenizer.decode(r["response"], skip_special_tokens=True),
                               object_names)
             for r in descriptions]
    chosen_by_image = choose_probes(named, object_names, probes_per_image, rng)
    probes = [(index, probe_text(name)) for index, chosen in enumerate(chosen_by_image)
              for name in chosen]
    answers = purified(probes, "probe", 4, random_seed + 1)
    examples = [{"image": r["image"], "prompt": r["prompt"], "response": r["response"] + [eos],
                 "teacher": r["teacher"], "noise": r["noise"]} for r in descriptions + answers]
    # mixes descriptions and probes (and the held-out tail)
    random.Random(random_seed + 2).shuffle(examples)
    return examples


def collate(examples, processor, images):
    """Right-padded batch: input_ids, attention_mask, response_mask (True on response tokens),
    pixel_values, and the recorded teacher when every example has one. images: file paths or PIL
    images; only this batch's are read."""
    tokenizer = processor.tokenizer
    placeholders = set(models.placeholder_token_ids(processor=processor))
    for e in examples:
        if placeholders & set(e["response"]):
            raise ValueError(f"a response on image {e['image']} holds an image placeholder token "
                             f"{sorted(placeholders & set(e['response']))}: the processor would "
                             f"expand it, and the image features would not fit the placeholders "
                             f"({e['prompt']!r})")
    # this batch's images read now, each once however many examples ask about it
    prompts = models.processed_prompts(processor, [images[e["image"]] for e in examples],
                                       [e["prompt"] for e in examples], padding_side="right")
    prompt_lengths = prompts["attention_mask"].sum(-1).tolist()
    length = max(n + len(e["response"]) for n, e in zip(prompt_lengths, examples))
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    response_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, (n, e) in enumerate(zip(prompt_lengths, examples)):
        ids = prompts["input_ids"][i, :n].tolist() + e["response"]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        response_mask[i, n:len(ids)] = True
    # pixel_values, and image_grid_thw for Qwen2-VL; its token types would have the prompts' length
    # only (models.position_ids rebuilds them from input_ids)
    batch = {k: v for k, v in prompts.items()
             if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch.update(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)
    if all("teacher" in e for e in examples):
        batch.update(zip(("teacher_ids", "teacher_logits"), recorded_teacher(examples)))
    return batch


def recorded_teacher(examples):
    """The examples' recorded purified teachers as (teacher_ids, teacher_logits), (N, K) each: one
    row per response position, in the order response_logits returns them (example by example, token
    by token), padded to the widest kept set with -inf logits (losses.sparse_reverse_kl's input)."""
    positions = []
    for e in examples:
        counts, ids, logits = decode_teacher(e["teacher"])
        if len(counts) != len(e["response"]):
            raise ValueError(f"a recorded teacher of {len(counts)} positions for a response of "
                             f"{len(e['response'])} tokens (image {e['image']}, {e['prompt']!r})")
        positions += zip(ids.split(counts), logits.split(counts))
    width = max(len(i) for i, _ in positions)
    teacher_ids = torch.zeros(len(positions), width, dtype=torch.long)
    teacher_logits = torch.full((len(positions), width), float("-inf"))
    for row, (ids, logits) in enumerate(positions):
        teacher_ids[row, :len(ids)], teacher_logits[row, :len(ids)] = ids, logits
    return teacher_ids, teacher_logits


# ---------------------------------------------------------------------------------------------
# Pieces of a round (train.py's self_evolve runs the loop with them)

def hold_out(examples, batch_size):
    """(examples to train on, held-out examples): the held-out ones measure the student's void
    mass. Refuses when nothing would be left to train on."""
    count = max(batch_size, len(examples) // 20)
    if len(examples) <= count:
        raise ValueError(f"{len(examples)} SEED examples: {count} are held out to measure the void "
                         f"mass, which leaves none to train on; give more unlabeled images or a "
                         f"smaller batch size")
    return examples[:-count], examples[-count:]


def training_batch(examples, processor, images, batch_size, random_seed, round_index, step,
                   device="cpu"):
    """One step's batch, drawn from (random_seed, round, step) alone: a resumed run redraws it."""
    rng = random.Random(f"{random_seed}/{round_index}/{step}")
    batch = collate(rng.sample(examples, min(batch_size, len(examples))), processor, images)
    return {k: v.to(device) for k, v in batch.items()}


def step_generator(random_seed, round_index, step):
    """The distortion noise of one step, seeded like its batch."""
    return decode.seeded_generator(random_seed, round_index * 10_007 + step)


