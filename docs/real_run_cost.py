"""What the README's one-GPU command costs at the paper's scale, phase by phase: time and memory.

    python docs/real_run_cost.py                       # the tables of docs/REAL_RUN.md
    python docs/real_run_cost.py --memory-json out/    # with bench.py --memory's figures, if kept

No GPU and no weights are needed: the work each phase does is counted from this project's own plan
(plan.make_plan, the flags' defaults, COCO's sizes), turned into floating-point operations by the
usual arithmetic (a forward pass is 2 x parameters x tokens, a training step's forward and backward
through frozen weights 4 x; decoding steps read the weights and the KV cache), and into hours at a
stated throughput. What can be measured here is measured: the image preprocessing of a prompt
(LLaVA-1.5's processor at 336 px, InternVL2's at 448-pixel tiles, on COCO-sized JPEGs), and the
bytes a training step keeps per token per decoder layer (bench.py --memory, on models of the real
widths one to three layers deep). "Before" is this project's code before the run was sized
(every --images file every round, round 0 made once per divergence, images read on the main thread
once per prompt, logits kept at every position of a decoding pass).
"""
import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import cli  # noqa: E402
import loading  # noqa: E402
import plan  # noqa: E402

# One H100-class GPU, as stated, not measured: dense bf16 at 40 % of the H100 SXM's 989 TFLOP/s,
# and its 3.35 TB/s of memory bandwidth for the memory-bound decoding steps.
FLOPS = 400e12
BANDWIDTH = 3.35e12
GIB = 2 ** 30

# The models, from their published configs: parameters of the language model and the vision
# tower, decoder layers, width, key-value heads, vocabulary; image tokens a COCO photo (640 x 480)
# becomes, and the vision tower's tokens for it.
MODELS = {
    "LLaVA-1.5-7B": dict(lm=6.74e9, vision=0.30e9, layers=32, hidden=4096, kv_heads=32,
                         head_dim=128, vocab=32064, image_tokens=576, vision_tokens=577,
                         memory="llava-7b"),
    "LLaVA-1.5-13B": dict(lm=13.0e9, vision=0.30e9, layers=40, hidden=5120, kv_heads=40,
                          head_dim=128, vocab=32064, image_tokens=576, vision_tokens=577,
                          memory="llava-13b"),
    # 640 x 480 is cut into 4 x 3 tiles of 448 px (at most 12) plus a thumbnail: 13 x 256 tokens
    "InternVL2-8B": dict(lm=7.74e9, vision=0.30e9, layers=32, hidden=4096, kv_heads=8,
                         head_dim=128, vocab=92553, image_tokens=13 * 256,
                         vision_tokens=13 * 1025, memory="internvl2-8b"),
    "InternVL2-26B": dict(lm=19.9e9, vision=5.9e9, layers=48, hidden=6144, kv_heads=8,
                          head_dim=128, vocab=92553, image_tokens=13 * 256,
                          vision_tokens=13 * 1025, memory="internvl2-26b"),
}
PROMPT_TEXT_TOKENS = 30     # the chat template around a description request or a probe
COCO_TRAIN, POPE_QUESTIONS = 82_783, 3_000  # train2014's images; COCO POPE's questions a split


def pass_flops(m, tokens):
    """One forward pass over `tokens` language tokens of one image: the decoder and the tower."""
    return 2 * m["lm"] * tokens + 2 * m["vision"] * m["vision_tokens"]


def decode_step_seconds(m, rows, length, streams):
    """One decoding step of `rows` rows (memory-bound): each stream reads the weights and its KV
    cache of `length` tokens."""
    kv = rows * length * m["layers"] * 2 * m["kv_heads"] * m["head_dim"] * 2
    return streams * (2 * (m["lm"] + m["vision"]) + kv) / BANDWIDTH


def measure_preprocessing(count=24):
    """Seconds to read and preprocess one COCO-sized JPEG with LLaVA-1.5's processor (336 px) and
    with InternVL2's tiles (448 px, up to 12 and a thumbnail), measured here (one thread's CPU
    time, torch's own threads held to one)."""
    import eval_pope
    import models
    import replica
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    folder = tempfile.mkdtemp(prefix="coco-sized-")
    rng = random.Random(0)
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"{i}.jpg"))
        replica.write_jpeg(paths[-1], rng.choice(replica.COCO_SIZES), rng)
    llava = replica.make_processor(eval_pope.COCO_OBJECTS).image_processor
    internvl = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                        min_patches=1, max_patches=12,
                                        image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225])
    seconds = {}
    for name, processor in (("LLaVA", llava), ("InternVL2", internvl)):
        # the CPU time of this one thread: what the image costs, whatever else the machine runs
        began = time.process_time()
        for path in paths:
            processor(images=[models.open_image(path)], return_tensors="pt")
        seconds[name] = (time.process_time() - began) / count
    return seconds


