"""What SEED costs, measured as ratios against baselines timed in the same run.

Paper: SEED (arXiv 2507.04680) moves the cost of hallucination mitigation from every answer
(VCD-style decoding: two passes per token) to a short training run. This script measures both
sides (METHOD.md 3-6); its figures are ours, not the paper's.

    python bench.py                                   # CPU, the built-in tiny LLaVA, seconds
    python bench.py --device cuda --dtype bfloat16 --shape llava-7b --json bench.json

1. train_step_ratio: one SEED step (two teacher passes without gradient + one student pass with
   backward + loss) over one plain adapter fine-tuning step (student pass + backward + cross-entropy
   on the same response tokens). Counting passes the floor is about 5/3; target <= 1.8.
   train_step_ratio_recorded: the SEED step against the teacher recorded with the examples (the
   student's pass alone, a sparse KL over KEPT listed tokens a position) over the same plain step;
   target <= 1.15. examples_record_ratio: purified decoding that records the teacher over the same
   decoding without; target <= 1.05 (random weights keep much of the vocabulary: an upper bound).
2. answer_cost_ratio_seed / _vcd: seconds per POPE answer of the merged SEED model / VCD decoding
   over the base model, same questions and batch. Target: seed <= 1.05; VCD near 2.
3. peak_memory_ratio: peak memory of the SEED step over the plain step (CPU: the process's peak
   resident set, each step in a fresh process; GPU: torch.cuda.max_memory_allocated). Target <= 1.3.
4. eval_batched_speedup: POPE questions per second, batched over one question at a time.
5. decode_throughput_ratio: tokens per second of decode.generate's greedy loop over transformers'
   own model.generate (greedy, KV cache, same batch and number of new tokens). Target >= 1.
   decode_purified_throughput_ratio: purified (two-pass) decoding over that greedy loop, ~0.5.
Each figure is the median of several repeats after a warm-up, with the spread (min..max) beside it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import adapter
import decode
import models
import seed

SHAPES = {
    # the toy world's tiny LLaVA (toyworld.make_model), 16 image tokens
    "tiny": None,
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens) + Vicuna-7B (32 layers, 4096 wide)
    "llava-7b": dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336,
                           patch_size=14, projection_dim=768),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096,
                         intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=4096),
        image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu"),
}


def build(shape, device, dtype, layers=None):
    """A randomly initialised model of the given shape and a function making POPE-like batches."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if shape == "tiny":
        import toyworld

        model = toyworld.make_model(toyworld.make_tokenizer(), image_size=32)
    else:
        config = LlavaConfig(**SHAPES[shape])
        if layers:  # a shallower model of the same widths, for a quick look where memory is short
            config.text_config.num_hidden_layers = layers
            config.vision_config.num_hidden_layers = layers
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build the 7B shape directly in its dtype, on its device
        try:
            with torch.device(device):
                model = LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=dtype).eval()
    vision = model.config.vision_config
    # CLS dropped ("default" strategy)
    n_image_tokens = (vision.image_size // vision.patch_size) ** 2
    vocab = model.config.text_config.vocab_size

    def make_batch(batch_size, prompt_tokens=12, response_tokens=6, seed_=0):
        g = torch.Generator().manual_seed(seed_)
        prompt = torch.randint(5, min(vocab, 30_000) - 1, (batch_size, prompt_tokens), generator=g)
        response = torch.randint(5, min(vocab, 30_000) - 1, (batch_size, response_tokens),
                                 generator=g)
        image = torch.full((batch_size, n_image_tokens), model.config.image_token_id)
        input_ids = torch.cat([prompt[:, :2], image, prompt[:, 2:], response], dim=1)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        response_mask[:, -response_tokens:] = True
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=g)
        return {"input_ids": input_ids.to(device),
                "attention_mask": torch.ones_like(input_ids).to(device),
                "response_mask": response_mask.to(device), "pixel_values": pixels.to(device, dtype)}

    return model, make_batch


