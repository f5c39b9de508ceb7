"""SEED end to end: evaluate a model, self-evolve it with SEED, evaluate again, print the table.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680. This script composes METHOD.md sections 1-6:
purge.py (identify, isolate, purge), losses.py (Mode-Seeking Evolving), adapter.py (Hallucination
Elimination Adapter), seed.py (the SEED step and its purified examples); models.py, decode.py,
runs.py, cli.py and report.py carry the plumbing. The training loop itself is `self_evolve` below:
make the purified examples, attach the adapter, `loss = seed_step(...); loss.backward();
optimizer.step()`, checkpoint, merge; two rounds by default, each from the model the last merged.

    python train.py                                # the built-in toy world, CPU, a few minutes
    python train.py --model llava-1.5-7b-hf --images unlabeled/ --pope pope/ --pope-images val2014/
    torchrun --nproc_per_node 8 train.py --model ...  # the same run on 8 GPUs (distributed.py)

Rows of the table: base; VCD decoding (the contrast at inference, two passes per token); SEED with
forward KL (classic distillation, the paper's ablation); SEED with reverse KL (the paper); SEED +
VCD (VCD decoding on the reverse-KL SEED model: do the two stack). Everything printed is also in
<out>/results.json. Not from the paper (ours): the toy world and its noise step (700; VCD's 500 with
--model), the step counts, rounds and learning rate, the reverse KL's void floor while training
(1e-4), CHAIR on the toy world only, the pictures.
"""
import contextlib
import dataclasses
import os
import random
import sys

import torch
from tqdm import tqdm

import adapter
import cli
import distributed
import eval_pope
import loading
import losses
import memory
import models
import plan
import report
import runs
import seed


def round_examples(model, processor, images, object_names, log_path, config, description,
                   made_with, round_index, meter=None):
    """Identify, isolate, purge: the model's own purified answers on the round's unlabeled images
    (no labels read), appended to the examples log at `log_path` as they are made (--resume
    continues it; a log that holds them all is read, not made again). Returns (training examples,
    held-out examples)."""
    if distributed.is_main():
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
    distributed.barrier()
    settings = dict(probes_per_image=config.probes_per_image, description=description,
                    max_new_tokens=config.description_tokens,
                    random_seed=config.seed + round_index, **eval_pope.contrast_options(config))
    log_made_with = {**seed.example_settings(images, **settings),
                     "image_sample": loading.sample_id(images), **made_with, "round": round_index}
    # decoded --eval-batch-size prompts at a time: an answer does not depend on its batch
    answer = runs.examples_log(log_path, log_made_with, batch_size=config.eval_batch_size,
                               progress=config.progress, meter=meter)
    examples = seed.make_examples(model, processor, images, object_names,
                                  batch_size=config.eval_batch_size, answer=answer, **settings)
    return seed.hold_out(examples, config.batch_size)


def step_loss(model, batch, divergence, config, generator):
    """One SEED step's loss and the student's mass on the voids: against the teacher recorded with
    the examples (the student's pass alone), or the online teacher's two passes with fresh noise."""
    if config.teacher == "recorded":
        loss, teacher, student = seed.recorded_seed_step(model, batch, divergence,
                                                         void_eps=config.void_eps)
        return loss, losses.sparse_void_mass(student.detach(), *teacher)
    loss, teacher, student = seed.seed_step(model, batch, divergence, generator=generator,
                                            void_eps=config.void_eps,
                                            **eval_pope.contrast_options(config))
    return loss, losses.void_mass(student.detach(), teacher)  # both freed before the backward


