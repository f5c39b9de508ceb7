"""train.py's command line: the Config of a run, its flags, and every check made before any work.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680; the settings are METHOD.md's (sections 1-6) and ours. Each
refusal is one sentence naming the flag or the file (and its line), returned before anything is
written; `run.json` records the settings a run's files are made with, which `--resume` must match.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch

import distributed
import eval_pope
import loading
import purge
import runs


def setting(default, text, choices=None, former_name=None):
    """A Config field: its default, its --help text, the choices of a choice, and the flag it had
    before a rename (still accepted, so that older commands run unchanged)."""
    return field(default=default, metadata={"help": text, "choices": choices,
                                            "former_name": former_name})


@dataclass
class Config:
    model: str = setting(None, "local LLaVA-1.5 / InternVL / Qwen2-VL checkpoint in transformers "
                               "form; none: the built-in toy world (ours)")
    images: str = setting(None, "folder of unlabeled images for SEED (with --model)")
    pope: str = setting(None, "folder holding *_pope_{random,popular,adversarial}.json")
    pope_images: str = setting(None, "folder of the POPE questions' images")
    objects: str = setting(None, "text file, one object name a line, to probe on the unlabeled "
                                 "images (default: the 80 COCO classes)")
    world_seed: int = setting(0, "toy world: which world (classes, glyphs, partners)")
    pretrain_steps: int = setting(2400, "toy world: pretraining steps of the base model")
    shipped_base: bool = setting(True, "default world: start from the base model shipped in "
                                       "toyworld_base/ (--no-shipped-base pretrains it here, into "
                                       "the cache, as every other world is)")
    seed: int = setting(0, "seed of everything else (adapter init, batches, noise)")
    rounds: int = setting(2, "self-evolution rounds, each from the model the last one merged "
                             "(METHOD.md 5; ours: 2, measured in docs/EXPERIMENTS.md)")
    steps: int = setting(600, "SEED optimiser steps per round (ours)")
    divergence: str = setting("both", "reverse KL (SEED), forward KL (classic KD) or both (the "
                                      "paper's ablation)", choices=["both", "reverse", "forward"],
                              former_name="--loss")
    teacher: str = setting("recorded", "recorded: distil the purified teacher recorded while the "
                                       "examples were made (the student's pass alone; measured in "
                                       "docs/EXPERIMENTS.md); online: the teacher's clean and "
                                       "distorted passes every step, fresh noise each",
                                       choices=["recorded", "online"])
    batch_size: int = setting(32, "SEED examples per step (ours)")
    micro_batch_size: int = setting(0, "rows per forward and backward pass of a step; their "
                                       "gradients add up to the whole batch's, so it changes no "
                                       "result and a resumed run may change it. 0: the largest "
                                       "that fits (on a GPU, found by trying the longest batch "
                                       "before any work; on the CPU the whole batch)")
    gradient_checkpointing: bool = setting(False, "recompute each decoder layer's activations in "
                                                  "the backward instead of keeping them: a layer "
                                                  "keeps 8 KB a token instead of 172 (LLaVA-7B), "
                                                  "for one more forward pass of the student a "
                                                  "step")
    lr: float = setting(5.7e-4, "adapter learning rate, AdamW (ours: 2e-3 x (8 / rank) x (2 / "
                                "adapted layers a decoder layer) holds the adapter's step at that "
                                "of rank 8 on q_proj, v_proj at 2e-3; 5.7e-4 for rank 8 on all 7 "
                                "layers, docs/EXPERIMENTS.md)")
    rank: int = setting(8, "adapter rank r (ours, LoRA's common value)")
    alpha_r: float = setting(16.0, "adapter scale alpha_r; update = alpha_r / r B A",
                             former_name="--adapter-alpha")
    adapter_targets: str = setting("all-linear", "the language model's linear layers the adapter "
                                   "wraps, by name, comma-separated; short forms: attention (q, "
                                   "k, v, o_proj), mlp (gate, up, down_proj), all-linear (every "
                                   "one: measured against q_proj,v_proj in docs/EXPERIMENTS.md)")
    alpha: float = setting(purge.ALPHA, "contrast strength: c = (1 + alpha) z - alpha z' (VCD)")
    beta: float = setting(purge.BETA, "plausibility cut: keep p >= beta p_max (VCD)")
    noise_step: int = setting(None, "diffusion step k of the distortion, 0..999; none: VCD's 500 "
                                    "with --model, toyworld.NOISE_STEP (700) on the toy world")
    void_eps: float = setting(1e-4, "reverse KL: floor on the purified teacher's void "
                                    "probabilities; student mass on a void costs log(1/eps) nats "
                                    "each (ours; losses.reverse_kl's default is 1e-8)")
    images_per_round: int = setting(None, "unlabeled images each round makes its examples from; "
                                    "none: with --model, what the round's training draws, "
                                    "ceil(steps x batch size / (1 + probes per image) / 0.95), "
                                    "0.95 for the held-out twentieth (2,888 at the defaults); on "
                                    "the toy world 400 (ours, docs/EXPERIMENTS.md)",
                                    former_name="--unlabeled")
    fresh_images: bool = setting(True, "each round takes images no earlier round took, while "
                                        "there are any (--no-fresh-images: every round the same "
                                        "sample)")
    probes_per_image: int = setting(6, "yes/no probes the model answers per unlabeled image")
    description_tokens: int = setting(24, "length limit of the model's purified descriptions of "
                                          "the unlabeled images (ours)")
    chair_annotations: str = setting(None, "with --model: folder of COCO's instances_*2014.json "
                                           "and captions_*2014.json; with --chair-images, CHAIR "
                                           "on every row (eval_chair.py's rules)")
    chair_images: str = setting(None, "with --model: the COCO val2014 images CHAIR's "
                                      "descriptions are of")
    chair_count: int = setting(500, "images described for CHAIR, drawn with --seed (OPERA's 500)")
    chair_tokens: int = setting(512, "length limit of a CHAIR description (OPERA's 512)")
    chair_batch_size: int = setting(16, "CHAIR descriptions per decoding pass (their KV cache "
                                        "is long: fewer rows than --eval-batch-size)")
    eval_images: int = setting(250, "toy world: held-out POPE images (6 questions each)")
    sample_seeds: int = setting(3, "seeds for sampled decoding (mean and spread)")
    eval_batch_size: int = setting(64, "prompts per decoding pass: POPE's questions, SEED's "
                                       "purified examples (an answer does not depend on its batch)")
    checkpoint_every: int = setting(50, "write adapter + optimiser every N steps")
    plan: bool = setting(False, "print the run's plan (images, examples made and drawn, POPE "
                                "answers, steps, per phase) and exit: no weights loaded, nothing "
                                "written to --out")
    resume: bool = setting(False, "continue the run in --out (made with the same settings: refused "
                                  "otherwise), keeping its answers, examples and checkpoint")
    overwrite: bool = setting(False, "replace an earlier run in --out (without it, and without "
                                     "--resume, such an --out is refused)")
    skip_unreadable: bool = setting(False, "leave unreadable files of --images out (and say how "
                                           "many) instead of refusing to start")
    out: str = setting("out", "where answers, adapters and results.json go")
    device: str = setting("auto", "cpu, cuda, or auto (cuda when there is one)")
    progress: bool = setting(True, "tqdm bars (--no-progress to silence them)")
    dist_timeout: int = setting(30, "under torchrun: minutes a process waits on the others before "
                                    "the job fails instead of hanging")


def parse_config(argv=None, description=None):
    """The Config of `argv` (sys.argv's when None); a bad flag or path exits 2 with one line."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float,
                    "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            former = [f.metadata["former_name"]] if f.metadata["former_name"] else []
            parser.add_argument(flag, *former, type=kind, default=f.default,
                                help=f.metadata["help"] + f" (default: {f.default})",
                                choices=f.metadata["choices"])
    args = parser.parse_args(argv)
    if args.noise_step is None:  # glyphs on a flat background survive more noise than photographs
        import toyworld

        args.noise_step = purge.NOISE_STEP if args.model else toyworld.NOISE_STEP
    problem = check_config(args)
    if problem:  # before any work starts, in one line naming the flag or the file
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return Config(**vars(args))


def pope_files_in(folder):
    """{split: path} of a folder's *_pope_{split}.json files, random, popular, adversarial."""
    names = sorted(os.listdir(folder))
    return {s: os.path.join(folder, n) for s in eval_pope.SPLITS for n in names
            if n.endswith(f"_pope_{s}.json")}


def image_names_in(folder):
    """The image files of a folder (.jpg, .jpeg, .png), sorted."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))


# Flags that change no answer, example or adapter: a resumed run may change them (the others are
# the content settings)
NOT_CONTENT = ("plan", "resume", "overwrite", "skip_unreadable", "out", "device", "progress",
               "dist_timeout", "eval_batch_size", "checkpoint_every", "divergence",
               "sample_seeds", "micro_batch_size", "gradient_checkpointing", "chair_batch_size")
PATH_FLAGS = ("model", "images", "pope", "pope_images", "objects", "chair_annotations",
              "chair_images")
# what a run writes into --out: its files and a folder a row (report.METHODS)
EARLIER_RUN = ("run.json", "results.json", "results.png", "scenes.png", "base", "vcd",
               "seed_forward", "seed_reverse", "seed_reverse_vcd")


def content_settings(config):
    """The settings a run's files are made with, as run.json records them (paths absolute)."""
    settings = {k: v for k, v in vars(config).items() if k not in NOT_CONTENT}
    return {k: os.path.abspath(v) if k in PATH_FLAGS and v else v for k, v in settings.items()}


def check_config(args):
    """The first thing wrong with the flags or the paths they name, as one sentence, or None."""
    at_least = {"pretrain_steps": 1, "rounds": 1, "steps": 1, "batch_size": 1, "rank": 1,
                "images_per_round": 1, "probes_per_image": 0, "description_tokens": 1,
                "eval_images": 1,
                "sample_seeds": 1, "eval_batch_size": 1, "checkpoint_every": 0, "dist_timeout": 1,
                "micro_batch_size": 0, "chair_count": 1, "chair_tokens": 1, "chair_batch_size": 1}
    for name, low in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}"
    processes = distributed.launched_processes()
    if args.batch_size < processes:
        return (f"--batch-size {args.batch_size} is the global batch: at least one row per process "
                f"({processes})")
    problem = (eval_pope.out_of_range("--noise-step", args.noise_step, 0,
                                      purge.NUM_DIFFUSION_STEPS - 1)
               or eval_pope.out_of_range("--alpha", args.alpha, low=0)
               or eval_pope.out_of_range("--beta", args.beta, 0, 1, above=True)
               or eval_pope.out_of_range("--void-eps", args.void_eps, 0, 1, above=True, below=True)
               or eval_pope.out_of_range("--lr", args.lr, low=0, above=True)
               or eval_pope.out_of_range("--alpha-r", args.alpha_r, low=0, above=True)
               or eval_pope.output_problem("--out", args.out, folder=True))
    if problem:
        return problem
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda")
                                                   and torch.cuda.is_available()):
        return f"--device {args.device}: no such device here (cpu, cuda when there is one, or auto)"
    if args.resume and args.overwrite:
        return "--resume continues the run in --out, --overwrite replaces it: give one"
    earlier = (lambda: None) if args.plan else (lambda: earlier_run_problem(args))
    return (check_model_flags(args) or earlier()) if args.model else (
        toy_world_flags_problem(args) or examples_problem(args, round_size(args)) or earlier())


