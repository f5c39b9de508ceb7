"""train.py's report: POPE on every row, CHAIR on the toy world, answer costs, table, pictures.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680; POPE as METHOD.md 6 scores it. The rows: the base model, VCD
decoding on it, SEED with each divergence, and VCD decoding on the reverse-KL SEED model.
"""
import os
import statistics
import time

import torch

import adapter
import cli
import decode
import distributed
import eval_pope
import losses
import models
import seed

# The table's rows, in its order: the base model, VCD decoding on it (two passes a token), SEED with
# each divergence (one pass), and VCD decoding on the reverse-KL SEED model (two passes; the next
# round's teacher): whether the two stack.
METHODS = {"base": "base", "vcd": "VCD decoding", "seed_forward": "SEED forward KL",
           "seed_reverse": "SEED reverse KL", "seed_reverse_vcd": "SEED + VCD"}



def evaluate(model, processor, pope_files, image_dir, answers_dir, config,
             decodings=("greedy", "sample"), contrast=False, meter=None):
    """POPE metrics, {decoding: {split: metrics}}, sampled ones the mean over seeds with f1_std.
    Answer files already in answers_dir are resumed (when made with the same run's settings)."""
    results = {}
    for decoding in decodings:
        name = f"vcd-{decoding}" if contrast else decoding
        seeds = range(config.sample_seeds) if decoding == "sample" else [0]
        results[decoding] = {}
        for split, question_file in pope_files.items():
            runs = []
            for s in seeds:
                # resumed if it exists
                path = os.path.join(answers_dir, f"{name}_{split}_seed{s}.jsonl")
                # VCD with the flags' alpha, beta and noise step: the contrast of SEED's teacher
                eval_pope.answer_questions(model, processor, question_file, image_dir=image_dir,
                                           out_path=path,
                                           made_with={"run": cli.run_fingerprint(config)},
                                           decoding=name, batch_size=config.eval_batch_size, seed=s,
                                           max_new_tokens=4, progress=config.progress,
                                           meter=meter,
                                           **(eval_pope.contrast_options(config) if contrast
                                              else {}))
                runs.append(eval_pope.score_files(question_file, path))
            metrics = {k: statistics.mean(r[k] for r in runs)
                       for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
            if decoding == "sample":
                metrics["f1_std"] = statistics.pstdev(r["f1"] for r in runs)
            results[decoding][split] = metrics
    return results


def answer_costs(model, processor, question_file, image_dir, batch_size, rows, repeats=20):
    """Median seconds per POPE answer for each row, all timed on one copy of the weights.

    rows: {method: (weights to swap in, contrast?)}; the weights are {parameter name: tensor}, and a
    name one row leaves out takes the base value. The rows are timed in interleaved rounds (one pass
    each per round, after one warm-up round), so a drift in the machine's speed falls on every row
    alike instead of on whichever row happened to be timed first.
    """
    questions = eval_pope.load_questions(question_file)[:batch_size]
    images = [os.path.join(image_dir, q["image"]) for q in questions]  # prompt_batch reads them
    device = next(model.parameters()).device
    inputs = models.prompt_batch(processor, images,
                                 [q["text"] + eval_pope.PROMPT_SUFFIX for q in questions], device)
    parameters = dict(model.named_parameters())
    swapped = sorted({name for weights, _ in rows.values() for name in weights})
    base = {name: parameters[name].detach().clone() for name in swapped}
    timings = {method: [] for method in rows}

    @torch.no_grad()
    def swap_in(weights):
        for name in swapped:
            parameters[name].copy_(weights.get(name, base[name]))

    for repeat in range(repeats + 1):
        for method, (weights, contrast) in rows.items():
            swap_in(weights)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            # Always 4 new tokens (no early stop), so every row does the same decoding work.
            decode.generate(model, inputs, max_new_tokens=4, contrast=contrast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first round is the warm-up
                timings[method].append((time.perf_counter() - start) / len(questions))
    swap_in({})  # the base weights back
    return {method: statistics.median(t) for method, t in timings.items()}


@torch.no_grad()
def merged_weights(model, adapter_dirs):
    """The weights of the merged SEED model where it differs from `model`: {parameter name: tensor}.

    Merges each round's adapter into `model`, reads the weights that changed, and puts the
    originals back, so that one copy of the model can be timed as base and as each SEED row.
    """
    originals = {}
    for adapter_dir in adapter_dirs:
        adapter.load_adapter(model, adapter_dir)
        for name, layer in adapter.adapter_layers(model).items():
            originals.setdefault(f"{name}.weight", layer.base.weight.detach().clone())
        adapter.merge_adapter(model)
    parameters = dict(model.named_parameters())
    merged = {name: parameters[name].detach().clone() for name in originals}
    for name, weight in originals.items():
        parameters[name].copy_(weight)
    return merged



def shown(count, what, first=""):
    """'the first six of them', 'one where they agree', 'none where ...': a title's count."""
    words = ["none", "one", "two", "three", "four", "five", "six", "seven", "eight"]
    return " ".join(filter(None, [first if count > 1 else "", words[count], what]))


def draw_pictures(results, splits, pope_files, image_dir, out):
    """results.png (F1 per split, greedy and sampled, and the void mass) and scenes.png (held-out
    adversarial questions with the base model's and SEED's greedy answers, disagreements first)."""
    import pictures

    methods = [m for m in METHODS if m in results]
    rows = {m: {"label": METHODS[m], **{d: {s: 100 * results[m][d][s]["f1"] for s in splits}
                                        for d in ("greedy", "sample")}} for m in methods}
    seeds = [m for m in methods if m in ("seed_forward", "seed_reverse")]
    void = {"base": 100 * results[seeds[0]]["void_mass_at_start"][0]} if seeds else {}
    void.update({m: 100 * results[m]["void_mass"][-1] for m in seeds})
    pictures.results_chart(rows, splits, void, os.path.join(out, "results.png"))
    if not seeds:
        return
    split = "adversarial" if "adversarial" in pope_files else splits[-1]
    questions = {q["question_id"]: q for q in eval_pope.load_questions(pope_files[split])}
    answers = {}
    for m in ("base", seeds[-1]):
        path = os.path.join(out, m, "answers", f"greedy_{split}_seed0.jsonl")
        answers[m] = {a["question_id"]: eval_pope.parse_answer(a["text"])
                      for a in eval_pope.read_answers(path)}
    differ = [i for i in sorted(questions) if answers["base"][i] != answers[seeds[-1]][i]]
    agree = [i for i in sorted(questions) if i not in differ][:8 - len(differ[:6])]
    ids = sorted(differ[:6] + agree)
    cards = [(models.open_image(os.path.join(image_dir, questions[i]["image"])),
              questions[i]["text"], questions[i].get("label"), answers["base"][i],
              answers[seeds[-1]][i]) for i in ids]
    pictures.scene_sheet(cards, os.path.join(out, "scenes.png"),
                         title=f"POPE {split}, greedy: {len(differ)} of {len(questions)} answers "
                               f"differ between the base model and {METHODS[seeds[-1]]}; "
                               f"{shown(len(differ[:6]), 'of them', 'the first')}, and "
                               f"{shown(len(agree), 'where they agree')}")


def caption_hallucination(model, processor, image_dir, objects_by_image, object_names,
                          contrast=False, batch_size=64, **contrast_options):
    """CHAIR on held-out descriptions (Rohrbach et al., 2018): the share of object mentions, every
    occurrence counted, that name an object not in the scene (chair_i), and the share of captions
    with any (chair_s). Toy world only: it needs true contents.
    contrast_options (alpha, beta, noise_step) set the contrast when `contrast` is on."""
    names = sorted(objects_by_image)
    mentioned_total = hallucinated_total = captions_with_any = 0
    device = next(model.parameters()).device
    for start in distributed.batch_starts(len(names), batch_size):
        chunk = names[start:start + batch_size]
        images = [os.path.join(image_dir, n) for n in chunk]  # prompt_batch reads them
        inputs = models.prompt_batch(processor, images, ["Describe the image."] * len(chunk),
                                     device)
        generators = [decode.seeded_generator(0, start + i) for i in range(len(chunk))]
        ids = decode.generate(model, inputs, 24, contrast=contrast, generators=generators,
                              eos_token_id=processor.tokenizer.eos_token_id,
                              suppress_token_ids=models.placeholder_token_ids(model, processor),
                              **contrast_options)
        for name, row in zip(chunk, ids):
            mentioned = seed.mentions(processor.tokenizer.decode(row, skip_special_tokens=True),
                                      object_names)
            hallucinated = [o for o in mentioned if o not in objects_by_image[name]]
            mentioned_total += len(mentioned)
            hallucinated_total += len(hallucinated)
            captions_with_any += bool(hallucinated)
    # under torchrun each process described every P-th batch: add the counts up
    mentioned_total, hallucinated_total, captions_with_any = (
        distributed.sum_value(n) for n in (mentioned_total, hallucinated_total, captions_with_any))
    return {"chair_i": hallucinated_total / max(mentioned_total, 1),
            "chair_s": captions_with_any / len(names)}


def format_results(results, splits):
    """The table: per split greedy F1 and yes-ratio, sampled F1 (mean ± std); then CHAIR (the toy
    world's captions, or COCO's with --chair-*: then with Recall and Len), void mass, cost."""
    methods = [m for m in METHODS if m in results]
    coco = any("chair" in results[m] for m in methods)
    cell = 28  # F1 greedy (7) + yes-ratio (7) + F1 sampled (14)
    chair_head = (f"{'CHAIRs':>8}{'CHAIRi':>8}{'Recall':>8}{'Len':>6}" if coco
                  else f"{'CHAIRi':>8}{'CHAIRs':>8}")
    chair_sub = f"{'%':>8}{'%':>8}{'%':>8}{'words':>6}" if coco else f"{'%':>8}{'%':>8}"
    head = (f"{'POPE %':<16}" + "".join(f"{s:>{cell}}" for s in splits) + chair_head
            + f"{'void':>8}{'cost':>6}")
    sub = (f"{'':<16}" + f"{'F1':>7}{'yes':>7}{'F1 sampled':>14}" * len(splits) + chair_sub
           + f"{'mass %':>8}{'x':>6}")
    lines = [head, sub]
    base_cost = results["base"]["seconds_per_answer"]
    # The base model's void mass: the student before its first step, measured by each SEED run.
    start_void = next((results[m]["void_mass_at_start"][0] for m in methods
                       if results[m].get("void_mass_at_start")),
                      None)
    for m in methods:
        r = results[m]
        row = f"{METHODS[m]:<16}"
        for s in splits:
            g, sampled = r["greedy"][s], r["sample"][s]
            row += f"{100 * g['f1']:>7.1f}{100 * g['yes_ratio']:>7.1f}"
            row += f"{100 * sampled['f1']:>8.1f} ±{100 * sampled['f1_std']:>4.1f}"
        c = r.get("chair") if coco else r.get("captions")
        if coco:
            row += (f"{100 * c['chair_s']:>8.1f}{100 * c['chair_i']:>8.1f}"
                    f"{100 * c['recall']:>8.1f}{c['len']:>6.1f}" if c else f"{'-':>8}" * 3 + "-")
        else:
            row += (f"{100 * c['chair_i']:>8.1f}{100 * c['chair_s']:>8.1f}" if c
                    else f"{'-':>8}{'-':>8}")
        void = r["void_mass"][-1] if r.get("void_mass") else start_void if m == "base" else None
        row += f"{100 * void:>8.2f}" if void is not None else f"{'-':>8}"
        row += f"{r['seconds_per_answer'] / base_cost:>6.2f}"
        lines.append(row)
    chair = ("CHAIR (COCO val2014, eval_chair.py's rules; greedy, VCD rows vcd-greedy): "
             "descriptions with a hallucinated object (s), object mentions hallucinated (i, every "
             "mention), ground-truth objects mentioned (Recall), words a description (Len)."
             if coco else "CHAIR: share of object mentions in held-out descriptions (i, every "
             "mention) / of descriptions (s) that are hallucinated.")
    lines.append("F1 / yes: greedy decoding. F1 sampled: temperature 1, top-p 1, mean ± std over "
                 f"seeds. {chair}\nvoid mass: student "
                 "probability on the purified teacher's voids (held-out SEED prompts; base = the "
                 "student at step 0).\ncost: seconds per POPE answer relative to base (median of "
                 "timed batches).")
    return "\n".join(lines)


@torch.no_grad()
def held_out_void_mass(model, processor, images, examples, batch_size, alpha, beta, noise_step,
                       noise_seed, recorded=False):
    """Mean student probability on the purified teacher's void tokens, over held-out response
    positions: the online teacher's (fresh noise), or with recorded=True the one recorded with each
    example. Under torchrun each process measures every P-th batch and the sums are added up."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in distributed.batch_starts(len(examples), batch_size):
        batch = seed.collate(examples[start:start + batch_size], processor, images)
        batch = {k: v.to(device) for k, v in batch.items()}
        if recorded:
            _, teacher, student = seed.recorded_seed_step(model, batch)
            mass = losses.sparse_void_mass(student, *teacher)
        else:
            _, teacher, student = seed.seed_step(model, batch, "reverse", alpha=alpha, beta=beta,
                                                 noise_step=noise_step,
                                                 generator=decode.seeded_generator(noise_seed,
                                                                                   999_983 + start))
            mass = losses.void_mass(student, teacher)
        total += mass.item() * student.shape[0]
        count += student.shape[0]
    total, count = distributed.sum_value(total), distributed.sum_value(count)
    return total / max(count, 1)


def measure(model, processor, data, config, method, contrast=False, clock=None):
    """One row of the table (`method`, its files in <out>/<method>/): POPE on every split, CHAIR on
    the toy world's captions, and with --chair-* CHAIR on COCO descriptions (eval_chair.py)."""
    import plan

    clock = clock or plan.Clock([], say=None)
    clock.start(plan.pope_phase(method))
    row = evaluate(model, processor, data.pope_files, image_dir=data.image_dir,
                   answers_dir=os.path.join(config.out, method, "answers"), config=config,
                   contrast=contrast, meter=clock.tick)
    if data.world is not None:  # CHAIR needs the scenes' true contents
        row["captions"] = caption_hallucination(model, processor, data.image_dir,
                                                data.objects_by_image, data.object_names,
                                                contrast=contrast,
                                                **eval_pope.contrast_options(config))
    if data.chair_sample:
        import eval_chair

        clock.start(plan.chair_phase(method))
        decoding = "vcd-greedy" if contrast else "greedy"
        described = eval_chair.describe(
            model, processor, data.chair_sample, config.chair_images,
            os.path.join(config.out, method, "chair", f"{decoding}.jsonl"), decoding,
            config.chair_batch_size, max_new_tokens=config.chair_tokens,
            made_with={"run": cli.run_fingerprint(config)}, progress=config.progress,
            meter=clock.tick, **(eval_pope.contrast_options(config) if contrast else {}))
        row["chair"] = eval_chair.score([(d["image_id"], d["caption"]) for d in described],
                                        data.chair_truth)[0]
    return row


def prior_diagnostic(model, processor, data, config, results, say):
    """Toy world: why the contrast can work, what survives distortion is the prior (P(yes), clean ->
    distorted, on present objects and on absent partners), into results["diagnostic"]."""
    if data.world is None:
        return
    import toyworld

    results["diagnostic"] = toyworld.diagnose(model, processor, data.world,
                                              noise_step=config.noise_step,
                                              config=data.world_config)
    say(f"mean P(yes), clean -> distorted (k={config.noise_step}): " + ", ".join(
        f"{group} {d['clean']:.2f} -> {d['distorted']:.2f}"
        for group, d in results["diagnostic"].items()))


def partner_share(data, config, results, say):
    """Toy world: the base model's greedy false positives, and the share of them that are partners
    of present objects (where a language prior lives), per split."""
    if data.world is None:
        return
    import toyworld

    for split in data.pope_files:
        share, base_rate, count = toyworld.false_positive_partners(
            data.pope_files[split],
            os.path.join(config.out, "base", "answers", f"greedy_{split}_seed0.jsonl"),
            data.objects_by_image, data.world)
        results["diagnostic"][f"false_positive_partner_share_{split}"] = share
        say(f"base, greedy, {split}: {count} false positives, {share:.0%} of them partners of "
            f"present objects (partners are {base_rate:.0%} of the negatives)")


def round_figures(history):
    """Each round's held-out void mass at its start and end, and its final loss (mean of its last
    20 steps; a round replayed on --resume brings its log of steps from its summary)."""
    return {"void_mass": [h["void_mass"] for h in history],
            "void_mass_at_start": [h["void_mass_at_start"] for h in history],
            "final_loss": [statistics.mean(x["loss"] for x in h["log"][-20:]) for h in history
                           if h["log"]]}


def time_rows(model, processor, data, divergences, config, results):
    """Every row's seconds per answer into results, on one fresh copy of the weights."""
    rows = {"base": ({}, False), "vcd": ({}, True)}
    # the merged SEED model: the base plus each round's adapter, merged
    for divergence in divergences:
        rounds = [os.path.join(config.out, f"seed_{divergence}", f"round{r}")
                  for r in range(config.rounds)]
        rows[f"seed_{divergence}"] = (merged_weights(model, rounds), False)
    if "seed_reverse" in rows:
        rows["seed_reverse_vcd"] = (rows["seed_reverse"][0], True)
    costs = answer_costs(model, processor, data.pope_files["random"], image_dir=data.image_dir,
                         batch_size=config.eval_batch_size, rows=rows)
    for method, seconds in costs.items():
        results[method]["seconds_per_answer"] = seconds


def show(results, data, out):
    """The table on stdout, results.png and scenes.png beside results.json in `out`."""
    print(format_results(results, list(data.pope_files)))
    draw_pictures(results, list(data.pope_files), pope_files=data.pope_files,
                  image_dir=data.image_dir, out=out)
    print(f"\nall numbers: {os.path.join(out, 'results.json')}; pictures: results.png, scenes.png")
