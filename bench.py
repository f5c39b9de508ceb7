"""What SEED costs, measured as ratios against baselines timed in the same run.

Paper: SEED (arXiv 2507.04680) moves the cost of hallucination mitigation from every answer
(VCD-style decoding: two passes per token) to a short training run. This script measures both
sides (METHOD.md 3-6); its figures are ours, not the paper's.

    python bench.py                                   # CPU, the built-in tiny LLaVA, seconds
    python bench.py --device cuda --dtype bfloat16 --shape llava-7b --json bench.json
    python bench.py --shape llava-7b --layers 1 2 3 --memory   # saved bytes a token a layer
    python bench.py --shape llava-7b --layers 1 --images       # how long steps wait on images

Default mode, each ratio the median of pairwise ratios, the two sides timed alternately, pair by
pair (a load that comes and goes falls on both sides of a pair), with the spread of the pairs:
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
--adapter-targets: the adapter of the steps (train.py's default; adapter.parse_targets' names).

--memory: the bytes a step keeps for its backward (every tensor autograd saves, its distinct
storages, the weights left out), per token and per decoder layer, from models 1, 2, 3 ... layers
deep at full width (the slope over the depth), for the recorded SEED step and the plain step, with
and without gradient checkpointing, and with the adapter's product in float32 (its input cast, as
an earlier version computed it): what docs/REAL_RUN.md turns into each model's peak memory.

--images: the share of example making (purified decoding) and of a training step spent waiting on
images, with LLaVA-1.5's processor (tests/replica.py: CLIP at 336 px, 576 image tokens) on
COCO-sized JPEGs: before (each prompt's image read and preprocessed on the main thread, one
processor call a batch, as this project did) and after (each image once a batch, prepared on a
thread while the model computes: loading.prefetched).
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import adapter
import decode
import loading
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
# LLaVA-1.5-13B: the same tower + Vicuna-13B (40 layers, 5120 wide)
SHAPES["llava-13b"] = dict(SHAPES["llava-7b"], text_config=dict(
    model_type="llama", vocab_size=32064, hidden_size=5120, intermediate_size=13824,
    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    max_position_embeddings=4096))
# InternVL2-8B and -26B: the language models as convert_internvl2.py makes them (InternLM2 as a
# Llama: internlm2_5-7b-chat, 32 layers, 4096 wide, 8 key-value heads; internlm2-chat-20b, 48
# layers, 6144 wide), beside LLaVA's tower: the tower runs without gradient and keeps nothing for
# the backward, so the per-token figures of --memory are the language model's
SHAPES["internvl2-8b"] = dict(SHAPES["llava-7b"], text_config=dict(
    model_type="llama", vocab_size=92553, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=32768))
SHAPES["internvl2-26b"] = dict(SHAPES["llava-7b"], text_config=dict(
    model_type="llama", vocab_size=92553, hidden_size=6144, intermediate_size=16384,
    num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8,
    max_position_embeddings=32768))


def parameter_count(shape, layers=None):
    """Parameters of a model of `shape`, at full depth or `layers` deep (built on the meta device:
    no memory)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(**SHAPES[shape])
    if layers:
        config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = layers
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def build(shape, device, dtype, layers=None, image_token_id=None):
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
        if image_token_id is not None:  # a real processor's placeholder
            config.image_token_id = image_token_id
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


# ---------------------------------------------------------------------------------------------
# Timing: alone, and in pairs

def elapsed(fn, device):
    """Seconds of one fn() call (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed(fn, device, repeats):
    """Median, min and max seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    return spread([elapsed(fn, device) for _ in range(repeats)])