def examples_problem(args, images):
    """Why a round of `images` images cannot train at --batch-size, or None: seed.hold_out keeps
    max(batch, examples / 20) of a round's examples out to measure the void mass, and the rest must
    be at least one."""
    examples = images * (1 + args.probes_per_image)
    held_out = max(args.batch_size, examples // 20)
    if examples > held_out:
        return None
    return (f"--batch-size {args.batch_size}: a round makes at most {examples} examples ({images} "
            f"images x (1 + {args.probes_per_image} probes)) and holds {held_out} of them out; "
            f"more --images-per-round or a smaller --batch-size")


def toy_world_flags_problem(args):
    given = [f"--{name.replace('_', '-')}" for name in ("images", "pope", "pope_images", "objects",
                                                        "chair_annotations", "chair_images")
             if getattr(args, name)]
    if given:
        return (f"{given[0]} is for a real run (--model); the toy world brings its own images, "
                f"questions and objects")
    return None


def earlier_run_problem(args):
    """Why the run may not start in --out: an earlier run there that --resume would mix with other
    settings, or one that a fresh run would replace without --overwrite. Under torchrun process 0
    alone looks (the others could see the run.json it has just written); its refusal ends the job.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    run_file = os.path.join(args.out, "run.json")
    earlier = [n for n in EARLIER_RUN if os.path.exists(os.path.join(args.out, n))]
    if args.resume and earlier:
        if not os.path.isfile(run_file):
            return (f"--resume: {args.out} holds a run that does not say what it was made with (no "
                    f"run.json)")
        with open(run_file) as f:
            recorded = json.load(f)["settings"]
        difference = runs.first_difference(recorded, content_settings(args))
        if difference:
            flag, old, new = difference
            return (f"--resume: {args.out} was made with --{flag.replace('_', '-')} {old}, this "
                    f"run has {new}: give the same flags, or another --out")
    if earlier and not args.resume and not args.overwrite:
        return (f"--out {args.out} holds an earlier run ({', '.join(earlier)}): --resume continues "
                f"it, --overwrite replaces it, or choose another --out")
    return None


def check_model_flags(args):
    """A real run's flags and files (--model, --images, --pope, --pope-images, --objects)."""
    if not (args.images and args.pope and args.pope_images):
        return "--model needs --images, --pope and --pope-images (no data is downloaded)"
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        return (f"--model {args.model}: not a local checkpoint folder (no config.json; nothing is "
                f"downloaded)")
    processor_files = ("processor_config.json", "preprocessor_config.json")
    if not any(os.path.isfile(os.path.join(args.model, n)) for n in processor_files):
        return (f"--model {args.model}: no processor in the folder (processor_config.json or "
                f"preprocessor_config.json)")
    if args.objects and not os.path.isfile(args.objects):
        return f"--objects {args.objects}: " + ("a folder, not a file" if os.path.isdir(
            args.objects) else "no such file")
    problem = next(filter(None, (eval_pope.folder_problem(flag, folder) for flag, folder in (
        ("--images", args.images), ("--pope", args.pope), ("--pope-images", args.pope_images)))),
        None)
    if problem:
        return problem
    if not image_names_in(args.images):
        return f"--images {args.images}: no .jpg, .jpeg or .png files"
    pope_files = pope_files_in(args.pope)
    missing = [s for s in eval_pope.SPLITS if s not in pope_files]
    if missing:
        return (f"--pope {args.pope}: no *_pope_{missing[0]}.json (POPE's three files are needed: "
                f"{eval_pope.SPLITS})")
    if bool(args.chair_annotations) != bool(args.chair_images):
        return "--chair-annotations and --chair-images go together (CHAIR needs both)"
    problem = args.chair_annotations and (
        eval_pope.folder_problem("--chair-annotations", args.chair_annotations)
        or eval_pope.folder_problem("--chair-images", args.chair_images))
    if problem:
        return problem
    test_images = set()
    for path in pope_files.values():
        try:
            questions = eval_pope.load_questions(path, labelled=True)
        except ValueError as error:  # already names the file and the line
            return str(error)
        # quietly: one line if it fails (--plan reads no image)
        problem = None if args.plan else eval_pope.image_problem(questions, path,
                                                                 args.pope_images)
        if problem:  # missing or unreadable, with the question file's line
            return problem.replace(f" is not in {args.pope_images} ",
                                   f" is not in --pope-images {args.pope_images} ")
        test_images |= {q["image"] for q in questions}
    overlap = sorted(test_images & set(image_names_in(args.images)))
    if overlap:  # SEED would train on the very photos POPE tests on
        return (f"--images {args.images}: {len(overlap)} of its files are POPE test images "
                f"({overlap[0]}, ...): SEED would train on the test set; take them out of --images")
    return examples_problem(args, min(round_size(args), len(image_names_in(args.images))))


def run_fingerprint(config):
    """The run's content settings in 16 hex digits, as its answers record them (run.json: all)."""
    import hashlib

    settings = json.dumps(content_settings(config), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def start_run(config, image_sample):
    """--out for this run: an earlier run in it removed (--overwrite, said aloud; check_config
    refused it otherwise), and run.json written with the settings a --resume must match and each
    round's image sample (file names; the toy world's scene numbers), which a --resume keeps."""
    if config.overwrite:
        earlier = [n for n in EARLIER_RUN if os.path.exists(os.path.join(config.out, n))]
        if earlier:
            print(f"--overwrite: replacing the earlier run in {config.out} ({', '.join(earlier)})")
        for name in earlier:
            path = os.path.join(config.out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(config.out, exist_ok=True)
    runs.write_json(os.path.join(config.out, "run.json"),
                    {"settings": content_settings(config), "image_sample": image_sample}, indent=1)


def round_size(config):
    """--images-per-round, or its default: loading.images_per_round's formula with --model, 400 on
    the toy world (where more images with more steps lowered the gain: docs/EXPERIMENTS.md)."""
    if config.images_per_round is not None:
        return config.images_per_round
    if config.model is None:
        return 400
    return loading.images_per_round(config.steps, config.batch_size, config.probes_per_image)


def sample_sizes(config, files=None):
    """(images a round, distinct images over the rounds) of a run: round_size and
    loading.needed, neither more than the `files` a folder holds (None: the toy world's endless
    stream)."""
    per_round = round_size(config)
    distinct = loading.needed(per_round, config.rounds, config.fresh_images)
    if files is None:
        return per_round, distinct
    return min(per_round, files), min(distinct, files)


def recorded_sample(config):
    """The image sample of the run a --resume continues (its run.json), or None."""
    path = os.path.join(config.out, "run.json")
    if not (config.resume and os.path.isfile(path)):
        return None
    with open(path) as f:
        return json.load(f).get("image_sample")


def sampled_images(config, say=print):
    """Each round's --images files (loading.round_samples over the seeded order of the folder, or
    the sample a resumed run recorded), each checked readable before the first forward pass: an
    unreadable one stops the run in one line naming it, or, with --skip-unreadable, is left out
    (and counted) and the next file in the order taken instead. Only the sampled files are read."""
    recorded = recorded_sample(config)
    if recorded is not None:
        paths = [[os.path.join(config.images, n) for n in names] for names in recorded]
        missing = next((p for names in paths for p in names if not os.path.isfile(p)), None)
        if missing:
            fail(f"--resume: {missing} was sampled by the run in {config.out} and is gone: put it "
                 f"back, or start the run anew (--overwrite)")
        return recorded, paths
    order = loading.sample_order(image_names_in(config.images), config.seed)
    per_round, wanted = sample_sizes(config, len(order))
    readable, bad = [], []
    from tqdm import tqdm

    with tqdm(total=wanted, desc="checking the sampled --images",
              disable=not config.progress) as bar:
        for name in order:
            if len(readable) == wanted:
                break
            problem = eval_pope.unreadable_images([os.path.join(config.images, name)])
            if problem and not config.skip_unreadable:
                fail(f"--images: cannot read {problem[0][0]} ({problem[0][1]}): remove it, or "
                     f"--skip-unreadable to leave such files out")
            (bad if problem else readable).append(name)
            bar.update(not problem)
    if bad:
        say(f"--skip-unreadable: left out {len(bad)} unreadable --images files ({bad[0]}, ...)")
    if not readable:
        fail(f"--images {config.images}: no readable image among {len(order)} files")
    sample = loading.round_samples(readable, per_round, config.rounds, config.fresh_images)
    return sample, [[os.path.join(config.images, n) for n in names] for names in sample]


def claim_out(config):
    """--out claimed for this run (runs.claim; process 0 under torchrun): a second run on the same
    --out, or a --resume of one still running, stops in one line naming the process."""
    if int(os.environ.get("RANK", "0")) != 0:
        return runs.Claim(None)
    os.makedirs(config.out, exist_ok=True)
    try:
        return runs.claim(config.out)
    except runs.InUse as error:
        fail(f"--out {error}")


def load_checked(path, device, dtype):
    """models.load_model, before anything is written: a folder that does not load (no tokenizer,
    truncated weights, a text-only model) stops the run in one line naming it and the cause
    (eval_pope.load_or_refuse's)."""
    try:
        return eval_pope.load_or_refuse(path, device, dtype)
    except eval_pope.Refused as refusal:
        fail(str(refusal))


def write_failure(error):
    """What an OSError met while writing says, in one line: the file, the cause, what is kept."""
    import errno

    where = error.filename or "a file"
    cause = error.strerror or str(error)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if str(where).startswith(cache):  # only the toy world writes there
        return (f"cannot write the toy world's cache {where} ({cause}): set XDG_CACHE_HOME to a "
                f"writable folder with room")
    kept = ("answers, examples and the last checkpoint written before it are kept, nothing "
            "half-written under its name")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {where}: {cause}; {kept}; make room"
    return f"cannot write {where}: {cause}; {kept}"


def fail(message):
    """Stop before any work, as the flag checks do: exit status 2 and one line."""
    print(f"train.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class RunData:
    """What a run evaluates and trains on: the base checkpoint, POPE's files and images, each
    round's unlabeled images (file paths or PIL images) and what names them in run.json, the names
    the probes ask about, the description prompt, and the toy world."""
    model_path: str
    pope_files: dict
    image_dir: str
    round_images: list
    image_sample: list
    object_names: list
    description: str
    world: dict = None  # toy world only: its classes and partners, and the scenes' true contents
    world_config: object = None
    objects_by_image: dict = None
    chair_sample: list = None  # with --chair-*: the images described, and their ground truth
    chair_truth: dict = None


def run_data(config, image_sample=None, round_images=None):
    """The toy world's data (its base model built or loaded, by process 0 first; its unlabeled
    scenes drawn as the rounds take them), or the folders the flags name, `round_images` being the
    sampled --images files already checked readable."""
    if config.model is not None:
        object_names = (open(config.objects).read().split("\n") if config.objects
                        else list(eval_pope.COCO_OBJECTS))
        run = RunData(config.model, pope_files_in(config.pope), config.pope_images, round_images,
                      image_sample, [n.strip() for n in object_names if n.strip()],
                      "Describe this image in detail.")
        if config.chair_annotations:  # the sample drawn, its ground truth read, before any work
            import eval_chair

            run.chair_sample = eval_chair.sample_images(config.chair_images, config.chair_count,
                                                        config.seed)
            if not run.chair_sample:
                fail(f"--chair-images {config.chair_images}: no COCO image files (*_<id>.jpg)")
            try:
                run.chair_truth = eval_chair.ground_truth(config.chair_annotations,
                                                          [s["image_id"] for s in run.chair_sample])
            except ValueError as error:
                fail(str(error))
        return run
    import toyworld

    world_config = toyworld.WorldConfig(world_seed=config.world_seed, steps=config.pretrain_steps)
    if not distributed.is_main():
        # process 0 builds the cache first (pretraining, if the world needs it)
        distributed.barrier()
    model_path, world = toyworld.build(world_config, progress=config.progress,
                                       shipped=config.shipped_base)
    pope_files, image_dir, objects_by_image = toyworld.eval_set(config.eval_images, world,
                                                                world_config)
    if distributed.is_main():
        distributed.barrier()
    round_images, image_sample = toy_round_images(config, world, world_config)
    return RunData(model_path, pope_files, image_dir, round_images, image_sample,
                   list(world["names"]), toyworld.DESCRIBE, world, world_config, objects_by_image)


def toy_round_images(config, world, world_config):
    """(each round's unlabeled scenes, as PIL images; their numbers in the world's stream of
    unlabeled scenes, what run.json records): the rounds take the stream as loading.round_samples
    takes a folder's files, in order."""
    import toyworld

    per_round, count = sample_sizes(config)
    scenes = toyworld.unlabeled_images(world, count, seed=config.seed + 20_000, config=world_config)
    sample = loading.round_samples(list(range(count)), per_round, config.rounds,
                                   config.fresh_images)
    return [[scenes[i] for i in numbers] for numbers in sample], sample
