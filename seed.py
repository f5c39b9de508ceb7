"""Self-Evolving Distillation: the SEED step and rounds of self-evolution.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680. Formulas: METHOD.md sections 3 (the loss) and 5 (rounds).

One round: freeze the model, let it answer unlabeled images with *purified* greedy decoding
(purge.purify at every token: no annotation is ever read), attach a fresh zero-initialised
adapter, and distil the purified distribution back into the model with the reverse KL
(Mode-Seeking Evolving). The teacher is the same weights with the adapter switched off.
Merge the adapter; the merged model is the next round's teacher. This file holds the pieces (the
step, the examples, batches, checkpoints); train.py's `self_evolve` is the loop that uses them.

Not from the paper (ours): the probe and description prompts, the optimiser and step counts,
the reverse KL's void floor while training (1e-4, `train.py --void-eps`), and three economies that
do not change the result: logits are computed at response positions only (never a [batch, length,
vocabulary] float32 copy), the clean vision features are computed once per image and shared by the
teacher's clean pass and the student's pass (the adapter lives in the language model, so they are
identical), and the teacher's logits are freed before the student's backward.
"""
import json
import os
import random
import re

import torch

import adapter
import decode
import distributed
import eval_pope
import losses
import purge

# ---------------------------------------------------------------------------------------------
# Passes that share the vision features

def image_features(model, pixel_values, image_grid_thw=None):
    """Projected vision features, one row per image token: (n_image_tokens_in_batch, hidden).

    image_grid_thw: Qwen2-VL's (time, height, width) patch grid per image, which its vision tower
    needs to read the flattened patches; None for LLaVA and InternVL.
    """
    grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    output = model.get_image_features(pixel_values=pixel_values, **grid)
    features = getattr(output, "pooler_output", output)
    if isinstance(features, (list, tuple)):  # LLaVA and Qwen2-VL return one tensor per image, InternVL one tensor
        features = torch.cat(list(features), dim=0)
    return features.reshape(-1, features.shape[-1])


def response_logits(model, input_ids, attention_mask, positions, features, response_mask):
    """Logits only at the positions that predict a response token: (n_response_tokens, vocab).

    The image placeholders are filled with precomputed `features`, so the vision tower is not rerun.
    positions: the family's own, from decode.position_ids (1-D, or Qwen2-VL's M-RoPE from the image
    grid), computed once by the caller for all the passes over the same batch.
    """
    embeddings = model.get_input_embeddings()(input_ids)
    placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeddings = embeddings.masked_scatter(placeholders, features.to(embeddings.dtype))
    hidden = model.model(inputs_embeds=embeddings, attention_mask=attention_mask,
                         position_ids=positions).last_hidden_state  # (B, L, H)
    predicts_response = response_mask[:, 1:]  # position t predicts token t + 1
    return model.get_output_embeddings()(hidden[:, :-1][predicts_response])  # (N, V)