def optimizer_step(model, batch, params, optimizer, divergence, config, generator, autocast):
    """One optimiser step on a global batch: this process's rows of it (under torchrun) in
    micro-batches, each loss weighted by its share of the batch's response positions, so that the
    gradients add up to the whole batch's (METHOD.md 7). Returns the batch's mean loss and void
    mass."""
    noise_step = None if config.teacher == "recorded" else config.noise_step
    optimizer.zero_grad(set_to_none=True)
    loss_sum = void_sum = 0.0
    for rows, share in distributed.process_rows(model, batch, noise_step, generator,
                                                config.micro_batch_size):
        with autocast:
            loss, void = step_loss(model, rows, divergence, config, generator)
        (loss * share).backward()
        loss_sum, void_sum = loss_sum + loss.item() * share, void_sum + void.item() * share
    distributed.sum_gradients(params)  # the one-process gradient of the whole batch
    optimizer.step()
    return distributed.sum_value(loss_sum), distributed.sum_value(void_sum)


def held_out_void_mass(model, processor, images, held_out, config):
    """The student's mass on the held-out teacher's voids (recorded, or online with fresh noise)."""
    return report.held_out_void_mass(model, processor, images, held_out, config.batch_size,
                                     noise_seed=config.seed, recorded=config.teacher == "recorded",
                                     **eval_pope.contrast_options(config))


def self_evolve(model, processor, round_images, object_names, out_dir, config, divergence,
                description, autocast=contextlib.nullcontext(), first_examples=None, clock=None):
    """SEED's rounds of self-evolution on `model`, in place (METHOD.md 3-5), round r on the images
    round_images[r]: returns it merged and a log per round; config.resume continues from
    <out_dir>/checkpoint as if it never stopped. first_examples: round 0's examples log, which
    every row that starts from the same base model shares (default <out_dir>/round0/). clock: the
    run's plan.Clock, told of each phase and batch."""
    clock = clock or plan.Clock([], say=None)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = os.path.join(out_dir, "checkpoint")
    models.checkpoint_decoder_layers(model, config.gradient_checkpointing)
    # recorded by every file it appends to; round 0's examples are the base model's, whatever the
    # divergence that distils them
    run = {"run": cli.run_fingerprint(config)}
    made_with = {**run, "divergence": divergence}
    start_round, start_step = runs.resume_point(checkpoint, made_with) if config.resume else (0, 0)
    history = []
    for round_index in range(config.rounds):
        round_dir = os.path.join(out_dir, f"round{round_index}")
        if round_index < start_round:  # finished before a crash: replay its merge and its summary
            history.append(runs.replay_round(model, round_dir))
            continue
        images = round_images[round_index]
        shared = round_index == 0 and first_examples is not None
        log_path = first_examples if shared else os.path.join(round_dir, "examples.jsonl")
        model.eval()  # no dropout: teacher and student differ by the adapter alone
        clock.start(plan.examples_phase(divergence, round_index))
        with autocast:
            examples, held_out = round_examples(model, processor, images, object_names, log_path,
                                                config, description, run if shared else made_with,
                                                round_index, clock.tick)
        # The Hallucination Elimination Adapter: fresh, zero; with it off the model is the teacher
        torch.manual_seed(config.seed * 7919 + round_index)  # its A, the same on every rerun
        params = adapter.add_adapter(model, rank=config.rank, alpha_r=config.alpha_r,
                                     targets=adapter.parse_targets(config.adapter_targets))
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        with autocast:  # the student before its first step is the base model
            void_at_start = held_out_void_mass(model, processor, images, held_out, config)
        first_step, log = start_step if round_index == start_round else 0, []
        if first_step:  # resume mid-round: adapter, moments, step, and the log of the steps done
            log = runs.load_checkpoint(model, optimizer, checkpoint)
        # Mode-seeking evolving: distil the purified teacher into the student (reverse KL)
        # each step's batch read and collated on a thread while the step before it computes
        batches = loading.prefetched(range(first_step, config.steps), lambda s: (
            s, seed.training_batch(examples, processor, images, config.batch_size, config.seed,
                                   round_index, s)))
        clock.start(plan.steps_phase(divergence, round_index))
        bar = tqdm(clock.timed(batches), f"SEED round {round_index} ({divergence} KL)",
                   initial=first_step, total=config.steps, disable=not config.progress)
        for step, batch in bar:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            generator = seed.step_generator(config.seed, round_index, step)
            loss, void = optimizer_step(model, batch, params, optimizer, divergence, config,
                                        generator, autocast)
            log.append({"step": step, "loss": loss, "void_mass": void})
            bar.set_postfix(loss=f"{loss:.4f}")
            done, every = step + 1, config.checkpoint_every
            if every and done % every == 0 and done < config.steps and distributed.is_main():
                runs.save_checkpoint(model, optimizer, checkpoint, round_index, done, made_with,
                                     log)
        with autocast:
            summary = {"round": round_index, "examples": len(examples),
                       "void_mass_at_start": void_at_start,
                       "void_mass": held_out_void_mass(model, processor, images, held_out, config),
                       "log": log}
        runs.finish_round(model, optimizer, round_dir, checkpoint, round_index, summary,
                          write=distributed.is_main(), made_with=made_with)  # saved, merged
        distributed.barrier()
        history.append(summary)
    return model, history