def paired(fn_a, fn_b, device, repeats):
    """(a's seconds, b's seconds, a / b): the two timed alternately, pair by pair after one warm-up
    each, the order of a pair swapped every other pair; the ratio is the median of the pairs'
    ratios with their spread, so that a load that comes and goes falls on both sides of a pair."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for i in range(repeats):
        first, second = (fn_a, fn_b) if i % 2 == 0 else (fn_b, fn_a)
        t_first, t_second = elapsed(first, device), elapsed(second, device)
        a, b = (t_first, t_second) if i % 2 == 0 else (t_second, t_first)
        times_a.append(a)
        times_b.append(b)
    return spread(times_a), spread(times_b), spread([a / b for a, b in zip(times_a, times_b)])


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


def step_loss(model, batch, kind):
    """The loss of one step of `kind`: seed (online teacher), recorded, or sft (plain)."""
    if kind == "seed":
        generator = torch.Generator().manual_seed(0)
        return seed.seed_step(model, batch, "reverse", generator=generator)[0]
    if kind == "recorded":
        return seed.recorded_seed_step(model, batch, "reverse")[0]
    return seed.sft_step(model, batch)


def train_step_fn(model, batch, kind, optimizer, autocast):
    def step():
        with autocast:
            loss = step_loss(model, batch, kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# ---------------------------------------------------------------------------------------------
# 1-5: the ratios

def train_steps(model, make_batch, autocast, device, args):
    """1. The training step: SEED (online and recorded teacher) against plain adapter fine-tuning,
    on the same model, batch and adapter. Leaves the adapter on the model."""
    optimizer = torch.optim.AdamW(adapter.add_adapter(
        model, rank=args.rank, alpha_r=2.0 * args.rank,
        targets=adapter.parse_targets(args.adapter_targets)), lr=1e-4)
    batch = make_batch(args.batch_size)
    recorded = with_recorded_teacher(batch, model.config.text_config.vocab_size)
    step = lambda b, kind: train_step_fn(model, b, kind, optimizer, autocast)  # noqa: E731
    t_seed, t_sft, r_seed = paired(step(batch, "seed"), step(batch, "sft"), device, args.repeats)
    t_recorded, _, r_recorded = paired(step(recorded, "recorded"), step(batch, "sft"), device,
                                       args.repeats)
    return dict(train_step_seed_s=t_seed, train_step_sft_s=t_sft, train_step_recorded_s=t_recorded,
                train_step_ratio=r_seed, train_step_ratio_recorded=r_recorded)


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
        t_vcd, t_base, r_vcd = paired(lambda: answer(True), answer, device, args.repeats)
    base = adapter.remove_adapter(copy.deepcopy(model))  # a second copy: the base model
    adapter.merge_adapter(model)

    def base_answer():
        with autocast:
            decode.generate(base, inputs, args.answer_tokens)

    t_merged, _, r_seed = paired(answer, base_answer, device, args.repeats)
    t_single, _, r_single = paired(one_at_a_time, answer, device, max(1, args.repeats // 2))
    return dict(answer_base_s=per_answer(t_base), answer_seed_s=per_answer(t_merged),
                answer_vcd_s=per_answer(t_vcd), answer_cost_ratio_seed=r_seed,
                answer_cost_ratio_vcd=r_vcd, eval_single_s=per_answer(t_single),
                eval_batched_speedup=r_single)


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

    t_library, t_ours, r_library = paired(library, ours, device, args.repeats)
    t_purified, _, r_purified = paired(lambda: ours(True), ours, device, args.repeats)
    t_recording, _, r_recording = paired(lambda: ours(True, True), lambda: ours(True), device,
                                         args.repeats)
    # throughput: tokens per second, the inverse of the time ratios
    inverse = lambda r: {"median": 1 / r["median"], "min": 1 / r["max"],  # noqa: E731
                         "max": 1 / r["min"]}
    return dict(decode_ours_s=t_ours, decode_generate_s=t_library, decode_purified_s=t_purified,
                decode_recording_s=t_recording, decode_throughput_ratio=r_library,
                decode_purified_throughput_ratio=inverse(r_purified),
                examples_record_ratio=r_recording)


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
    model, make_batch = build(args.shape, device, dtype, args.layers[0])
    optimizer = torch.optim.AdamW(adapter.add_adapter(
        model, rank=args.rank, alpha_r=2.0 * args.rank,
        targets=adapter.parse_targets(args.adapter_targets)), lr=1e-4)
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


def peak_memories(args):
    """5. The peak memory of each step, each in a fresh process (no peak inherited)."""
    peaks = {}
    for kind in ("seed", "recorded", "sft"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind, "--device",
                   args.device, "--dtype", args.dtype, "--shape", args.shape, "--batch-size",
                   str(args.batch_size), "--adapter-targets", args.adapter_targets, "--rank",
                   str(args.rank)]
        if args.layers[0]:
            command += ["--layers", str(args.layers[0])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[kind] = json.loads(output.strip().splitlines()[-1])["peak_bytes"]
    return dict(peak_memory_seed_bytes=peaks["seed"], peak_memory_sft_bytes=peaks["sft"],
                peak_memory_recorded_bytes=peaks["recorded"],
                peak_memory_ratio=peaks["seed"] / peaks["sft"],
                peak_memory_ratio_recorded=peaks["recorded"] / peaks["sft"])


def ratios(args):
    """The default mode: figures 1-5."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, make_batch = build(args.shape, device, dtype, args.layers[0])
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size,
               "adapter_targets": args.adapter_targets, "rank": args.rank}
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
             f"{r['batch_size']}, adapter of rank {r['rank']} on {r['adapter_targets']}",
             f"{'ratio (median of pairwise ratios)':<48}{'median  (spread)':<28}target",
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


