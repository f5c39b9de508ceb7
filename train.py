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
import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import adapter
import decode
import distributed
import eval_pope
import losses
import purge
import seed

COCO_OBJECTS = [name.replace("_", " ") for name in (  # 80 names, some of two words
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush").split()]


# The table's rows, in its order: the base model, VCD decoding on it (two passes a token), SEED with
# each divergence (one pass), and VCD decoding on the reverse-KL SEED model (two passes; the next
# round's teacher): whether the two stack.
METHODS = {"base": "base", "vcd": "VCD decoding", "seed_forward": "SEED forward KL", "seed_reverse": "SEED reverse KL",
           "seed_reverse_vcd": "SEED + VCD"}


@dataclass
class Config:
    model: str = field(default=None, metadata={"help": "local LLaVA-1.5 / InternVL / Qwen2-VL checkpoint in "
                                                       "transformers form; none: the built-in toy world (ours)"})
    images: str = field(default=None, metadata={"help": "folder of unlabeled images for SEED (with --model)"})
    pope: str = field(default=None, metadata={"help": "folder holding *_pope_{random,popular,adversarial}.json"})
    pope_images: str = field(default=None, metadata={"help": "folder of the POPE questions' images"})
    objects: str = field(default=None, metadata={"help": "text file, one object name a line, to probe on the "
                                                         "unlabeled images (default: the 80 COCO classes)"})
    world_seed: int = field(default=0, metadata={"help": "toy world: which world (classes, glyphs, partners)"})
    pretrain_steps: int = field(default=2400, metadata={"help": "toy world: pretraining steps of the base model"})
    shipped_base: bool = field(default=True, metadata={"help": "default world: start from the base model shipped in "
                                                               "toyworld_base/ (--no-shipped-base pretrains it here, "
                                                               "into the cache, as every other world is)"})
    seed: int = field(default=0, metadata={"help": "seed of everything else (adapter init, batches, noise)"})
    rounds: int = field(default=1, metadata={"help": "self-evolution rounds (METHOD.md 5; paper: 1)"})
    steps: int = field(default=600, metadata={"help": "SEED optimiser steps per round (ours)"})
    loss: str = field(default="both", metadata={"help": "reverse (SEED), forward (classic KD) or both (the "
                                                        "paper's ablation)", "choices": ["both", "reverse", "forward"]})
    teacher: str = field(default="recorded", metadata={
        "help": "recorded: distil the purified teacher recorded while the examples were made (the student's "
                "pass alone; measured in docs/EXPERIMENTS.md); online: the teacher's clean and distorted passes "
                "every step, fresh noise each",
        "choices": ["recorded", "online"]})
    batch_size: int = field(default=32, metadata={"help": "SEED examples per step (ours)"})
    lr: float = field(default=2e-3, metadata={"help": "adapter learning rate, AdamW (ours)"})
    rank: int = field(default=8, metadata={"help": "adapter rank r (ours, LoRA's common value)"})
    adapter_alpha: float = field(default=16.0, metadata={"help": "adapter scale alpha_r; update = alpha_r / r B A"})
    alpha: float = field(default=purge.ALPHA, metadata={"help": "contrast strength: c = (1 + alpha) z - alpha z' (VCD)"})
    beta: float = field(default=purge.BETA, metadata={"help": "plausibility cut: keep p >= beta p_max (VCD)"})
    noise_step: int = field(default=None, metadata={"help": "diffusion step k of the distortion, 0..999; none: VCD's "
                                                            "500 with --model, toyworld.NOISE_STEP (700) on the toy world"})
    void_eps: float = field(default=1e-4, metadata={"help": "reverse KL: floor on the purified teacher's void "
                                                            "probabilities; student mass on a void costs log(1/eps) "
                                                            "nats each (ours; losses.reverse_kl's default is 1e-8)"})
    unlabeled: int = field(default=400, metadata={"help": "toy world: unlabeled images for SEED"})
    probes_per_image: int = field(default=6, metadata={"help": "yes/no probes the model answers per unlabeled image"})
    description_tokens: int = field(default=24, metadata={"help": "length limit of the model's purified descriptions "
                                                                  "of the unlabeled images (ours)"})
    eval_images: int = field(default=250, metadata={"help": "toy world: held-out POPE images (6 questions each)"})
    sample_seeds: int = field(default=3, metadata={"help": "seeds for sampled decoding (mean and spread)"})
    eval_batch_size: int = field(default=64, metadata={"help": "questions per forward pass in evaluation"})
    checkpoint_every: int = field(default=50, metadata={"help": "write adapter + optimiser every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out (made with the same settings: "
                                                        "refused otherwise), keeping its answers, examples and "
                                                        "checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run in --out (without it, and "
                                                           "without --resume, such an --out is refused)"})
    skip_unreadable: bool = field(default=False, metadata={"help": "leave unreadable files of --images out (and say "
                                                                   "how many) instead of refusing to start"})
    out: str = field(default="out", metadata={"help": "where answers, adapters and results.json go"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when there is one)"})
    progress: bool = field(default=True, metadata={"help": "tqdm bars (--no-progress to silence them)"})
    dist_timeout: int = field(default=30, metadata={"help": "under torchrun: minutes a process waits on the others "
                                                            "before the job fails instead of hanging"})


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + f" (default: {f.default})",
                                choices=f.metadata.get("choices"))
    args = parser.parse_args(argv)
    if args.noise_step is None:  # glyphs on a flat background survive more noise than photographs
        import toyworld

        args.noise_step = purge.NOISE_STEP if args.model else toyworld.NOISE_STEP
    problem = check_config(args)
    if problem:  # before any work starts, in one line naming the flag or the file
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return Config(**vars(args))


def pope_files_in(folder):
    """{split: path} of the *_pope_{split}.json files in a folder, in the table's order (random, popular, adversarial)."""
    names = sorted(os.listdir(folder))
    return {s: os.path.join(folder, n) for s in eval_pope.SPLITS for n in names if n.endswith(f"_pope_{s}.json")}


def image_names_in(folder):
    """The image files of a folder (.jpg, .jpeg, .png), sorted."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))


# Flags that change no answer, example or adapter: a resumed run may change them (the rest are content_settings)
NOT_CONTENT = ("resume", "overwrite", "skip_unreadable", "out", "device", "progress", "dist_timeout",
               "eval_batch_size", "checkpoint_every", "loss", "sample_seeds")
PATH_FLAGS = ("model", "images", "pope", "pope_images", "objects")
EARLIER_RUN = ("run.json", "results.json", "base", "vcd", "seed_forward", "seed_reverse")


def content_settings(config):
    """The settings a run's files are made with, as run.json records them (paths absolute)."""
    settings = {k: v for k, v in vars(config).items() if k not in NOT_CONTENT}
    return {k: os.path.abspath(v) if k in PATH_FLAGS and v else v for k, v in settings.items()}


def check_config(args):
    """The first thing wrong with the flags or the paths they name, as one sentence; None if all is well."""
    at_least = {"pretrain_steps": 1, "rounds": 1, "steps": 1, "batch_size": 1, "rank": 1, "unlabeled": 1,
                "probes_per_image": 0, "description_tokens": 1, "eval_images": 1, "sample_seeds": 1,
                "eval_batch_size": 1, "checkpoint_every": 0, "dist_timeout": 1}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}"
    processes = distributed.launched_processes()
    if args.batch_size < processes:
        return f"--batch-size {args.batch_size} is the global batch: at least one row per process ({processes})"
    problem = (eval_pope.out_of_range("--noise-step", args.noise_step, 0, purge.NUM_DIFFUSION_STEPS - 1)
               or eval_pope.out_of_range("--alpha", args.alpha, low=0)
               or eval_pope.out_of_range("--beta", args.beta, 0, 1, above=True)
               or eval_pope.out_of_range("--void-eps", args.void_eps, 0, 1, above=True, below=True)
               or eval_pope.out_of_range("--lr", args.lr, low=0, above=True)
               or eval_pope.out_of_range("--adapter-alpha", args.adapter_alpha, low=0, above=True)
               or eval_pope.output_problem("--out", args.out, folder=True))
    if problem:
        return problem
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        return f"--device {args.device}: no such device here (cpu, cuda when there is one, or auto)"
    if args.resume and args.overwrite:
        return "--resume continues the run in --out, --overwrite replaces it: give one"
    return (check_model_flags(args) or earlier_run_problem(args)) if args.model else (
        toy_world_flags_problem(args) or earlier_run_problem(args))


def toy_world_flags_problem(args):
    given = [f"--{name.replace('_', '-')}" for name in ("images", "pope", "pope_images", "objects")
             if getattr(args, name)]
    if given:
        return f"{given[0]} is for a real run (--model); the toy world brings its own images, questions and objects"
    return None


def earlier_run_problem(args):
    """Why the run may not start in --out: an earlier run there that --resume would mix with other settings,
    or one that a fresh run would replace without --overwrite. Under torchrun process 0 alone looks (the
    others could see the run.json it has just written), and its refusal ends the job."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    run_file = os.path.join(args.out, "run.json")
    earlier = [n for n in EARLIER_RUN if os.path.exists(os.path.join(args.out, n))]
    if args.resume and earlier:
        if not os.path.isfile(run_file):
            return f"--resume: {args.out} holds a run that does not say what it was made with (no run.json)"
        with open(run_file) as f:
            recorded = json.load(f)["settings"]
        difference = eval_pope.first_difference(recorded, content_settings(args))
        if difference:
            flag, old, new = difference
            return (f"--resume: {args.out} was made with --{flag.replace('_', '-')} {old}, this run has {new}: give "
                    f"the same flags, or another --out")
    if earlier and not args.resume and not args.overwrite:
        return (f"--out {args.out} holds an earlier run ({', '.join(earlier)}): --resume continues it, --overwrite "
                f"replaces it, or choose another --out")
    return None


def check_model_flags(args):
    """A real run's flags and files (--model, --images, --pope, --pope-images, --objects)."""
    if not (args.images and args.pope and args.pope_images):
        return "--model needs --images, --pope and --pope-images (no data is downloaded)"
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model}: not a local checkpoint folder (no config.json; nothing is downloaded)"
    if not any(os.path.isfile(os.path.join(args.model, n)) for n in ("processor_config.json",
                                                                      "preprocessor_config.json")):
        return f"--model {args.model}: no processor in the folder (processor_config.json or preprocessor_config.json)"
    if args.objects and not os.path.isfile(args.objects):
        return f"--objects {args.objects}: no such file"
    for flag, folder in (("--images", args.images), ("--pope", args.pope), ("--pope-images", args.pope_images)):
        if not os.path.isdir(folder):
            return f"{flag} {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder")
    if not image_names_in(args.images):
        return f"--images {args.images}: no .jpg, .jpeg or .png files"
    pope_files = pope_files_in(args.pope)
    missing = [s for s in eval_pope.SPLITS if s not in pope_files]
    if missing:
        return f"--pope {args.pope}: no *_pope_{missing[0]}.json (POPE's three files are needed: {eval_pope.SPLITS})"
    test_images = set()
    for path in pope_files.values():
        try:
            questions = eval_pope.load_questions(path, labelled=True)
        except ValueError as error:  # already names the file and the line
            return str(error)
        problem = eval_pope.image_problem(questions, path, args.pope_images)  # quietly: one line if it fails
        if problem:  # missing or unreadable, with the question file's line
            return problem.replace(f" is not in {args.pope_images} ", f" is not in --pope-images {args.pope_images} ")
        test_images |= {q["image"] for q in questions}
    overlap = sorted(test_images & set(image_names_in(args.images)))
    if overlap:  # SEED would train on the very photos POPE tests on
        return (f"--images {args.images}: {len(overlap)} of its files are POPE test images ({overlap[0]}, ...): "
                f"SEED would train on the test set; take them out of --images")
    return None