def start(config):
    """Seeds, the device (under torchrun: this process's GPU, or the CPU), progress bars on process
    0 only; returns (device, say), say printing on process 0 only."""
    process_device = distributed.start(config.dist_timeout)
    config.progress = config.progress and distributed.is_main()
    if not config.progress:  # transformers' own bars (loading, saving weights) go quiet too
        import transformers

        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = process_device or torch.device(auto if config.device == "auto" else config.device)
    return device, print if distributed.is_main() else (lambda *args, **kwargs: None)


def prepare_run(config, device, dtype, autocast, say):
    """Everything checked before any work, in this order, each refusal one line: the run's data
    (the toy world's, or the sampled --images files, each checked readable), the model loaded, and
    on a GPU one training step and one decoding pass at the longest batch (memory.fit: the
    micro-batch that fits). Then run.json is written to --out with the settings and the image
    sample (an earlier run replaced with --overwrite). The plan is printed before the model loads.
    Returns (data, model, processor, the plan's clock)."""
    sample, round_images = cli.sampled_images(config, say) if config.model else (None, None)
    run_data = cli.run_data(config, sample, round_images)
    distinct = len({image for names in run_data.image_sample for image in names})
    phases, text = plan.for_run(config, run_data.pope_files, len(run_data.round_images[0]),
                                distinct, len(run_data.chair_sample or []))
    say(text)  # before the first forward pass
    model, processor = cli.load_checked(run_data.model_path, device, dtype)

    def probe_loss(batch):  # a SEED step's loss, as self_evolve computes it
        with autocast:
            return step_loss(model, batch, "reverse", config, None)[0]

    try:
        every_image = [image for images in run_data.round_images for image in images]
        config.micro_batch_size = memory.fit(model, processor, every_image, run_data.object_names,
                                             run_data.description, config, probe_loss, say)
    except memory.DoesNotFit as refusal:
        cli.fail(str(refusal))
    claim = cli.claim_out(config)  # one run an --out: another one writing it is refused
    if distributed.is_main():
        cli.start_run(config, run_data.image_sample)
    distributed.barrier()
    return run_data, model, processor, plan.Clock(phases, say), claim


def show_plan(config):
    """--plan: the run's plan from its flags and its data's sizes; no weights are loaded, nothing is
    written to --out (the toy world writes its POPE images to its cache)."""
    if config.model:
        pope_files, files = cli.pope_files_in(config.pope), len(cli.image_names_in(config.images))
    else:
        import toyworld

        world_config = toyworld.WorldConfig(world_seed=config.world_seed,
                                            steps=config.pretrain_steps)
        world = toyworld.make_world(world_config.world_seed, world_config.n_classes)
        pope_files, files = toyworld.eval_set(config.eval_images, world, world_config)[0], None
    per_round, distinct = cli.sample_sizes(config, files)  # a folder holds only so many
    chair = 0
    if config.chair_images:
        import eval_chair

        chair = len(eval_chair.sample_images(config.chair_images, config.chair_count))
    print(plan.for_run(config, pope_files, per_round, distinct, chair)[1])