# ---------------------------------------------------------------------------------------------
# --memory: the bytes a step keeps for its backward

def saved_bytes(model, run):
    """(bytes that the autograd graph keeps for the backward while run() builds it, run()'s result):
    the distinct storages of every tensor it saves (torch.autograd.graph.saved_tensors_hooks), the
    model's own parameters left out (they are in memory anyway). Under gradient checkpointing the
    layers' insides are saved by the checkpoint itself and recomputed: they do not count."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(kept.values()), result


def float32_adapter_forward(self, x):
    """The adapter's forward as an earlier version computed it: its input cast to float32 (--memory
    measures what that cast keeps)."""
    out = self.base(x)
    if not self.enabled:
        return out
    update = (x.to(self.A.dtype) @ self.A.T) @ self.B.T
    return out + (self.scale * update).to(out.dtype)


def step_bytes(args, layers):
    """{variant: saved bytes} of one recorded SEED step and one plain step on a model `layers`
    deep, one row of --tokens tokens (576 image tokens), bf16 weights under autocast."""
    device, dtype = torch.device(args.device), torch.bfloat16
    model, make_batch = build(args.shape, device, dtype, layers)
    adapter.add_adapter(model, targets=adapter.parse_targets(args.adapter_targets))
    image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    batch = make_batch(1, prompt_tokens=args.tokens - image - args.response_tokens,
                       response_tokens=args.response_tokens)
    batch = with_recorded_teacher(batch, model.config.text_config.vocab_size)
    autocast = torch.autocast(device.type, dtype=dtype)
    figures = {}
    variants = [(name, checkpointing, kind)
                for name, checkpointing in (("plain", False), ("checkpointed", True))
                for kind in ("recorded", "sft")]
    for name, checkpointing, kind in variants:
        models.checkpoint_decoder_layers(model, checkpointing)
        with autocast:
            figures[f"{kind}, {name}"], loss = saved_bytes(model,
                                                           lambda: step_loss(model, batch, kind))
        loss.backward()
    models.checkpoint_decoder_layers(model, False)
    real_forward = adapter.AdapterLinear.forward
    adapter.AdapterLinear.forward = float32_adapter_forward
    try:
        with autocast:
            figures["recorded, adapter in float32"], loss = saved_bytes(
                model, lambda: step_loss(model, batch, "recorded"))
    finally:
        adapter.AdapterLinear.forward = real_forward
    return figures


def memory_figures(args):
    """--memory: saved bytes a token a decoder layer (the slope over the depths), and the rest (a
    response position's logits and what does not grow with the depth) per response position."""
    by_depth = {layers: step_bytes(args, layers) for layers in args.layers}
    low, high = min(by_depth), max(by_depth)
    results = {"shape": args.shape, "tokens": args.tokens, "response_tokens": args.response_tokens,
               "adapter_targets": args.adapter_targets, "saved_bytes": by_depth,
               "parameters": parameter_count(args.shape)}
    per_layer, rest = {}, {}
    for variant in by_depth[low]:
        slope = (by_depth[high][variant] - by_depth[low][variant]) / max(high - low, 1)
        per_layer[variant] = slope / args.tokens
        rest[variant] = (by_depth[low][variant] - low * slope) / args.response_tokens
    results.update(per_token_per_layer=per_layer, rest_per_response_position=rest)
    print(f"saved for the backward, shape {args.shape} ({results['parameters'] / 1e9:.2f} B "
          f"parameters at full depth), one row of {args.tokens} tokens ({args.response_tokens} "
          f"response), bf16 under autocast, adapter on {args.adapter_targets}, depths "
          f"{sorted(by_depth)}:")
    print(f"{'step':<34}{'KB a token a layer':>20}{'KB a response position':>24}")
    for variant in per_layer:
        print(f"{variant:<34}{per_layer[variant] / 1000:>20.1f}{rest[variant] / 1000:>24.1f}")
    return results


# ---------------------------------------------------------------------------------------------
# --images: the share of the work that waits on images

def image_waits(args):
    """The share of purified decoding and of training steps spent waiting on images, before
    (read and preprocessed on the main thread, one processor call over a batch's rows) and after
    (each image once a batch, on a thread a batch ahead)."""
    import random
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    import eval_pope
    import replica

    processor = replica.make_processor(eval_pope.COCO_OBJECTS)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, _ = build(args.shape, device, dtype, args.layers[0],
                     image_token_id=processor.image_token_id)
    folder = tempfile.mkdtemp(prefix="bench-images-")
    rng = random.Random(0)
    batches = args.repeats
    images = []
    for i in range(batches * args.batch_size):  # a description and probes on each photo
        path = os.path.join(folder, f"COCO_train2014_{i:012d}.jpg")
        replica.write_jpeg(path, rng.choice(replica.COCO_SIZES), rng)
        images.append(path)
    probes = [f"Is there a {name} in the image? Please answer this question with one word."
              for name in eval_pope.COCO_OBJECTS[:6]]
    # as make_examples asks them: an image's probes one after another, a batch of rows
    prompts = [(i, text) for i in range(len(images)) for text in probes][:batches * args.batch_size]
    chunks = [prompts[s:s + args.batch_size] for s in range(0, len(prompts), args.batch_size)]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def before(chunk):  # the former prompt_batch: every row's image read and preprocessed
        texts = [models.chat_prompt(processor, text) for _, text in chunk]
        return processor(images=[models.open_image(images[i]) for i, _ in chunk], text=texts,
                         return_tensors="pt", padding=True, padding_side="left")

    def after(chunk):
        return seed.prompt_inputs(processor, images, chunk)

    def decode_chunk(inputs):
        with autocast, torch.no_grad():
            decode.generate(model, inputs.to(device), args.answer_tokens, contrast=True,
                            record=True)

    def waits(items, prepare, ahead, work):
        """{seconds waiting on prepare, seconds in all, the share} over the items."""
        waiting, began = 0.0, time.perf_counter()
        source = loading.prefetched(items, prepare, ahead=ahead)
        for _ in items:
            asked = time.perf_counter()
            prepared = next(source)
            waiting += time.perf_counter() - asked
            work(prepared)
        total = time.perf_counter() - began
        return {"waiting_s": waiting, "total_s": total, "share": waiting / total}

    decode_chunk(after(chunks[0]))  # warm-up
    results = {"shape": args.shape, "layers": args.layers[0], "batch_size": args.batch_size,
               "device": args.device}
    for name, prepare, ahead in (("before", before, 0), ("after", after, 2)):
        results[f"examples_{name}"] = waits(chunks, prepare, ahead, decode_chunk)
    # training steps: the recorded step on collated batches of (image, probe) examples
    examples = [{"image": i, "prompt": text, "response": [5, 6, 2]} for i, text in prompts]
    steps = [examples[s:s + args.batch_size] for s in range(0, len(examples), args.batch_size)]
    optimizer = torch.optim.AdamW(adapter.add_adapter(model), lr=1e-4)

    def train_step(batch):
        batch = with_recorded_teacher({k: v.to(device) for k, v in batch.items()},
                                      model.config.text_config.vocab_size)
        with autocast:
            loss = step_loss(model, batch, "recorded")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def collate_before(chunk):  # every example's image read and preprocessed, as collate did
        real = models.processed_prompts
        models.processed_prompts = lambda p, ims, texts, padding_side: p(
            images=[models.open_image(i) for i in ims],
            text=[models.chat_prompt(p, t) for t in texts], return_tensors="pt", padding=True,
            padding_side=padding_side)
        try:
            return seed.collate(chunk, processor, images)
        finally:
            models.processed_prompts = real

    train_step(seed.collate(steps[0], processor, images))  # warm-up
    for name, prepare, ahead in (("before", collate_before, 0),
                                 ("after", lambda c: seed.collate(c, processor, images), 2)):
        results[f"steps_{name}"] = waits(steps, prepare, ahead, train_step)
    print(f"waiting on images, shape {args.shape} with {args.layers[0]} layer(s), "
          f"{args.device}, batches of {args.batch_size} (an image's probes together), LLaVA-1.5's "
          f"processor, COCO-sized JPEGs:")
    for phase in ("examples", "steps"):
        b, a = results[f"{phase}_before"], results[f"{phase}_after"]
        print(f"  {phase:<9} before {b['share']:6.1%} of {b['total_s']:7.2f} s   after "
              f"{a['share']:6.1%} of {a['total_s']:7.2f} s")
    return results


# ---------------------------------------------------------------------------------------------
# Command line

def bench_problem(args):
    """The first bad flag, as one sentence; None if all is well."""
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        return f"--device {args.device}: no such device here (cpu, or cuda when there is one)"
    for flag, values in (("--layers", args.layers), ("--batch-size", [args.batch_size]),
                         ("--answer-tokens", [args.answer_tokens]),
                         ("--decode-tokens", [args.decode_tokens]), ("--repeats", [args.repeats]),
                         ("--response-tokens", [args.response_tokens]), ("--rank", [args.rank])):
        for value in values:
            if value is not None and value < 1:
                return f"{flag} must be at least 1, got {value}"
    if args.memory and args.shape == "tiny":
        return "--memory measures a real shape (--shape llava-7b, llava-13b, internvl2-8b, ...)"
    if args.memory and args.tokens <= 576 + args.response_tokens:
        return f"--tokens {args.tokens}: a row holds 576 image tokens and the response"
    if not adapter.parse_targets(args.adapter_targets):
        return "--adapter-targets names no layer"
    if args.json:  # before the benchmark, not after it
        import eval_pope

        return eval_pope.output_problem("--json", args.json, folder=False)
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights dtype (--memory: always bf16 under autocast)")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                        help="model shape (random weights)")
    parser.add_argument("--layers", type=int, nargs="+", default=[None],
                        help="override the layer count (same widths); --memory takes several")
    parser.add_argument("--batch-size", type=int, default=16, help="examples / questions per batch")
    parser.add_argument("--adapter-targets", default="all-linear",
                        help="the layers the adapter wraps (train.py's --adapter-targets, and "
                             "its default)")
    parser.add_argument("--rank", type=int, default=8,
                        help="the adapter's rank in the step figures (alpha_r = 2 x rank)")
    parser.add_argument("--answer-tokens", type=int, default=4,
                        help="tokens generated per POPE answer (and per probe in --images)")
    parser.add_argument("--decode-tokens", type=int, default=24,
                        help="tokens generated per row in the decoding throughput figures (a "
                             "description's length)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats (pairs) per figure, after a warm-up; --images: batches")
    parser.add_argument("--memory", action="store_true",
                        help="saved bytes a token a decoder layer of a step, at --layers depths")
    parser.add_argument("--tokens", type=int, default=618,
                        help="--memory: tokens a row (576 image tokens + prompt + response)")
    parser.add_argument("--response-tokens", type=int, default=25,
                        help="--memory: response tokens a row")
    parser.add_argument("--images", action="store_true",
                        help="the share of example making and of steps spent waiting on images")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--memory-probe", choices=["seed", "recorded", "sft"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = bench_problem(args)
    if problem:  # before anything is built, in one line
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    if args.shape != "tiny":  # say what it will take before it takes it
        layers = max(args.layers) if args.layers != [None] else None
        weights = parameter_count(args.shape, layers) * (2 if args.dtype == "bfloat16" or
                                                         args.memory else 4)
        print(f"{args.shape} at {layers or 'full'} depth: {weights / 2**30:.1f} GiB of weights "
              f"before any activation" + ("; a CPU takes minutes" if args.device == "cpu" else ""),
              flush=True)
    results = (memory_figures(args) if args.memory else image_waits(args) if args.images
               else ratios(args))
    if args.json:  # its folder made if missing: nothing measured is lost to a missing folder
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