def phases(m, config, per_round, prep, before):
    """{phase: seconds} of the README's command on one GPU: the examples (prefill of two passes, a
    description's decoding steps, image preprocessing on the main thread before, on a thread
    after), the SEED steps, the held-out void mass, POPE (and the images it reads)."""
    tokens = m["image_tokens"] + PROMPT_TEXT_TOKENS
    rows = config.eval_batch_size
    divergences = 2 if config.divergence == "both" else 1
    made_runs = config.rounds * divergences if before else 1 + (config.rounds - 1) * divergences
    prompts = per_round * (1 + config.probes_per_image)
    prefill = prompts * 2 * pass_flops(m, tokens) / FLOPS
    steps_per_prompt = (config.description_tokens + 1 + config.probes_per_image * 2) / (
        1 + config.probes_per_image)
    decoding = prompts / rows * steps_per_prompt * decode_step_seconds(m, rows, tokens, 2)
    # before: each prompt's image read on the main thread, the model waiting; after: each image
    # once a batch (a description pass, then its probes together), on a thread beside the model
    reading = prompts * prep if before else 0.0
    out = {"examples": made_runs * (prefill + decoding + reading)}
    step_tokens = config.batch_size * (tokens + config.description_tokens // 2)
    out["SEED steps"] = config.rounds * divergences * config.steps * (
        4 * m["lm"] * step_tokens + 2 * m["vision"] * m["vision_tokens"] * config.batch_size
    ) / FLOPS + (config.rounds * divergences * config.steps * config.batch_size * prep
                 if before else 0.0)
    held_out = max(config.batch_size, prompts // 20)
    out["void mass"] = config.rounds * divergences * 2 * held_out * pass_flops(m, tokens) / FLOPS
    answers = 3 * POPE_QUESTIONS * (1 + config.sample_seeds)
    passes = answers * (3 + 2 * 2)  # base and both SEED rows one pass; VCD rows two
    out["POPE"] = passes * pass_flops(m, tokens) / FLOPS + passes / rows * 4 * (
        decode_step_seconds(m, rows, tokens, 1)) + (answers * 5 * prep if before else 0.0)
    return out


def time_table(config, prep):
    """The time of each phase, before and after, for the models the paper runs."""
    per_round = min(cli.round_size(config), COCO_TRAIN)
    drawn = config.steps * config.batch_size
    lines = [f"One H100-class GPU at {FLOPS / 1e12:.0f} TFLOP/s (bf16, stated) and "
             f"{BANDWIDTH / 1e12:.2f} TB/s; image preprocessing measured here: LLaVA "
             f"{1000 * prep['LLaVA']:.1f} ms, InternVL2 {1000 * prep['InternVL2']:.1f} ms an image",
             f"images a round: before {COCO_TRAIN:,} (every file), after {per_round:,} "
             f"(loading.images_per_round); examples made a round {COCO_TRAIN * 7:,} -> "
             f"{per_round * 7:,}, drawn {drawn:,} ({per_round * 7 / drawn:.2f} x made / drawn "
             f"after)", "",
             f"{'hours':<16}{'':<8}" + "".join(f"{p:>12}" for p in
                                               ("examples", "SEED steps", "void mass", "POPE",
                                                "total"))]
    for name in ("LLaVA-1.5-7B", "LLaVA-1.5-13B", "InternVL2-8B"):
        m = MODELS[name]
        seconds = prep["LLaVA" if name.startswith("LLaVA") else "InternVL2"]
        for label, before in (("before", True), ("after", False)):
            cost = phases(m, config, COCO_TRAIN if before else per_round, seconds, before)
            lines.append(f"{name:<16}{label:<8}" + "".join(f"{v / 3600:>12.2f}"
                                                           for v in cost.values())
                         + f"{sum(cost.values()) / 3600:>12.2f}")
    return "\n".join(lines)


def memory_table(config, figures):
    """Predicted peak memory of a SEED step at --batch-size 32 in micro-batches, with and without
    gradient checkpointing, from bench.py --memory's bytes a token a layer; and of a decoding pass
    at --eval-batch-size, its logits kept at every position (before) or the last (after)."""
    adapters = sorted({f["adapter_targets"] for f in figures.values()})
    lines = [f"GiB at the peak of a training step (batch 32; m rows a micro-batch; the adapter on "
             f"{', '.join(adapters)}): weights + m x tokens x (layers x kept a token a layer + "
             f"one layer's working set) + m x response positions x logits",
             f"{'':<16}{'kept KB':>8}" + "".join(f"{f'm={m}':>8}" for m in (32, 16, 8, 4, 2, 1))
             + f"{'ckpt m=32':>10}"
             f"{'ckpt m=8':>10}  fits 24 / 48 / 80 / 141 GB by default"]
    for name, m in MODELS.items():
        measured = figures.get(m["memory"])
        if measured is None:
            continue
        per_layer = measured["per_token_per_layer"]["recorded, plain"]
        kept_ckpt = measured["per_token_per_layer"]["recorded, checkpointed"]
        logits = measured["rest_per_response_position"]["recorded, plain"]
        weights = 2 * (m["lm"] + m["vision"])
        tokens = m["image_tokens"] + PROMPT_TEXT_TOKENS + config.description_tokens + 1
        response = config.description_tokens + 1

        def peak(rows, checkpointed=False):
            kept = kept_ckpt if checkpointed else per_layer
            return (weights + rows * tokens * (m["layers"] * kept + per_layer)
                    + rows * response * logits) / GIB

        cells = [peak(r) for r in (32, 16, 8, 4, 2, 1)]
        fits = []
        for capacity in (24, 48, 80, 141):
            usable = 0.9 * capacity * 1e9 / GIB  # memory.HEADROOM
            micro = next((r for r in (32, 16, 8, 4, 2, 1) if peak(r) <= usable), None)
            fits.append(f"m={micro}" if micro else ("ckpt m=" + str(next(
                (r for r in (32, 16, 8, 4, 2, 1) if peak(r, True) <= usable), "-"))))
        lines.append(f"{name:<16}{per_layer / 1000:>8.1f}" + "".join(f"{c:>8.1f}" for c in cells)
                     + f"{peak(32, True):>10.1f}{peak(8, True):>10.1f}  " + " / ".join(fits))
    lines += ["", "GiB at the peak of a decoding pass (--eval-batch-size 64, VCD's two streams, "
                  "the longest prompt): weights + KV cache + one layer's prefill + logits"]
    for name, m in MODELS.items():
        rows, tokens = config.eval_batch_size, m["image_tokens"] + PROMPT_TEXT_TOKENS + 25
        kv = 2 * rows * tokens * m["layers"] * 2 * m["kv_heads"] * m["head_dim"] * 2
        prefill = rows * tokens * (6 * m["hidden"] + 3 * int(2.7 * m["hidden"])) * 2
        logits_before = 2 * rows * tokens * m["vocab"] * 2  # bf16, both streams alive
        logits_after = 2 * rows * m["vocab"] * 4
        base = 2 * (m["lm"] + m["vision"]) + kv + prefill
        lines.append(f"{name:<16}before {(base + logits_before) / GIB:6.1f}  after "
                     f"{(base + logits_after) / GIB:6.1f}  (logits {logits_before / GIB:.1f} -> "
                     f"{logits_after / GIB:.2f}, KV cache {kv / GIB:.1f})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-json", nargs="*", default=[],
                        help="bench.py --memory --json files (one a shape)")
    args = parser.parse_args()
    config = cli.Config(model="llava-1.5-7b-hf")  # the README's command: every default
    import torch

    torch.set_num_threads(1)
    prep = measure_preprocessing()
    print(time_table(config, prep))
    figures = {}
    for path in args.memory_json:  # the default adapter's (all-linear) figures where given
        with open(path) as f:
            measured = json.load(f)
        if measured["shape"] not in figures or measured["adapter_targets"] == "all-linear":
            figures[measured["shape"]] = measured
    if figures:
        print()
        print(memory_table(config, figures))
    phases_after = plan.make_plan(config, {s: POPE_QUESTIONS for s in ("r", "p", "a")},
                                  loading.images_per_round(config.steps, config.batch_size,
                                                           config.probes_per_image))
    print(f"\nthe plan's phases after (plan.make_plan): {len(phases_after)}; examples made in all "
          f"{sum(u for _, k, u in phases_after if k == 'example'):,}, steps "
          f"{sum(u for _, k, u in phases_after if k == 'step'):,}, POPE answers "
          f"{sum(u for _, k, u in phases_after if 'answer' in k):,}")
    return math.nan


if __name__ == "__main__":
    main()