def main(argv=None):
    config = cli.parse_config(argv, description=__doc__)
    if config.plan:
        return show_plan(config)
    device, say = start(config)
    # bf16 weights and autocast on a GPU (one copy of the weights: the teacher is the adapter off);
    # float32 on the CPU, where bf16 is slow and the toy model is tiny
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    data, model, processor, clock, claim = prepare_run(config, device, dtype, autocast, say)
    try:
        return evaluate_and_evolve(config, data, model, processor, clock, device, dtype, autocast,
                                   say)
    finally:
        claim.close()  # --out free for a --resume


def evaluate_and_evolve(config, data, model, processor, clock, device, dtype, autocast, say):
    """The work: POPE (and CHAIR) on the base model and VCD decoding, SEED self-evolved with each
    divergence and measured, every row's answer cost, the table; returns results.json's
    contents."""
    say(f"device {device}, dtype {dtype}; model {data.model_path}; "
        f"{len(data.round_images[0])} unlabeled images a round; POPE splits "
        f"{list(data.pope_files)}; {distributed.world_size()} process(es)")
    results = {"config": dataclasses.asdict(config)}
    results_path = os.path.join(config.out, "results.json")
    save = lambda: distributed.is_main() and runs.write_json(results_path, results, indent=2)
    load = lambda: models.load_model(data.model_path, device, dtype)

    def measure(method, model, processor, contrast=False):  # POPE, CHAIR
        with autocast:
            results[method] = report.measure(model, processor, data, config, method, contrast,
                                             clock)
        save()

    # ---- the base model and VCD decoding on it ---------------------------------------------------
    report.prior_diagnostic(model, processor, data, config, results, say)  # what distortion leaves
    measure("base", model, processor)
    report.partner_share(data, config, results, say)  # where the base model's hallucinations are
    measure("vcd", model, processor, contrast=True)

    # ---- SEED: self-evolve a fresh copy of the base model with each divergence -------------------
    both = config.divergence == "both"
    divergences = ["forward", "reverse"] if both else [config.divergence]
    for divergence in divergences:
        method = f"seed_{divergence}"
        model, processor = load()
        model, history = self_evolve(model, processor, data.round_images, data.object_names,
                                     os.path.join(config.out, method), config, divergence,
                                     data.description, autocast,
                                     first_examples=os.path.join(config.out, "base",
                                                                 "examples.jsonl"), clock=clock)
        # the product: the merged model as an ordinary checkpoint (the adapters are in round<r>/)
        if distributed.is_main():
            runs.save_merged(model, processor, os.path.join(config.out, method, "merged"))
        measure(method, model, processor)
        results[method].update(report.round_figures(history))
        save()
        if divergence == "reverse":  # VCD decoding on the SEED model: do the two stack?
            measure("seed_reverse_vcd", model, processor, contrast=True)

    if distributed.is_main():  # every row's answer cost on one copy of the weights; the table
        with autocast:
            report.time_rows(*load(), data, divergences, config, results)
        save()
        report.show(results, data, config.out)  # the table, results.png and scenes.png
    distributed.stop()
    return results


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--overwrite"]
    again = "python train.py " + " ".join(argv + ([] if "--resume" in argv else ["--resume"]))
    try:
        main()
    except KeyboardInterrupt:  # what was written is kept: answers, examples, the checkpoint
        sys.exit("\nstopped: the answers and examples written so far, and the last checkpoint "
                 "(every --checkpoint-every steps), are kept in --out; to continue: " + again)
    except OSError as error:  # a full disk, a read-only folder: one line, nothing half-written
        sys.exit(f"train.py: error: {cli.write_failure(error)}; to continue: {again}")
