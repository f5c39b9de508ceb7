"""SEED end to end: evaluate a model, self-evolve it with SEED, evaluate again, print the paper's table.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680. This script composes METHOD.md sections 1-6:
purge.py (identify, isolate, purge), losses.py (Mode-Seeking Evolving), adapter.py (Hallucination
Elimination Adapter), seed.py (the SEED step, the purified examples, checkpoints), decode.py and
eval_pope.py (POPE). The training loop itself is `self_evolve` below: make the purified examples,
attach the adapter, `loss = seed_step(...); loss.backward(); optimizer.step()`, checkpoint, merge.

    python train.py                                  # the built-in toy world, CPU, a few minutes
    python train.py --model llava-1.5-7b-hf --images unlabeled/ --pope pope/ --pope-images val2014/
    torchrun --nproc_per_node 8 train.py --model ...    # the same run, split over 8 GPUs (distributed.py)

Rows of the table: base; VCD decoding (the contrast at inference, two passes per token); SEED with
forward KL (classic distillation, the paper's ablation); SEED with reverse KL (the paper).
Everything printed is also in <out>/results.json. Not from the paper (ours): the toy world and its
noise step (700; VCD's 500 with --model), the step counts and learning rate, the reverse KL's void
floor while training (1e-4), CHAIR on the toy world only, the pictures.
"""
import dataclasses
import json
import os
import random
import statistics
import sys

import torch

import adapter
import cli
import decode
import distributed
import eval_pope
import losses
import report
import seed



def self_evolve(model, processor, images, object_names, out_dir, config, divergence, description,
                autocast_dtype=None):
    """SEED's rounds of self-evolution on `model`, in place (METHOD.md 3-5); returns it merged, with a log per round.

    Each round writes <out_dir>/round<r>/ (the adapter and a summary); a checkpoint (adapter, optimiser
    moments, step) goes to <out_dir>/checkpoint every config.checkpoint_every steps, and
    config.resume continues from it with the same result as an uninterrupted run: every batch and
    every noise draw is seeded by (seed, round, step), never by what ran before.
    """
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    checkpoint = os.path.join(out_dir, "checkpoint")
    contrast = eval_pope.contrast_settings(config)  # the teacher's alpha, beta and noise step (METHOD.md 1-2)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    made_with = {"run": cli.run_fingerprint(config), "divergence": divergence}  # recorded by every file it appends to
    start_round, start_step = seed.resume_point(checkpoint, made_with) if config.resume else (0, 0)
    history = []
    for round_index in range(config.rounds):
        round_dir = os.path.join(out_dir, f"round{round_index}")
        if round_index < start_round:  # finished before a crash: replay its merge and its summary
            history.append(seed.replay_round(model, round_dir))
            continue
        # Identify, isolate, purge: the model's own purified answers on unlabeled images (no labels read)
        model.eval()  # no dropout: teacher and student differ by the adapter alone
        examples_log = os.path.join(round_dir, "examples.jsonl")  # appended as made: --resume continues it
        if distributed.is_main():
            os.makedirs(round_dir, exist_ok=True)
        distributed.barrier()
        with autocast:
            examples = seed.make_examples(model, processor, images, object_names, path=examples_log,
                                          made_with={**made_with, "round": round_index},
                                          probes_per_image=config.probes_per_image, description=description,
                                          batch_size=config.batch_size, max_new_tokens=config.description_tokens,
                                          seed=config.seed + round_index, progress=config.progress, **contrast)
        examples, held_out = seed.hold_out(examples, config.batch_size)
        # The Hallucination Elimination Adapter: fresh, zero-initialised; with it off the model is the teacher
        torch.manual_seed(config.seed * 7919 + round_index)  # its A, the same on every rerun
        params = adapter.add_adapter(model, rank=config.rank, alpha_r=config.adapter_alpha)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        recorded = config.teacher == "recorded"
        with autocast:  # the student before its first step is the base model
            void_at_start = seed.held_out_void_mass(model, processor, images, held_out, batch_size=config.batch_size,
                                                    seed=config.seed, recorded=recorded, **contrast)
        first_step = 0
        if round_index == start_round and start_step > 0:  # resume mid-round: adapter, moments, step
            seed.load_checkpoint(model, optimizer, checkpoint)
            first_step = start_step
        # Mode-seeking evolving: distil the purified teacher into the student with the reverse KL
        log = []
        bar = tqdm(range(first_step, config.steps), desc=f"SEED round {round_index} ({divergence} KL)",
                   disable=not config.progress, initial=first_step, total=config.steps)
        for step in bar:
            batch = seed.training_batch(examples, processor, images, batch_size=config.batch_size, seed=config.seed,
                                        round_index=round_index, step=step, device=device)
            generator = seed.step_generator(config.seed, round_index, step)
            share = 1.0  # of the batch's response positions; under torchrun each process takes its rows
            if distributed.world_size() > 1:
                batch, share = seed.process_rows(model, batch, None if recorded else config.noise_step, generator)
            with autocast:
                if recorded:  # the student's pass alone, against the teacher recorded with the examples
                    loss, teacher, student = seed.recorded_seed_step(model, batch, divergence, void_eps=config.void_eps)
                    void = losses.sparse_void_mass(student.detach(), *teacher)
                else:
                    loss, teacher, student = seed.seed_step(model, batch, divergence, void_eps=config.void_eps,
                                                            generator=generator, **contrast)
                    void = losses.void_mass(student.detach(), teacher)
            # the batch's mean loss and void mass: each process's share of them, summed over the processes
            log.append({"step": step, "loss": distributed.sum_value(loss.item() * share),
                        "void_mass": distributed.sum_value(void.item() * share)})
            del teacher, student, void  # only the loss's own saved tensors stay alive through the backward
            optimizer.zero_grad(set_to_none=True)
            (loss * share).backward()
            distributed.sum_gradients(params)  # the one-process gradient of the whole batch
            optimizer.step()
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            if (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps
                    and distributed.is_main()):
                seed.save_checkpoint(model, optimizer, checkpoint, round_index=round_index, step=step + 1,
                                     made_with=made_with)
        with autocast:
            void_at_end = seed.held_out_void_mass(model, processor, images, held_out, batch_size=config.batch_size,
                                                  seed=config.seed, recorded=recorded, **contrast)
        summary = {"round": round_index, "examples": len(examples), "void_mass_at_start": void_at_start,
                   "void_mass": void_at_end}
        seed.finish_round(model, optimizer, round_dir=round_dir, checkpoint=checkpoint, round_index=round_index,
                          summary=summary, write=distributed.is_main(),  # save (process 0), then merge
                          made_with=made_with)
        distributed.barrier()
        history.append({**summary, "log": log})
    return model, history



