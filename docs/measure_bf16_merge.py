"""What merging into bf16 weights costs on the toy world: POPE greedy of reverse-KL SEED three ways
(float32 merged, bf16 base + float32 adapter, bf16 merged), and how many answers differ.

    python train.py --out out && python docs/measure_bf16_merge.py out

Not part of the method: a measurement script for docs/EXPERIMENTS.md (CPU, bf16 autocast).
"""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import adapter  # noqa: E402
import eval_pope  # noqa: E402
import models  # noqa: E402
import toyworld  # noqa: E402

out = sys.argv[1]
results = json.load(open(os.path.join(out, "results.json")))
world_config = toyworld.WorldConfig()
path, world = toyworld.build(world_config, progress=False)
pope_files, image_dir, _ = toyworld.eval_set(results["config"]["eval_images"], world, world_config)
adapter_dir = os.path.join(out, "seed_reverse", "round0")



def variant(name):
    model, processor = models.load_model(path, "cpu", torch.float32 if name == "float32 merged"
                                         else torch.bfloat16)
    adapter.load_adapter(model, adapter_dir)
    if name != "bf16 base + float32 adapter":
        adapter.merge_adapter(model)
    return model, processor


answers = {}
scratch = tempfile.mkdtemp()
for name in ("float32 merged", "bf16 base + float32 adapter", "bf16 merged"):
    model, processor = variant(name)
    if name == "bf16 merged":
        layers = [n for n, _ in model.named_parameters()
                  if n.endswith(("q_proj.weight", "v_proj.weight"))]
        ref, _ = models.load_model(path, "cpu", torch.bfloat16)
        ref_params = dict(ref.named_parameters())
        moved = sum(int((dict(model.named_parameters())[n] != ref_params[n]).sum()) for n in layers)
        total = sum(ref_params[n].numel() for n in layers)
        print(f"bf16 merged: {moved} of {total} adapted weights changed by the merge "
              f"({moved / total:.1%})")
    row = {}
    for split, qf in pope_files.items():
        f = os.path.join(scratch, f"{name.replace(' ', '_')}_{split}.jsonl")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "float32 merged"):
            got = eval_pope.answer_questions(model, processor, qf, image_dir, f, "greedy", 64,
                                             max_new_tokens=4, progress=False)
        answers[name, split] = [a["text"] for a in got]
        row[split] = eval_pope.score_files(qf, f)["f1"]
    print(f"{name:<30}" + "".join(f"{s} {100 * v:.1f}  " for s, v in row.items()))
for split in pope_files:
    a, b, c = (answers[n, split]
               for n in ("float32 merged", "bf16 base + float32 adapter", "bf16 merged"))
    print(f"{split}: answers differing from float32 merged: unmerged bf16 "
          f"{sum(x != y for x, y in zip(a, b))}, merged bf16 {sum(x != y for x, y in zip(a, c))} "
          f"of {len(a)}")
base = results["base"]["greedy"]
print("base (float32) greedy F1: "
      + "  ".join(f"{s} {100 * base[s]['f1']:.1f}" for s in pope_files))