def timed(fn, device, repeats):
    """Median, min and max seconds of fn() over `repeats` runs after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            begin = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - begin
        if i:
            times.append(elapsed)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def ratio(a, b):
    """a / b for medians, with the spread of the ratio taken from the extremes."""
    return {"median": a["median"] / b["median"], "min": a["min"] / b["max"],
            "max": a["max"] / b["min"]}


# listed tokens a position in the recorded teacher: above the toy world's mean and near its largest
KEPT = 16


def with_recorded_teacher(batch, vocab):
    """The batch with a sparse teacher at each response position: KEPT random ids and logits."""
    g = torch.Generator().manual_seed(2)
    n = int(batch["response_mask"][:, 1:].sum())
    ids = torch.stack([torch.randperm(vocab, generator=g)[:KEPT] for _ in range(n)])
    device = batch["input_ids"].device
    return {**batch, "teacher_ids": ids.to(device),
            "teacher_logits": torch.randn(n, KEPT, generator=g).to(device)}


def train_step_fn(model, batch, kind, optimizer, autocast):
    def step():
        with autocast:
            if kind == "seed":
                loss, _, _ = seed.seed_step(model, batch, "reverse",
                                            generator=torch.Generator().manual_seed(0))
            elif kind == "recorded":
                loss, _, _ = seed.recorded_seed_step(model, batch, "reverse")
            else:
                loss = seed.sft_step(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _rss_bytes(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(args):
    """Run in a fresh process: memory of one kind of training step, printed as JSON.

    GPU: torch.cuda.max_memory_allocated (weights included: a second copy of the weights would
    show). CPU: the peak resident set above what the process held before the step (the step's own
    memory: activations, logits, gradients), since the interpreter and torch alone take hundreds of
    MiB.
    """
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, make_batch = build(args.shape, device, dtype, args.layers)
    optimizer = torch.optim.AdamW(adapter.add_adapter(model), lr=1e-4)
    batch = make_batch(args.batch_size)
    if args.memory_probe == "recorded":
        batch = with_recorded_teacher(batch, model.config.text_config.vocab_size)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    step = train_step_fn(model, batch, args.memory_probe, optimizer=optimizer, autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        before = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (Linux >= 4.0)
        step()
        peak = _rss_bytes("VmHWM") - before
    print(json.dumps({"peak_bytes": peak}))


def bench_problem(args):
    """The first bad flag, as one sentence; None if all is well."""
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        return f"--device {args.device}: no such device here (cpu, or cuda when there is one)"
    for flag, value in (("--layers", args.layers), ("--batch-size", args.batch_size),
                        ("--answer-tokens", args.answer_tokens),
                        ("--decode-tokens", args.decode_tokens), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            return f"{flag} must be at least 1, got {value}"
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights dtype")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                        help="model shape (random weights)")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the layer count (same widths)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples / questions per batch")
    parser.add_argument("--answer-tokens", type=int, default=4,
                        help="tokens generated per POPE answer")
    parser.add_argument("--decode-tokens", type=int, default=24,
                        help="tokens generated per row in the decoding throughput figures (a "
                             "description's length)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per figure (after one warm-up)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--memory-probe", choices=["seed", "recorded", "sft"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = bench_problem(args)
    if problem:  # before anything is built, in one line
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return args


def train_steps(model, make_batch, autocast, device, args):
    """1. The training step: SEED (online and recorded teacher) against plain adapter fine-tuning,
    on the same model, batch and adapter. Leaves the adapter on the model."""
    optimizer = torch.optim.AdamW(adapter.add_adapter(model), lr=1e-4)
    batch = make_batch(args.batch_size)
    t_seed = timed(train_step_fn(model, batch, "seed", optimizer=optimizer, autocast=autocast),
                   device, args.repeats)
    t_sft = timed(train_step_fn(model, batch, "sft", optimizer=optimizer, autocast=autocast),
                  device, args.repeats)
    recorded = with_recorded_teacher(batch, model.config.text_config.vocab_size)
    t_recorded = timed(train_step_fn(model, recorded, "recorded", optimizer=optimizer,
                                     autocast=autocast), device,
                       args.repeats)
    return dict(train_step_seed_s=t_seed, train_step_sft_s=t_sft, train_step_recorded_s=t_recorded,
                train_step_ratio=ratio(t_seed, t_sft),
                train_step_ratio_recorded=ratio(t_recorded, t_sft))


def answer_costs(model, inputs, autocast, device, args):
    """2. The answer cost: the base model (adapter off), VCD decoding, and the merged SEED model
    (merges the adapter); 3. one batch of questions against the same questions one at a time."""
    per_answer = lambda t: {k: v / args.batch_size for k, v in t.items()}  # noqa: E731

    def answer(contrast=False):
        with autocast:
            decode.generate(model, inputs, args.answer_tokens, contrast=contrast)

    def one_at_a_time():
        with autocast:
            for i in range(args.batch_size):
                decode.generate(model, {k: v[i:i + 1] for k, v in inputs.items()},
                                args.answer_tokens)

    with adapter.adapter_disabled(model):
        t_base = per_answer(timed(answer, device, args.repeats))
        t_vcd = per_answer(timed(lambda: answer(True), device, args.repeats))
    adapter.merge_adapter(model)
    t_merged = per_answer(timed(answer, device, args.repeats))
    t_single = per_answer(timed(one_at_a_time, device, max(1, args.repeats // 2)))
    return dict(answer_base_s=t_base, answer_seed_s=t_merged, answer_vcd_s=t_vcd,
                answer_cost_ratio_seed=ratio(t_merged, t_base),
                answer_cost_ratio_vcd=ratio(t_vcd, t_base), eval_single_s=t_single,
                eval_batched_speedup=ratio(t_single, t_base))


def decoding(model, inputs, autocast, device, args):
    """4. Decoding throughput: this project's greedy loop against transformers' own generate
    (greedy, KV cache, the same batch, exactly decode_tokens new tokens on both, the image
    placeholders suppressed on both), the purified two-pass decoding that makes SEED's examples, and
    the same recording the teacher."""
    placeholders = models.placeholder_token_ids(model)
    n = args.decode_tokens

    def ours(contrast=False, record=False):
        with autocast:
            decode.generate(model, inputs, n, contrast=contrast, record=record)

    def library():
        with autocast:
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, suppress_tokens=placeholders, pad_token_id=0)

    t_ours, t_library = timed(ours, device, args.repeats), timed(library, device, args.repeats)
    t_purified = timed(lambda: ours(True), device, args.repeats)
    t_recording = timed(lambda: ours(True, True), device, args.repeats)
    return dict(decode_ours_s=t_ours, decode_generate_s=t_library, decode_purified_s=t_purified,
                decode_recording_s=t_recording, decode_throughput_ratio=ratio(t_library, t_ours),
                decode_purified_throughput_ratio=ratio(t_ours, t_purified),
                examples_record_ratio=ratio(t_recording, t_purified))


def peak_memories(args):
    """5. The peak memory of each step, each in a fresh process (no peak inherited)."""
    peaks = {}
    for kind in ("seed", "recorded", "sft"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind, "--device",
                   args.device, "--dtype", args.dtype, "--shape", args.shape, "--batch-size",
                   str(args.batch_size)]
        if args.layers:
            command += ["--layers", str(args.layers)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[kind] = json.loads(output.strip().splitlines()[-1])["peak_bytes"]
    return dict(peak_memory_seed_bytes=peaks["seed"], peak_memory_sft_bytes=peaks["sft"],
                peak_memory_recorded_bytes=peaks["recorded"],
                peak_memory_ratio=peaks["seed"] / peaks["sft"],
                peak_memory_ratio_recorded=peaks["recorded"] / peaks["sft"])


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, make_batch = build(args.shape, device, dtype, args.layers)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size}
    results.update(train_steps(model, make_batch, autocast, device, args))
    question = make_batch(args.batch_size, response_tokens=0, seed_=1)
    inputs = {k: question[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    results.update(answer_costs(model, inputs, autocast, device, args))
    results.update(decoding(model, inputs, autocast, device, args))
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results.update(peak_memories(args))
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def format_table(r):
    def row(name, value, target):
        if isinstance(value, dict):
            shown = f"{value['median']:.3f}  ({value['min']:.3f}..{value['max']:.3f})"
        else:
            shown = f"{value:.3f}"
        return f"{name:<48}{shown:<28}{target}"

    ms = lambda t: f"{1000 * t['median']:.2f} ms"  # noqa: E731
    lines = [f"SEED bench on {r['device']}, shape {r['shape']}, {r['dtype']}, batch "
             f"{r['batch_size']}", f"{'ratio':<48}{'median  (spread)':<28}target",
             row("train step: SEED online / plain adapter step", r["train_step_ratio"],
                 "<= 1.8 (floor ~5/3)"),
             row("train step: SEED recorded / plain adapter step", r["train_step_ratio_recorded"],
                 "<= 1.15"),
             row("answer cost: merged SEED / base", r["answer_cost_ratio_seed"], "<= 1.05"),
             row("answer cost: VCD / base", r["answer_cost_ratio_vcd"], "~2"),
             row("peak memory: SEED online step / plain step", r["peak_memory_ratio"], "<= 1.3"),
             row("peak memory: SEED recorded step / plain step", r["peak_memory_ratio_recorded"],
                 "<= 1.3"),
             row("eval: batched speed-up over one at a time", r["eval_batched_speedup"], "> 1"),
             row("decoding: our greedy loop / model.generate", r["decode_throughput_ratio"],
                 ">= 1 (tokens/s)"),
             row("decoding: purified two-pass / our greedy", r["decode_purified_throughput_ratio"],
                 "~0.5 (tokens/s)"),
             row("examples: recording the teacher / not", r["examples_record_ratio"],
                 "<= 1.05 (time)"),
             f"raw: SEED step {ms(r['train_step_seed_s'])} online / "
             f"{ms(r['train_step_recorded_s'])} recorded, plain step {ms(r['train_step_sft_s'])}, "
             f"answer base {ms(r['answer_base_s'])} / SEED {ms(r['answer_seed_s'])} / VCD "
             f"{ms(r['answer_vcd_s'])}, decoding {ms(r['decode_ours_s'])} / generate "
             f"{ms(r['decode_generate_s'])} / purified {ms(r['decode_purified_s'])} a batch, peak "
             f"memory SEED {r['peak_memory_seed_bytes'] / 2**20:.0f} MiB online / "
             f"{r['peak_memory_recorded_bytes'] / 2**20:.0f} MiB recorded / plain "
             f"{r['peak_memory_sft_bytes'] / 2**20:.0f} MiB"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