def main(argv=None):
    config = cli.parse_config(argv, description=__doc__)
    process_device = distributed.start(config.dist_timeout)  # under torchrun: this process's GPU (or the CPU)
    main_process = distributed.is_main()
    config.progress = config.progress and main_process  # one set of progress bars, process 0's
    say = print if main_process else (lambda *args, **kwargs: None)
    if not config.progress:  # transformers' own bars (loading, saving weights) go quiet too
        import transformers

        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = process_device or torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                                            "cpu" if config.device == "auto" else config.device)
    # bf16 weights and autocast on a GPU (one copy of the weights: the teacher is the adapter off);
    # float32 on the CPU, where bf16 is slow and the toy model is tiny.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.bfloat16 if device.type == "cuda" else None
    # Paths, not pixels: each batch reads its own images (83k COCO photos as PIL images would be tens of GB)
    unlabeled = cli.readable_images(config, say) if config.model else None  # each decoded once, before any work
    if main_process:
        cli.start_run(config)  # --out: the earlier run replaced (--overwrite), this run's settings recorded
    distributed.barrier()

    # ---- data and base model -------------------------------------------------------------------
    caption_set = None
    if config.model is None:
        import toyworld

        world_config = toyworld.WorldConfig(world_seed=config.world_seed, steps=config.pretrain_steps)
        if not main_process:
            distributed.barrier()  # process 0 builds the cache first (pretraining, if the world needs it)
        model_path, world = toyworld.build(world_config, progress=config.progress, shipped=config.shipped_base)
        pope_files, image_dir, objects_by_image = toyworld.eval_set(config.eval_images, world, world_config)
        if main_process:
            distributed.barrier()
        unlabeled = toyworld.unlabeled_images(world, config.unlabeled, seed=config.seed + 20_000, config=world_config)
        object_names = list(world["names"])
        description = toyworld.DESCRIBE
        caption_set = (image_dir, objects_by_image, object_names)
    else:
        model_path, image_dir = config.model, config.pope_images
        pope_files = cli.pope_files_in(config.pope)
        object_names = (open(config.objects).read().split("\n") if config.objects else list(eval_pope.COCO_OBJECTS))
        object_names = [n.strip() for n in object_names if n.strip()]
        description = "Describe this image in detail."
    say(f"device {device}, dtype {dtype}; model {model_path}; {len(unlabeled)} unlabeled images; "
        f"POPE splits {list(pope_files)}; {distributed.world_size()} process(es)")

    results = {"config": dataclasses.asdict(config)}

    def save_results():
        if not main_process:
            return
        tmp = os.path.join(config.out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(config.out, "results.json"))

    def load():
        model, processor = decode.load_model(model_path, device, dtype)
        return model, processor

    def measure(method, model, processor, contrast=False):
        answers_dir = os.path.join(config.out, method, "answers")
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            pope = report.evaluate(model, processor, pope_files, image_dir=image_dir, answers_dir=answers_dir, config=config,
                            contrast=contrast)
            if caption_set is not None:
                pope["captions"] = report.caption_hallucination(model, processor, *caption_set, contrast=contrast,
                                                         **eval_pope.contrast_settings(config))
        results[method] = pope
        save_results()

    # ---- base model and VCD decoding -----------------------------------------------------------
    model, processor = load()
    if config.model is None:  # why the contrast can work: what survives distortion is the prior
        results["diagnostic"] = toyworld.diagnose(model, processor, world, noise_step=config.noise_step,
                                                  config=world_config)
        say(f"mean P(yes), clean -> distorted (k={config.noise_step}): " + ", ".join(
            f"{group} {d['clean']:.2f} -> {d['distorted']:.2f}" for group, d in results["diagnostic"].items()))
    measure("base", model, processor)
    if config.model is None:  # where the base model's hallucinations come from
        for split in pope_files:
            share, base_rate, count = toyworld.false_positive_partners(
                pope_files[split], os.path.join(config.out, "base", "answers", f"greedy_{split}_seed0.jsonl"),
                objects_by_image, world)
            results["diagnostic"][f"false_positive_partner_share_{split}"] = share
            say(f"base, greedy, {split}: {count} false positives, {share:.0%} of them partners of present objects "
                  f"(partners are {base_rate:.0%} of the negatives)")
    measure("vcd", model, processor, contrast=True)

    # ---- SEED: self-evolve a fresh copy of the base model with each loss -----------------------
    divergences = ["forward", "reverse"] if config.loss == "both" else [config.loss]
    for divergence in divergences:
        method = f"seed_{divergence}"
        model, processor = load()
        model, history = self_evolve(model, processor, unlabeled, object_names,
                                     out_dir=os.path.join(config.out, method), config=config, divergence=divergence,
                                     description=description, autocast_dtype=autocast)
        # The product: the merged model as an ordinary checkpoint (the adapters, ours and PEFT's, are in round<r>/)
        if main_process:
            seed.save_merged(model, processor, os.path.join(config.out, method, "merged"))
        measure(method, model, processor)
        results[method]["void_mass"] = [h["void_mass"] for h in history]
        results[method]["void_mass_at_start"] = [h["void_mass_at_start"] for h in history]
        # (a round finished before a --resume is replayed from its adapter and has no log here)
        results[method]["final_loss"] = [statistics.mean(x["loss"] for x in h["log"][-20:]) for h in history
                                         if h["log"]]
        save_results()
        if divergence == "reverse":  # VCD decoding on the SEED model: do the two stack?
            measure("seed_reverse_vcd", model, processor, contrast=True)

    if not main_process:  # timing, the table and the pictures are process 0's
        distributed.stop()
        return results

    # ---- answer cost: every row on one freshly loaded copy of the weights, timed in interleaved rounds ----
    model, processor = load()
    rows = {"base": ({}, False), "vcd": ({}, True)}
    for divergence in divergences:  # the merged SEED model: the base plus each round's adapter, merged
        rows[f"seed_{divergence}"] = (report.merged_weights(model, [os.path.join(config.out, f"seed_{divergence}", f"round{r}")
                                                       for r in range(config.rounds)]), False)
    if "seed_reverse" in rows:
        rows["seed_reverse_vcd"] = (rows["seed_reverse"][0], True)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        costs = report.answer_costs(model, processor, pope_files["random"], image_dir=image_dir,
                             batch_size=config.eval_batch_size, rows=rows)
    for method, seconds in costs.items():
        results[method]["seconds_per_answer"] = seconds
    save_results()

    # ---- the table and the pictures -------------------------------------------------------------
    print(report.format_results(results, list(pope_files)))
    report.draw_pictures(results, list(pope_files), pope_files=pope_files, image_dir=image_dir, out=config.out)
    print(f"\nall numbers: {os.path.join(config.out, 'results.json')}; pictures: results.png, scenes.png")
    distributed.stop()
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # what was written is kept: answers and examples per batch, the checkpoint
        argv = [a for a in sys.argv[1:] if a != "--overwrite"]
        sys.exit("\nstopped: the answers and examples written so far, and the last checkpoint (every "
                 "--checkpoint-every steps), are kept in --out; to continue: python train.py "
                 + " ".join(argv + ([] if "--resume" in argv else ["--resume"])))