def run_fingerprint(config):
    """The run's content settings in 16 hex digits: what its answers files record (run.json has them all)."""
    import hashlib

    return hashlib.sha256(json.dumps(content_settings(config), sort_keys=True).encode()).hexdigest()[:16]


def start_run(config):
    """--out for this run: an earlier run in it removed (--overwrite, said aloud; check_config refused it
    otherwise), and run.json written with the settings a --resume must match."""
    if config.overwrite:
        earlier = [n for n in EARLIER_RUN if os.path.exists(os.path.join(config.out, n))]
        if earlier:
            print(f"--overwrite: replacing the earlier run in {config.out} ({', '.join(earlier)})")
        for name in earlier:
            path = os.path.join(config.out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(config.out, exist_ok=True)
    tmp = os.path.join(config.out, "run.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"settings": content_settings(config)}, f, indent=1)
    os.replace(tmp, os.path.join(config.out, "run.json"))


def readable_images(config, say=print):
    """The --images files, each checked readable before the first forward pass: an unreadable one stops
    the run in one line naming it (or, with --skip-unreadable, is left out and counted)."""
    paths = [os.path.join(config.images, n) for n in image_names_in(config.images)]
    bad = eval_pope.unreadable_images(paths, progress=config.progress, desc="checking --images")
    if bad and not config.skip_unreadable:  # exit status 2, as for the other refusals
        print(f"train.py: error: --images: cannot read {bad[0][0]} ({bad[0][1]}); {len(bad)} of {len(paths)} files "
              f"unreadable: remove them, or --skip-unreadable to leave them out", file=sys.stderr)
        raise SystemExit(2)
    if bad:
        say(f"--skip-unreadable: left out {len(bad)} of {len(paths)} --images files ({bad[0][0]}, ...)")
        paths = [p for p in paths if p not in {b for b, _ in bad}]
    return paths


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
    made_with = {"run": run_fingerprint(config), "divergence": divergence}  # recorded by every file it appends to
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


def evaluate(model, processor, pope_files, image_dir, answers_dir, config, decodings=("greedy", "sample"),
             contrast=False):
    """POPE metrics: {decoding: {split: metrics}}; sampled decodings are the mean over seeds, with f1_std.
    Answer files already in answers_dir are resumed (made with the same run's settings: refused otherwise)."""
    results = {}
    for decoding in decodings:
        name = ("vcd-greedy" if decoding == "greedy" else "vcd") if contrast else decoding
        seeds = range(config.sample_seeds) if decoding == "sample" else [0]
        results[decoding] = {}
        for split, question_file in pope_files.items():
            runs = []
            for s in seeds:
                path = os.path.join(answers_dir, f"{name}_{split}_seed{s}.jsonl")  # resumed if it exists
                # VCD contrasts with the flags' alpha, beta and noise step, the same contrast as SEED's teacher
                eval_pope.answer_questions(model, processor, question_file, image_dir=image_dir, out_path=path,
                                           made_with={"run": run_fingerprint(config)},
                                           decoding=name, batch_size=config.eval_batch_size, seed=s, max_new_tokens=4,
                                           progress=config.progress,
                                           **(eval_pope.contrast_settings(config) if contrast else {}))
                runs.append(eval_pope.score_files(question_file, path))
            metrics = {k: statistics.mean(r[k] for r in runs) for k in ("accuracy", "precision", "recall", "f1",
                                                                           "yes_ratio")}
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
    inputs = decode.prompt_batch(processor, images, [q["text"] + eval_pope.PROMPT_SUFFIX for q in questions],
                                    device)
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
            # Always 4 new tokens (no early stop), so every row does the same amount of decoding work.
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


def main(argv=None):
    config = parse_config(argv)
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
    unlabeled = readable_images(config, say) if config.model else None  # each decoded once, before any work
    if main_process:
        start_run(config)  # --out: the earlier run replaced (--overwrite), this run's settings recorded
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
        pope_files = pope_files_in(config.pope)
        object_names = (open(config.objects).read().split("\n") if config.objects else list(COCO_OBJECTS))
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
            pope = evaluate(model, processor, pope_files, image_dir=image_dir, answers_dir=answers_dir, config=config,
                            contrast=contrast)
            if caption_set is not None:
                pope["captions"] = caption_hallucination(model, processor, *caption_set, contrast=contrast,
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
        rows[f"seed_{divergence}"] = (merged_weights(model, [os.path.join(config.out, f"seed_{divergence}", f"round{r}")
                                                       for r in range(config.rounds)]), False)
    if "seed_reverse" in rows:
        rows["seed_reverse_vcd"] = (rows["seed_reverse"][0], True)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        costs = answer_costs(model, processor, pope_files["random"], image_dir=image_dir,
                             batch_size=config.eval_batch_size, rows=rows)
    for method, seconds in costs.items():
        results[method]["seconds_per_answer"] = seconds
    save_results()

    # ---- the table and the pictures -------------------------------------------------------------
    print(format_results(results, list(pope_files)))
    draw_pictures(results, list(pope_files), pope_files=pope_files, image_dir=image_dir, out=config.out)
    print(f"\nall numbers: {os.path.join(config.out, 'results.json')}; pictures: results.png, scenes.png")
    distributed.stop()
    return results


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
    answers = {m: {a["question_id"]: eval_pope.parse_answer(a["text"]) for a in eval_pope.read_answers(
        os.path.join(out, m, "answers", f"greedy_{split}_seed0.jsonl"))} for m in ("base", seeds[-1])}
    differ = [i for i in sorted(questions) if answers["base"][i] != answers[seeds[-1]][i]]
    ids = sorted(differ[:6] + [i for i in sorted(questions) if i not in differ][:8 - len(differ[:6])])
    cards = [(decode.open_image(os.path.join(image_dir, questions[i]["image"])), questions[i]["text"],
              questions[i].get("label"), answers["base"][i], answers[seeds[-1]][i]) for i in ids]
    pictures.scene_sheet(cards, os.path.join(out, "scenes.png"),
                         title=f"POPE {split}, greedy: {len(differ)} of {len(questions)} answers differ between the base "
                               f"model and {METHODS[seeds[-1]]}; the first six of them, and two where they agree")


def caption_hallucination(model, processor, image_dir, objects_by_image, object_names, contrast=False, batch_size=64,
                          **contrast_options):
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
        inputs = decode.prompt_batch(processor, images, ["Describe the image."] * len(chunk), device)
        generators = [decode.seeded_generator(0, start + i) for i in range(len(chunk))]
        ids = decode.generate(model, inputs, 24, contrast=contrast, generators=generators,
                                 eos_token_id=processor.tokenizer.eos_token_id,
                                 suppress_token_ids=decode.placeholder_token_ids(model, processor), **contrast_options)
        for name, row in zip(chunk, ids):
            mentioned = seed.mentions(processor.tokenizer.decode(row, skip_special_tokens=True), object_names)
            hallucinated = [o for o in mentioned if o not in objects_by_image[name]]
            mentioned_total += len(mentioned)
            hallucinated_total += len(hallucinated)
            captions_with_any += bool(hallucinated)
    # under torchrun each process described every P-th batch: add the counts up
    mentioned_total, hallucinated_total, captions_with_any = (
        distributed.sum_value(n) for n in (mentioned_total, hallucinated_total, captions_with_any))
    return {"chair_i": hallucinated_total / max(mentioned_total, 1), "chair_s": captions_with_any / len(names)}


def format_results(results, splits):
    """One table: per split F1 and yes-ratio (greedy) and F1 (sampled, mean ± std), then the side figures."""
    methods = [m for m in METHODS if m in results]
    cell = 28  # F1 greedy (7) + yes-ratio (7) + F1 sampled (14)
    head = f"{'POPE %':<16}" + "".join(f"{s:>{cell}}" for s in splits) + f"{'CHAIRi':>8}{'CHAIRs':>8}{'void':>8}{'cost':>6}"
    sub = f"{'':<16}" + f"{'F1':>7}{'yes':>7}{'F1 sampled':>14}" * len(splits) + f"{'%':>8}{'%':>8}{'mass %':>8}{'x':>6}"
    lines = [head, sub]
    base_cost = results["base"]["seconds_per_answer"]
    # The base model's void mass: the student before its first step, measured by each SEED run.
    start_void = next((results[m]["void_mass_at_start"][0] for m in methods if results[m].get("void_mass_at_start")),
                      None)
    for m in methods:
        r = results[m]
        row = f"{METHODS[m]:<16}"
        for s in splits:
            g, sampled = r["greedy"][s], r["sample"][s]
            row += f"{100 * g['f1']:>7.1f}{100 * g['yes_ratio']:>7.1f}{100 * sampled['f1']:>8.1f} ±{100 * sampled['f1_std']:>4.1f}"
        c = r.get("captions")
        row += f"{100 * c['chair_i']:>8.1f}{100 * c['chair_s']:>8.1f}" if c else f"{'-':>8}{'-':>8}"
        void = r["void_mass"][-1] if r.get("void_mass") else start_void if m == "base" else None
        row += f"{100 * void:>8.2f}" if void is not None else f"{'-':>8}"
        row += f"{r['seconds_per_answer'] / base_cost:>6.2f}"
        lines.append(row)
    lines.append("F1 / yes: greedy decoding. F1 sampled: temperature 1, top-p 1, mean ± std over seeds. CHAIR: share of "
                 "object mentions in held-out descriptions (i, every mention) / of descriptions (s) that are hallucinated.\nvoid mass: "
                 "student probability on the purified teacher's voids (held-out SEED prompts; base = the student "
                 "at step 0).\ncost: seconds per POPE answer relative to base (median of timed batches).")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # what was written is kept: answers and examples per batch, the checkpoint
        argv = [a for a in sys.argv[1:] if a != "--overwrite"]
        sys.exit("\nstopped: the answers and examples written so far, and the last checkpoint (every "
                 "--checkpoint-every steps), are kept in --out; to continue: python train.py "
                 + " ".join(argv + ([] if "--resume" in argv else ["--resume"])))