def transformers_model(model):
    """The transformers model itself: under a PEFT wrapper (peft.PeftModel) its get_base_model().

    A PeftModel forwards attribute lookups to the model it wraps, but `.model` on it is the whole
    LlavaForConditionalGeneration, not the decoder stack `response_logits` runs; unwrapping once
    keeps every access below the same for both kinds of adapter (PEFT's LoRA layers stay in place).
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def teacher_mode(model):
    """The context in which `model` is the teacher, the base weights with the adapter off (METHOD.md 4):
    PEFT's own disable_adapter() for a peft.PeftModel, adapter.adapter_disabled for this project's."""
    if hasattr(model, "get_base_model") and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return adapter.adapter_disabled(model)


def seed_step(model, batch, divergence="reverse", alpha=purge.ALPHA, beta=purge.BETA, noise_step=purge.NOISE_STEP,
              generator=None, void_eps=1e-8):
    """One SEED step: teacher on clean and distorted images (adapter off, no grad), purify, student, KL.

    model: a transformers LVLM with this project's adapter (adapter.add_adapter) or wrapped by
    peft.get_peft_model; the teacher is the same model with its adapter off. divergence: "reverse"
    (SEED's mode-seeking KL) or "forward" (classic distillation). void_eps: the reverse KL's floor on
    void probabilities (losses.reverse_kl's eps; train.py trains at 1e-4).
    Returns (loss, purified teacher logits, student logits); call loss.backward() yourself.
    """
    input_ids, attention_mask, response_mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    grid = batch.get("image_grid_thw")  # Qwen2-VL only
    net = transformers_model(model)
    positions = decode.position_ids(net, input_ids, attention_mask, grid)  # the same for all three passes
    with torch.no_grad():
        clean = image_features(net, batch["pixel_values"], grid)
        noisy = batch.get("distorted_pixel_values")  # drawn beforehand when a batch is split (process_rows)
        if noisy is None:
            noisy = decode.distort_images(net, batch["pixel_values"], noise_step, generator)
        distorted = image_features(net, noisy, grid)
        with teacher_mode(model):
            z = response_logits(net, input_ids, attention_mask, positions, clean, response_mask)
            z_distorted = response_logits(net, input_ids, attention_mask, positions, distorted, response_mask)
        teacher = purge.purify(z, z_distorted, alpha, beta)  # pt = softmax(teacher), voids at -inf
        del z, z_distorted, distorted, noisy
    student = response_logits(net, input_ids, attention_mask, positions, clean, response_mask)
    if divergence == "reverse":
        return losses.reverse_kl(student, teacher, eps=void_eps), teacher, student
    return losses.forward_kl(student, teacher), teacher, student


def recorded_seed_step(model, batch, divergence="reverse", void_eps=1e-8):
    """One SEED step against the purified teacher recorded while the examples were made (seed.collate
    puts it in the batch: teacher_ids, teacher_logits): the student's pass alone, no teacher pass and
    no distorted image. Within a round the teacher does not move, and purify's cut makes it exactly
    sparse, so this is the online seed_step's loss with each example's distortion fixed to the draw it
    was made with (METHOD.md 3). Returns (loss, (teacher_ids, teacher_logits), student logits)."""
    student = student_logits(model, batch)
    teacher = batch["teacher_ids"], batch["teacher_logits"]
    if divergence == "reverse":
        return losses.sparse_reverse_kl(student, *teacher, eps=void_eps), teacher, student
    return losses.sparse_forward_kl(student, *teacher), teacher, student


def student_logits(model, batch):
    """The student's logits at the response positions, the one pass a recorded or plain step makes."""
    grid = batch.get("image_grid_thw")
    net = transformers_model(model)
    positions = decode.position_ids(net, batch["input_ids"], batch["attention_mask"], grid)
    with torch.no_grad():  # the adapter lives in the language model: the vision features are the base's
        clean = image_features(net, batch["pixel_values"], grid)
    return response_logits(net, batch["input_ids"], batch["attention_mask"], positions, clean, batch["response_mask"])


def sft_step(model, batch):
    """A plain adapter fine-tuning step on the same response tokens (the baseline bench.py compares to)."""
    student = student_logits(model, batch)
    targets = batch["input_ids"][:, 1:][batch["response_mask"][:, 1:]]
    return torch.nn.functional.cross_entropy(student.float(), targets)


# ---------------------------------------------------------------------------------------------
# Label-free data: the model's own purified answers on unlabeled images

def probe_text(name):
    """A yes/no probe worded exactly as POPE asks, so SEED's data matches the evaluation's format."""
    return eval_pope.question_for(name) + eval_pope.PROMPT_SUFFIX


def mentions(text, object_names):
    """Every mention of an object name in a response (whole words, plural 's' allowed), one entry per
    occurrence, in the order of object_names: what CHAIR counts (Rohrbach et al., 2018)."""
    text = text.lower()
    return [n for n in object_names for _ in re.finditer(rf"\b{re.escape(n.lower())}s?\b", text)]


def mentioned_objects(text, object_names):
    """Object names a response mentions, each once, in the order of object_names."""
    return list(dict.fromkeys(mentions(text, object_names)))


def purified_answers(model, processor, images, prompts, batch_size, max_new_tokens, seed, alpha, beta, noise_step,
                     progress, desc, kind="answer", done=(), path=None, made_with=None):
    """Greedy decoding on purify(clean, distorted) at every token: the teacher's answers, no labels read.

    prompts: [(image index, text)]. Returns a record per prompt: {"kind", "image", "prompt",
    "response" (token ids, the end token left out), "teacher" (the purified distribution at every
    response position and at the end token's, encode_teacher), "noise" ([seed, item] of the
    distortion's generator, decode.seeded_generator)}. done: records of these prompts already made
    (from `path`, by a run that stopped); decoding continues after them. path: a JSON-lines file each
    new record is appended to, with "made_with", fsynced after every batch. Prompt i's noise comes
    from seeded_generator(seed, i) whatever batch it falls in, so a resumed run gives the same answers.
    Under torchrun each process decodes one batch of every chunk of batch_size x processes prompts,
    the records are gathered in order, and process 0 writes them.
    """
    from tqdm import tqdm

    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    records = []
    for record, (index, text) in zip(done, prompts):  # made before a stop: they must be these very prompts
        if (record.get("kind"), record.get("image"), record.get("prompt")) != (kind, index, text):
            raise ValueError(f"{path}: record {record['_record']} is {record.get('kind')} {record.get('prompt')!r} "
                             f"on image {record.get('image')}, but this run's is {kind} {text!r} on image {index}: "
                             f"the file was made with other images or settings (delete it, or run without --resume)")
        records.append({k: v for k, v in record.items() if k != "_record"})
    out = open(path, "a") if path and distributed.is_main() else None  # process 0 writes
    chunk_size = batch_size * distributed.world_size()  # under torchrun each process decodes a batch of it
    try:
        for start in tqdm(range(len(records), len(prompts), chunk_size), desc=desc, disable=not progress):
            chunk = prompts[start:start + chunk_size]
            first, stop = distributed.share(len(chunk), batch_size)
            made = []
            if first < stop:
                mine = chunk[first:stop]
                inputs = decode.prompt_batch(processor, [images[i] for i, _ in mine], [text for _, text in mine],
                                             device)
                items = [start + first + j for j in range(len(mine))]
                responses, teachers = decode.generate(
                    model, inputs, max_new_tokens, contrast=True, alpha=alpha, beta=beta, noise_step=noise_step,
                    generators=[decode.seeded_generator(seed, item) for item in items], record=True,
                    eos_token_id=tokenizer.eos_token_id,
                    suppress_token_ids=decode.placeholder_token_ids(model, processor))
                made = [{"kind": kind, "image": i, "prompt": text, "response": response,
                         "teacher": encode_teacher(teacher), "noise": [seed, item]}
                        for (i, text), response, teacher, item in zip(mine, responses, teachers, items)]
            made = distributed.gather(made)  # the whole chunk, in order, on every process
            if out is not None:
                out.write("".join(json.dumps({**record, "made_with": made_with}) + "\n" for record in made))
                out.flush()
                os.fsync(out.fileno())  # a crash after this point loses nothing of this batch
            records += made
    finally:
        if out is not None:
            out.close()
    return records


def encode_teacher(positions):
    """A purified teacher, [(kept token ids, their purified logits)] per response position, as a JSON-able
    record: the kept-token count of each position, and all ids (int32) and logits (float32) as base64
    bytes. Lossless (every other token is a void) and small: about 11 bytes a kept token."""
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


def read_examples_log(path, made_with):
    """The records a stopped make_examples left in `path` (a torn last line cut), each with its number;
    a record made with other settings than `made_with` is refused (eval_pope.resume_records)."""
    records = eval_pope.resume_records(path, made_with)
    return [{**record, "_record": n} for n, record in enumerate(records, 1)]


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


def make_examples(model, processor, images, object_names, probes_per_image=6, description="Describe the image.",
                  batch_size=32, max_new_tokens=24, seed=0, alpha=purge.ALPHA, beta=purge.BETA,
                  noise_step=purge.NOISE_STEP, progress=True, path=None, made_with=None):
    """Prompts on unlabeled images, answered by the model itself with purified greedy decoding.

    images: file paths or PIL images (read a batch at a time). Each image gets one description prompt
    and `probes_per_image` yes/no probes chosen by `choose_probes` from what the descriptions name.
    path: a JSON-lines log of the answers as they are made (appended, fsynced per batch); the answers
    already in it are kept and decoding continues after them, so a run stopped mid-way and started
    again makes the same examples as one that never stopped. made_with: what else the log records it was
    made with (train.py: the run's settings), beside this call's own; a log made otherwise is refused.
    Returns [{"image": index, "prompt": text, "response": ids, "teacher": the purified distribution at
    each response position, as decoding chose from it (encode_teacher), "noise": its generator's seed}].
    """
    rng = random.Random(seed)
    eos = processor.tokenizer.eos_token_id
    made_with = {"seed": seed, "alpha": alpha, "beta": beta, "noise_step": noise_step, "description": description,
                 "probes_per_image": probes_per_image, "max_new_tokens": max_new_tokens, "images": len(images),
                 **(made_with or {})}
    # process 0 reads (and cuts a torn last line), every process continues from the same record
    done = (distributed.broadcast(read_examples_log(path, made_with) if distributed.is_main() else None)
            if path else [])
    described = [(index, description) for index in range(len(images))]
    contrast = dict(alpha=alpha, beta=beta, noise_step=noise_step, path=path, made_with=made_with)
    descriptions = purified_answers(model, processor, images, described, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, seed=seed, progress=progress, kind="description",
                                    done=done[:len(described)], desc="purified descriptions", **contrast)
    named = [mentioned_objects(processor.tokenizer.decode(r["response"], skip_special_tokens=True), object_names)
             for r in descriptions]
    chosen_by_image = choose_probes(named, object_names, probes_per_image, rng)
    probes = [(index, probe_text(name)) for index, chosen in enumerate(chosen_by_image) for name in chosen]
    answers = purified_answers(model, processor, images, probes, batch_size=batch_size, max_new_tokens=4,
                               seed=seed + 1, progress=progress, kind="probe", done=done[len(described):],
                               desc="purified probe answers", **contrast)
    examples = [{"image": r["image"], "prompt": r["prompt"], "response": r["response"] + [eos], "teacher": r["teacher"],
                 "noise": r["noise"]} for r in descriptions + answers]
    random.Random(seed + 2).shuffle(examples)  # mixes descriptions and probes (and the held-out tail)
    return examples


def collate(examples, processor, images):
    """Right-padded batch: input_ids, attention_mask, response_mask (True on response tokens), pixel_values.

    images: file paths or PIL images; only this batch's are read.
    """
    tokenizer = processor.tokenizer
    placeholders = set(decode.placeholder_token_ids(processor=processor))
    for e in examples:
        if placeholders & set(e["response"]):
            raise ValueError(f"a response on image {e['image']} holds an image placeholder token "
                             f"{sorted(placeholders & set(e['response']))}: the processor would expand it, and the "
                             f"image features would not fit the placeholders ({e['prompt']!r})")
    texts = [decode.chat_prompt(processor, e["prompt"]) for e in examples]
    pictures = [decode.open_image(images[e["image"]]) for e in examples]  # read now, this batch's only
    prompts = processor(images=pictures, text=texts, return_tensors="pt",
                        padding=True, padding_side="right")  # for this call only: the tokenizer is left as it was
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
    # pixel_values, and image_grid_thw for Qwen2-VL; its token types would have the prompts' length only
    # (decode.position_ids rebuilds them from input_ids)
    batch = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch.update(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)
    if all("teacher" in e for e in examples):
        batch.update(zip(("teacher_ids", "teacher_logits"), recorded_teacher(examples)))
    return batch


def recorded_teacher(examples):
    """The examples' recorded purified teachers as (teacher_ids, teacher_logits), (N, K) each: one row per
    response position, in the order response_logits returns them (example by example, token by token),
    padded to the widest kept set with -inf logits (losses.sparse_reverse_kl's layout)."""
    positions = []
    for e in examples:
        counts, ids, logits = decode_teacher(e["teacher"])
        if len(counts) != len(e["response"]):
            raise ValueError(f"a recorded teacher of {len(counts)} positions for a response of {len(e['response'])} "
                             f"tokens (image {e['image']}, {e['prompt']!r})")
        positions += zip(ids.split(counts), logits.split(counts))
    width = max(len(i) for i, _ in positions)
    teacher_ids = torch.zeros(len(positions), width, dtype=torch.long)
    teacher_logits = torch.full((len(positions), width), float("-inf"))
    for row, (ids, logits) in enumerate(positions):
        teacher_ids[row, :len(ids)], teacher_logits[row, :len(ids)] = ids, logits
    return teacher_ids, teacher_logits


# ---------------------------------------------------------------------------------------------
# Checkpoints: adapter + optimiser + step, written atomically, no pickle

def save_checkpoint(model, optimizer, path, round_index, step, made_with=None):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    adapter.save_adapter(model, tmp)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for key, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{key}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{key}.{name}"] = float(value)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "progress.json"), "w") as f:
        json.dump({"round": round_index, "step": step, "scalars": scalars, "made_with": made_with}, f)
    if os.path.exists(path):
        os.replace(path, path + ".old")  # rename is atomic; the old one is removed only after
    os.replace(tmp, path)
    if os.path.exists(path + ".old"):
        import shutil

        shutil.rmtree(path + ".old")


def load_checkpoint(model, optimizer, path):
    """Restore adapter and optimiser moments; returns (round, step) to continue from."""
    from safetensors.torch import load_file

    adapter.load_adapter(model, path)
    with open(os.path.join(path, "progress.json")) as f:
        progress = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state = optimizer.state_dict()
    for key in state["param_groups"][0]["params"]:
        slots = {name.split(".", 1)[1]: value for name, value in tensors.items() if name.split(".", 1)[0] == str(key)}
        slots.update({name.split(".", 1)[1]: torch.tensor(value) for name, value in progress["scalars"].items()
                      if name.split(".", 1)[0] == str(key)})
        if slots:
            state["state"][key] = slots
    optimizer.load_state_dict(state)
    return progress["round"], progress["step"]


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json")


def save_merged(model, processor, path):
    """The merged model as an ordinary checkpoint in <path>, loadable anywhere with
    AutoModelForImageTextToText / AutoProcessor.from_pretrained: the weights by save_pretrained, and
    the processor, which SEED leaves as it was, as the files of the folder the model came from
    (byte for byte, the video processor's settings among them), else by processor.save_pretrained.
    Written into <path>.tmp and renamed, so a crash never leaves half a checkpoint under the name."""
    import shutil

    if adapter.adapter_layers(model):
        raise ValueError("the model still has an adapter: adapter.merge_adapter(model) first")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    source = getattr(model, "name_or_path", "") or ""
    shipped = [n for n in PROCESSOR_FILES if os.path.isfile(os.path.join(source, n))]
    for name in shipped:
        shutil.copy(os.path.join(source, name), tmp)
    if not shipped:
        processor.save_pretrained(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


@torch.no_grad()
def held_out_void_mass(model, processor, images, examples, batch_size, alpha, beta, noise_step, seed,
                       recorded=False):
    """Mean student probability on the purified teacher's void tokens, over held-out response positions:
    the online teacher's (fresh noise), or with recorded=True the one recorded with each example.
    Under torchrun each process measures every P-th batch and the sums are added up."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in distributed.batch_starts(len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], processor, images).items()}
        if recorded:
            _, teacher, student = recorded_seed_step(model, batch)
            mass = losses.sparse_void_mass(student, *teacher)
        else:
            _, teacher, student = seed_step(model, batch, "reverse", alpha=alpha, beta=beta, noise_step=noise_step,
                                            generator=decode.seeded_generator(seed, 999_983 + start))
            mass = losses.void_mass(student, teacher)
        total += mass.item() * student.shape[0]
        count += student.shape[0]
    total, count = distributed.sum_value(total), distributed.sum_value(count)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Pieces of a round (train.py's self_evolve runs the loop with them)

def hold_out(examples, batch_size):
    """(examples to train on, held-out examples) -- the held-out ones measure the student's void mass.

    Refuses when nothing would be left to train on.
    """
    count = max(batch_size, len(examples) // 20)
    if len(examples) <= count:
        raise ValueError(f"{len(examples)} SEED examples: {count} are held out to measure the void mass, which leaves "
                         f"none to train on; give more unlabeled images or a smaller batch size")
    return examples[:-count], examples[-count:]


def training_batch(examples, processor, images, batch_size, seed, round_index, step, device):
    """The batch of one step, drawn from (seed, round, step) alone: a resumed run draws the same ones."""
    rng = random.Random(f"{seed}/{round_index}/{step}")
    batch = collate(rng.sample(examples, min(batch_size, len(examples))), processor, images)
    return {k: v.to(device) for k, v in batch.items()}


def process_rows(model, batch, noise_step, generator):
    """This process's rows of a global batch under torchrun, and their share of its response positions.

    The distortion is drawn for the whole batch first, with the step's generator, as one process
    draws it, and each process keeps its rows of it (distorted_pixel_values): N processes then see
    the noise one process would (noise_step None: no distortion, for a recorded teacher, whose
    positions are cut to this process's rows instead). The SEED loss is a mean over response positions, so a process's
    loss times its share, summed over the processes, is the one-process loss (and so are the
    gradients, summed by distributed.sum_gradients).
    """
    rows = batch["input_ids"].shape[0]
    per_process = -(-rows // distributed.world_size())
    start, stop = distributed.share(rows, per_process)
    net = transformers_model(model)
    pixel_rows = decode.pixel_rows_per_question(net, batch["pixel_values"], batch["input_ids"])
    first, last = sum(pixel_rows[:start]), sum(pixel_rows[:stop])
    per_row = batch["response_mask"][:, 1:].sum(-1).tolist()  # response positions of each row
    at, until = sum(per_row[:start]), sum(per_row[:stop])
    per_position = ("teacher_ids", "teacher_logits")
    mine = {key: value[start:stop] for key, value in batch.items() if key not in ("pixel_values",) + per_position}
    mine.update({key: batch[key][at:until] for key in per_position if key in batch})
    mine.update(pixel_values=batch["pixel_values"][first:last])
    if noise_step is not None:
        mine["distorted_pixel_values"] = decode.distort_images(net, batch["pixel_values"], noise_step,
                                                               generator)[first:last]
    positions = batch["response_mask"][:, 1:]
    return mine, float(positions[start:stop].sum() / positions.sum())


def step_generator(seed, round_index, step):
    """The distortion noise of one step, seeded like its batch."""
    return decode.seeded_generator(seed, round_index * 10_007 + step)


def resume_point(checkpoint, made_with=None):
    """(round, step) to continue from, as the last checkpoint wrote them; (0, 0) without one. A checkpoint
    written with other settings than `made_with` is refused, naming the setting."""
    if not os.path.exists(os.path.join(checkpoint, "progress.json")):
        return 0, 0
    with open(os.path.join(checkpoint, "progress.json")) as f:
        saved = json.load(f)
    difference = eval_pope.first_difference(saved.get("made_with") or {}, made_with or {})
    if difference:
        key, old, new = difference
        raise ValueError(f"{checkpoint}: written with {eval_pope.setting_name(key)} {old!r}, this run has {new!r}: "
                         f"resume with the same settings, or start elsewhere")
    return saved["round"], saved["step"]


def replay_round(model, round_dir):
    """A round finished before a crash: merge its adapter again and return its summary (no log)."""
    adapter.load_adapter(model, round_dir)
    adapter.merge_adapter(model)
    with open(os.path.join(round_dir, "summary.json")) as f:
        return {**json.load(f), "log": []}


def finish_round(model, optimizer, round_dir, checkpoint, round_index, summary, write=True, made_with=None):
    """Save the round's adapter (ours, and PEFT's format in <round_dir>/peft), its summary, mark the round
    done in the checkpoint, merge (METHOD.md 4). Round r's adapter applies to the model merged with
    rounds 0..r-1 (round 0's: to the base checkpoint). write=False (processes other than 0 under
    torchrun): merge only."""
    if write:
        adapter.save_adapter(model, round_dir)
        adapter.save_peft_adapter(model, os.path.join(round_dir, "peft"),
                                  base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None)
        with open(os.path.join(round_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        save_checkpoint(model, optimizer, checkpoint, round_index=round_index + 1, step=0, made_with=made_with)
    adapter.merge_adapter(model)  # the merged model is the next round's teacher
