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
import losses
import models
import report
import runs
import seed


def round_examples(model, processor, images, object_names, round_dir, config, description,
                   made_with, round_index):
    """Identify, isolate, purge: the model's own purified answers on the unlabeled images (no labels
    read), appended to the round's examples log as they are made (--resume continues it). Returns
    (training examples, held-out examples)."""
    if distributed.is_main():
        os.makedirs(round_dir, exist_ok=True)
    distributed.barrier()
    settings = dict(probes_per_image=config.probes_per_image, description=description,
                    max_new_tokens=config.description_tokens,
                    random_seed=config.seed + round_index, **eval_pope.contrast_options(config))
    log_made_with = {**seed.example_settings(images, **settings), **made_with, "round": round_index}
    answer = runs.examples_log(os.path.join(round_dir, "examples.jsonl"), log_made_with,
                               batch_size=config.batch_size, progress=config.progress)
    examples = seed.make_examples(model, processor, images, object_names,
                                  batch_size=config.batch_size, answer=answer, **settings)
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


def held_out_void_mass(model, processor, images, held_out, config):
    """The student's mass on the held-out teacher's voids (recorded, or online with fresh noise)."""
    return report.held_out_void_mass(model, processor, images, held_out, config.batch_size,
                                     noise_seed=config.seed, recorded=config.teacher == "recorded",
                                     **eval_pope.contrast_options(config))


def self_evolve(model, processor, images, object_names, out_dir, config, divergence, description,
                autocast=contextlib.nullcontext()):
    """SEED's rounds of self-evolution on `model`, in place (METHOD.md 3-5): returns it merged and a
    log per round; config.resume continues from <out_dir>/checkpoint as if it never stopped."""
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = os.path.join(out_dir, "checkpoint")
    # recorded by every file it appends to
    made_with = {"run": cli.run_fingerprint(config), "divergence": divergence}
    start_round, start_step = runs.resume_point(checkpoint, made_with) if config.resume else (0, 0)
    history = []
    for round_index in range(config.rounds):
        round_dir = os.path.join(out_dir, f"round{round_index}")
        if round_index < start_round:  # finished before a crash: replay its merge and its summary
            history.append(runs.replay_round(model, round_dir))
            continue
        model.eval()  # no dropout: teacher and student differ by the adapter alone
        with autocast:
            examples, held_out = round_examples(model, processor, images, object_names, round_dir,
                                                config, description, made_with, round_index)
        # The Hallucination Elimination Adapter: fresh, zero; with it off the model is the teacher
        torch.manual_seed(config.seed * 7919 + round_index)  # its A, the same on every rerun
        params = adapter.add_adapter(model, rank=config.rank, alpha_r=config.alpha_r)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        with autocast:  # the student before its first step is the base model
            void_at_start = held_out_void_mass(model, processor, images, held_out, config)
        first_step = start_step if round_index == start_round else 0
        if first_step:  # resume mid-round: adapter, moments, step
            runs.load_checkpoint(model, optimizer, checkpoint)
        log = []  # Mode-seeking evolving: distil the purified teacher into the student (reverse KL)
        bar = tqdm(range(first_step, config.steps), f"SEED round {round_index} ({divergence} KL)",
                   initial=first_step, total=config.steps, disable=not config.progress)
        for step in bar:
            batch = seed.training_batch(examples, processor, images, config.batch_size, config.seed,
                                        round_index, step, model.device)
            generator = seed.step_generator(config.seed, round_index, step)
            # under torchrun: this process's rows, and their share of the batch's response positions
            noise_step = None if config.teacher == "recorded" else config.noise_step
            batch, share = distributed.process_rows(model, batch, noise_step, generator)
            with autocast:
                loss, void = step_loss(model, batch, divergence, config, generator)
            # the batch's mean loss and void mass: each process's share, summed over the processes
            log.append({"step": step, "loss": distributed.sum_value(loss.item() * share),
                        "void_mass": distributed.sum_value(void.item() * share)})
            optimizer.zero_grad(set_to_none=True)
            (loss * share).backward()
            distributed.sum_gradients(params)  # the one-process gradient of the whole batch
            optimizer.step()
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            done, every = step + 1, config.checkpoint_every
            if every and done % every == 0 and done < config.steps and distributed.is_main():
                runs.save_checkpoint(model, optimizer, checkpoint, round_index, done, made_with)
        with autocast:
            summary = {"round": round_index, "examples": len(examples),
                       "void_mass_at_start": void_at_start,
                       "void_mass": held_out_void_mass(model, processor, images, held_out, config)}
        runs.finish_round(model, optimizer, round_dir, checkpoint, round_index, summary,
                          write=distributed.is_main(), made_with=made_with)  # saved, merged
        distributed.barrier()
        history.append({**summary, "log": log})
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


def prepare_run(config, say):
    """Every --images file checked readable before any work (paths, not pixels: each batch reads its
    own), run.json written to --out (an earlier run replaced with --overwrite); returns the data."""
    unlabeled = cli.readable_images(config, say) if config.model else None
    if distributed.is_main():
        cli.start_run(config)
    distributed.barrier()
    return cli.run_data(config, unlabeled)


def main(argv=None):
    config = cli.parse_config(argv, description=__doc__)
    device, say = start(config)
    # bf16 weights and autocast on a GPU (one copy of the weights: the teacher is the adapter off);
    # float32 on the CPU, where bf16 is slow and the toy model is tiny
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    data = prepare_run(config, say)  # the toy world's data, or what the flags name
    say(f"device {device}, dtype {dtype}; model {data.model_path}; {len(data.unlabeled)} unlabeled "
        f"images; POPE splits {list(data.pope_files)}; {distributed.world_size()} process(es)")
    results = {"config": dataclasses.asdict(config)}
    results_path = os.path.join(config.out, "results.json")
    save = lambda: distributed.is_main() and runs.write_json(results_path, results, indent=2)
    load = lambda: models.load_model(data.model_path, device, dtype)

    def measure(method, model, processor, contrast=False):  # POPE (and CHAIR on the toy world)
        with autocast:
            answers_dir = os.path.join(config.out, method, "answers")
            results[method] = report.measure(model, processor, data, answers_dir, config, contrast)
        save()

    # ---- the base model and VCD decoding on it ---------------------------------------------------
    model, processor = load()
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
        model, history = self_evolve(model, processor, data.unlabeled, data.object_names,
                                     os.path.join(config.out, method), config, divergence,
                                     data.description, autocast)
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
    try:
        main()
    except KeyboardInterrupt:  # what was written is kept: answers, examples, the checkpoint
        argv = [a for a in sys.argv[1:] if a != "--overwrite"]
        sys.exit("\nstopped: the answers and examples written so far, and the last checkpoint "
                 "(every --checkpoint-every steps), are kept in --out; to continue: python "
                 "train.py " + " ".join(argv + ([] if "--resume" in argv else ["--resume"])))
