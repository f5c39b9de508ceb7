"""Where a SEED student falls short of its teacher: fit, generalisation or transfer (toy-world
runs).

    python docs/diagnose.py out/ [figures.json]   # a finished `python train.py` run

For the reverse-KL student of round 0 (the base model with round 0's adapter merged) and, as the
reference, the base model it started from (the student at step 0):
- fit: on the yes/no probes it was trained on, of the first answers the recorded purified teacher
  gives otherwise than the base model, the share the student gives as the teacher; and the mean
  reverse KL at every response position, base -> student;
- generalisation: the same on the held-out examples (seed.hold_out's split, never trained on);
- transfer: on POPE's questions, the share of the answers VCD decoding changed (base -> VCD, the
  teacher's own change) that the final student (after every round) changed the same way, and the
  answers it changed that VCD did not, with how many of each are right.
The examples are read back from the run's examples log by make_examples itself (nothing decoded
again) and split as self_evolve splits them.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import adapter  # noqa: E402
import cli  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import seed  # noqa: E402
import toyworld  # noqa: E402
import train  # noqa: E402


def run_examples(out, config, model, processor, images, object_names):
    """Round 0's examples as self_evolve made them (train.round_examples over the run's examples
    log, which holds every answer: nothing is decoded again; other settings' logs are refused),
    split into (trained, held out) as it split them."""
    return train.round_examples(model, processor, images, object_names,
                                os.path.join(out, "base", "examples.jsonl"), config,
                                toyworld.DESCRIBE, {"run": cli.run_fingerprint(config)}, 0)


@torch.no_grad()
def first_answers(model, processor, images, examples, batch_size=32):
    """(the model's top first answer token on each probe, the recorded teacher's, mean reverse KL
    per response position over all the examples)."""
    model_top, teacher_top = [], []
    kl_sum = positions = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = seed.collate(chunk, processor, images)
        _, (ids, logits), student = seed.recorded_seed_step(model, batch, "reverse", void_eps=1e-4)
        first = 0
        for e, n in zip(chunk, batch["response_mask"][:, 1:].sum(-1).tolist()):
            if e["prompt"] != toyworld.DESCRIBE:  # a yes/no probe
                model_top.append(int(student[first].argmax()))
                teacher_top.append(int(ids[first][logits[first].argmax()]))
            first += n
        kl_sum += float(losses.sparse_reverse_kl(student, ids, logits, eps=1e-4)) * student.shape[0]
        positions += student.shape[0]
    return model_top, teacher_top, kl_sum / max(positions, 1)


def changes_taken(base_top, student_top, teacher_top):
    """(probes the teacher answers otherwise than the base, those of them the student answers as
    the teacher does)."""
    changed = [i for i, (b, t) in enumerate(zip(base_top, teacher_top)) if b != t]
    return len(changed), sum(student_top[i] == teacher_top[i] for i in changed)


def yes(record):
    return record["text"].strip().lower().startswith("yes")


def transfer(out, method, split):
    """On POPE's greedy answers: (VCD's changes, of them right, the student's same changes, the
    student's other changes, of them right)."""
    read = lambda m, name: [json.loads(line)
                            for line in open(os.path.join(out, m, "answers", name))]
    base = read("base", f"greedy_{split}_seed0.jsonl")
    vcd = read("vcd", f"vcd-greedy_{split}_seed0.jsonl")
    student = read(method, f"greedy_{split}_seed0.jsonl")
    truth = [b["label"] == "yes" for b in base]
    changed = [i for i in range(len(base)) if yes(base[i]) != yes(vcd[i])]
    taken = [i for i in changed if yes(student[i]) == yes(vcd[i])]
    own = [i for i in range(len(base)) if yes(base[i]) == yes(vcd[i])
           and yes(student[i]) != yes(base[i])]
    right = lambda indices, answers: sum(yes(answers[i]) == truth[i] for i in indices)
    return len(changed), right(changed, vcd), len(taken), len(own), right(own, student)


def main(out, json_path=None):
    config = cli.Config(**json.load(open(os.path.join(out, "results.json")))["config"])
    world_config = toyworld.WorldConfig(world_seed=config.world_seed, steps=config.pretrain_steps)
    model_path, world = toyworld.build(world_config, progress=False, shipped=config.shipped_base)
    images = cli.toy_round_images(config, world, world_config)[0][0]  # round 0's
    base, processor = models.load_model(model_path)
    trained, held_out = run_examples(out, config, base, processor, images, list(world["names"]))
    print(f"world {config.world_seed}, {len(trained)} training examples, {len(held_out)} held out")
    student, _ = models.load_model(model_path)  # round 0's student: the base + its adapter
    adapter.load_adapter(student, os.path.join(out, "seed_reverse", "round0"))
    adapter.merge_adapter(student)
    tops = {name: {part: first_answers(model, processor, images, chunk)
                   for part, chunk in (("trained", trained), ("held out", held_out))}
            for name, model in (("base", base), ("student", student))}
    figures = {}
    for part in ("trained", "held out"):
        (base_top, teacher_top, base_kl), (student_top, _,
                                           student_kl) = tops["base"][part], tops["student"][part]
        changed, taken = changes_taken(base_top, student_top, teacher_top)
        figures[part] = {"changed": changed, "taken": taken, "probes": len(base_top),
                         "kl_base": base_kl, "kl_student": student_kl}
        print(f"{part:8s} probes: the teacher changed {changed} of {len(base_top)} first answers, "
              f"the student made {taken} of those changes ({taken / max(changed, 1):.0%}); reverse "
              f"KL per position {base_kl:.4f} -> {student_kl:.4f}")
    for split in ("random", "popular", "adversarial"):
        changed, right, taken, own, own_right = transfer(out, "seed_reverse", split)
        figures[split] = {"changed": changed, "right": right, "taken": taken, "own": own,
                          "own_right": own_right}
        print(f"POPE {split:11s}: VCD changed {changed} answers ({right} to right); the final "
              f"student made {taken} of those changes ({taken / max(changed, 1):.0%}) and {own} "
              f"of its own ({own_right} to right)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out", sys.argv[2] if len(sys.argv) > 2 else None)
