"""POPE: build, answer and score object-hallucination probes, compatible with the official files.

Paper: SEED (arXiv 2507.04680) reports POPE (Li et al., "Evaluating Object Hallucination in Large
Vision-Language Models", EMNLP 2023) as its headline metric. Formulas and protocol: METHOD.md 6.

    python eval_pope.py build  --objects map.json --out DIR         # or --coco instances_val2014.json
    python eval_pope.py answer --model CKPT --questions Q.json --images DIR --out A.jsonl --decoding greedy
    python eval_pope.py score  --questions Q.json ... --answers A.jsonl ...

Three decodings, side by side as METHOD.md 6 asks, all through decode.generate: `greedy`;
`sample` (temperature 1, top-p 1, seeded: the protocol behind the published 81.3); `vcd` /
`vcd-greedy` (purge.distort + purge.purify at every generated token: two forward passes per
token, the inference-time rival).
Sampling noise comes from one generator per question, seeded by (seed, question_id), so the
answers do not depend on the batch size or on where a resumed run restarted.
Not from the paper: the scorer's rule is the official one, quirks included; everything else
(batching, resuming, error messages) is ours.
"""
import argparse
import contextlib
import json
import os
import random
import re
import sys
from collections import Counter

import torch

import decode
import distributed
import purge

PROMPT_SUFFIX = " Please answer this question with one word."
SPLITS = ("random", "popular", "adversarial")


# ---------------------------------------------------------------------------------------------
# build: questions from object annotations

def article(name):
    return "an" if name[0].lower() in "aeiou" else "a"


def question_for(name):
    """POPE's question, as in the official files."""
    return f"Is there {article(name)} {name} in the image?"


def object_in(question):
    """The object a POPE question asks about: the inverse of question_for."""
    match = re.fullmatch(r"Is there an? (.+) in the image\?", question.strip())
    if match is None:
        raise ValueError(f"not a POPE question: {question!r}")
    return match.group(1)


def build_questions(objects_by_image, split, per_image=3, seed=0):
    """POPE questions for one split, in the official record format, alternating yes / no.

    objects_by_image maps an image file name to the objects truly in it. The positives ("yes"
    questions) are the same in all three splits, as in the official files; the negatives are absent
    from the image and not repeated for it: `random` uniformly among all objects seen, `popular` the
    most frequent (by images containing them), `adversarial` those that co-occur most with the
    positive they follow.

    Where this differs from POPE's build script (AoiDragon/POPE, utils.py `pope`):
    - positives are a seeded random sample of the image's objects; the script takes the first
      `per_image` objects in annotation order;
    - ties in frequency or co-occurrence go to the more frequent object, then to the name in
      alphabetical order; the script keeps the order in which objects were first seen;
    - when no absent object co-occurs with a positive, adversarial takes the most frequent absent
      one; the script falls back to a random object;
    - images with fewer than `per_image` objects, or fewer absent ones, are skipped (the script
      expects every image to have enough).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    positives_rng = random.Random(seed)  # used for positives only, so every split draws the same ones
    negatives_rng = random.Random(f"{seed}/{split}")
    present = {image: list(dict.fromkeys(objects)) for image, objects in objects_by_image.items()}
    frequency = Counter(o for objects in present.values() for o in objects)
    vocabulary = sorted(frequency)
    co_occurrence = Counter((a, b) for objects in present.values() for a in objects for b in objects if a != b)
    by_popularity = sorted(vocabulary, key=lambda o: (-frequency[o], o))
    records = []
    for image in sorted(present):
        objects = present[image]
        absent = [o for o in vocabulary if o not in objects]
        if len(objects) < per_image or len(absent) < per_image:
            continue
        positives = positives_rng.sample(objects, per_image)
        negatives = []
        for positive in positives:
            candidates = [o for o in absent if o not in negatives]
            if split == "random":
                negatives.append(negatives_rng.choice(candidates))
            elif split == "popular":
                negatives.append(next(o for o in by_popularity if o in candidates))
            else:  # the absent object seen most often beside this positive (then the most frequent)
                negatives.append(min(candidates, key=lambda o: (-co_occurrence[positive, o], -frequency[o], o)))
        for positive, negative in zip(positives, negatives):
            for name, label in ((positive, "yes"), (negative, "no")):
                records.append({"question_id": len(records) + 1, "image": image,
                                "text": question_for(name), "label": label})
    return records


def write_jsonl(records, path):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def objects_from_coco(instances_path):
    """{file_name: [category names]} from a COCO instances_*.json."""
    with open(instances_path) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    objects = {name: [] for name in files.values()}
    for annotation in coco["annotations"]:
        objects[files[annotation["image_id"]]].append(names[annotation["category_id"]])
    return objects


# ---------------------------------------------------------------------------------------------
# Question and answer files

def load_questions(path):
    """Read a POPE question file (JSON lines); errors name the file, the line and the question_id."""
    questions = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON line ({error.msg})") from None
            missing = [key for key in ("question_id", "image", "text") if key not in record]
            if missing:
                raise ValueError(f"{path}:{line_number}: question_id {record.get('question_id')} lacks {missing}")
            record["_line"] = line_number
            questions.append(record)
    if not questions:
        raise ValueError(f"{path}: no questions in the file")
    return questions


def read_answers(path):
    """Answers in a JSON-lines file, read only: blank lines are skipped, a bad line is an error
    naming the file and the line. The file is never changed (scoring must not alter what it scores)."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such answers file")
    answers = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                answers.append(json.loads(raw))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON line ({error.msg})") from None
    return answers


def resume_answers(path):
    """The answers a resumed run keeps: read_answers, after cutting a torn final line (a crash mid-write
    leaves one without its newline). Only the writer of the file, resuming it, may do that."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"{path}: cut a torn last line ({len(data) - keep} bytes, no newline): a crash mid-write; "
              f"that line is made again", file=sys.stderr)
    return read_answers(path)


# ---------------------------------------------------------------------------------------------
# answer: POPE questions through decode.generate, resumably

def _open_image(path, question_file, record):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"{question_file}:{record['_line']}: question_id {record['question_id']}: "
                         f"cannot read image {path} ({error})") from None


DECODINGS = {"greedy": dict(), "sample": dict(sample=True), "vcd": dict(sample=True, contrast=True),
             "vcd-greedy": dict(contrast=True)}


def contrast_settings(options):
    """The contrast of METHOD.md 2 (alpha, beta, noise_step) as read from parsed flags, for vcd decodings."""
    return {"alpha": options.alpha, "beta": options.beta, "noise_step": options.noise_step}


def answer_questions(model, processor, question_file, image_dir, out_path, decoding="greedy", batch_size=16,
                     seed=0, max_new_tokens=8, progress=True, **decode_options):
    """Answer every question of `question_file`, appending JSON lines to `out_path` as they come.

    Rerunning with the same `out_path` resumes after the last answer written. Returns the answers.
    """
    from tqdm import tqdm

    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {sorted(DECODINGS)}, got {decoding!r}")
    questions = load_questions(question_file)
    # Under torchrun process 0 reads the file (cutting a torn last line) and writes it; every process
    # decodes a batch of each chunk of batch_size x processes questions, gathered in order.
    main = distributed.is_main()
    answers = distributed.broadcast(resume_answers(out_path) if main else None)
    done = {a["question_id"] for a in answers}
    todo = [q for q in questions if q["question_id"] not in done]
    device = next(model.parameters()).device
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"POPE {decoding}",
               disable=not progress)
    chunk_size = batch_size * distributed.world_size()
    with open(out_path, "a") if main else contextlib.nullcontext() as out:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            first, stop = distributed.share(len(chunk), batch_size)
            records = []
            if first < stop:
                mine = chunk[first:stop]
                images = [_open_image(os.path.join(image_dir, q["image"]), question_file, q) for q in mine]
                prompts = [q["text"] + PROMPT_SUFFIX for q in mine]
                inputs = decode.prompt_batch(processor, images, prompts, device)
                generators = [decode.seeded_generator(seed, int(q["question_id"])) for q in mine]
                ids = decode.generate(model, inputs, max_new_tokens, generators=generators,
                                      eos_token_id=processor.tokenizer.eos_token_id,
                                      suppress_token_ids=decode.placeholder_token_ids(model, processor),
                                      **DECODINGS[decoding], **decode_options)
                records = [{"question_id": q["question_id"], "prompt": prompt,
                            "text": processor.tokenizer.decode(row, skip_special_tokens=True).strip(),
                            "label": q.get("label")} for q, prompt, row in zip(mine, prompts, ids)]
            records = distributed.gather(records)
            answers += records
            if main:
                out.write("".join(json.dumps(record) + "\n" for record in records))
                out.flush()
                os.fsync(out.fileno())  # a crash or Ctrl-C after this point loses nothing of this batch
            bar.update(len(chunk))
    bar.close()
    distributed.barrier()  # the file is complete before any process scores it
    return answers


# ---------------------------------------------------------------------------------------------
# score: the official metrics

def parse_answer(text):
    """The official POPE rule: text before the first '.', commas dropped, split on spaces; 'no' if
    any word is exactly 'No', 'not' or 'no', else 'yes' (so 'NO' counts as yes, as officially)."""
    text = text.split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def score(predictions, labels):
    """Accuracy, precision, recall, F1 and yes-ratio as fractions (yes is positive), plus tp/fp/tn/fn."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    total = max(len(pairs), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / total, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_files(question_file, answer_file):
    """Match answers to questions by question_id (a missing or extra id is an error) and score them."""
    labels = {q["question_id"]: q["label"] for q in load_questions(question_file)}
    answers = {a["question_id"]: a["text"] for a in read_answers(answer_file)}
    missing = sorted(set(labels) - set(answers))
    extra = sorted(set(answers) - set(labels))
    if missing:
        raise ValueError(f"{answer_file}: no answer for question_id {missing[0]} of {question_file}"
                         f" ({len(missing)} missing)")
    if extra:
        raise ValueError(f"{answer_file}: question_id {extra[0]} is not in {question_file} ({len(extra)} extra)")
    ids = sorted(labels)
    return score([parse_answer(answers[i]) for i in ids], [labels[i] for i in ids])


def format_table(rows):
    """rows: {name: metrics}. Percentages, columns in the order accuracy, precision, recall, F1, yes-ratio."""
    lines = [f"{'':<28}{'accuracy':>10}{'precision':>11}{'recall':>9}{'F1':>8}{'yes-ratio':>11}"]
    for name, m in rows.items():
        lines.append(f"{name:<28}{m['accuracy']:>10.2%}{m['precision']:>11.2%}{m['recall']:>9.2%}"
                     f"{m['f1']:>8.2%}{m['yes_ratio']:>11.2%}".replace("%", ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write the three POPE question files from object annotations")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--objects", help="JSON map: image file name -> list of objects in it")
    source.add_argument("--coco", help="a COCO instances_*.json annotation file")
    build.add_argument("--out", required=True, help="folder for <prefix>_pope_{random,popular,adversarial}.json")
    build.add_argument("--prefix", default="custom", help="file name prefix (the official files use 'coco')")
    build.add_argument("--per-image", type=int, default=3, help="positives (and negatives) per image")
    build.add_argument("--seed", type=int, default=0, help="seed for the random choices")

    answer = commands.add_parser("answer", help="run a model over a question file, resumably")
    answer.add_argument("--model", required=True, help="local checkpoint folder (LLaVA-1.5, InternVL, toy model)")
    answer.add_argument("--questions", required=True, help="POPE question file (JSON lines)")
    answer.add_argument("--images", required=True, help="folder holding the questions' images")
    answer.add_argument("--out", required=True, help="answers file (JSON lines); an existing one is resumed")
    answer.add_argument("--decoding", default="greedy", choices=sorted(DECODINGS), help="how to pick tokens")
    answer.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")
    answer.add_argument("--seed", type=int, default=0, help="seed of the sampling and distortion noise")
    answer.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit")
    answer.add_argument("--alpha", type=float, default=purge.ALPHA,
                        help="vcd decodings: contrast strength (METHOD.md 2)")
    answer.add_argument("--beta", type=float, default=purge.BETA, help="vcd decodings: plausibility cut (METHOD.md 2)")
    answer.add_argument("--noise-step", type=int, default=purge.NOISE_STEP,
                        help="vcd decodings: diffusion step of the distortion")
    answer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    answer.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")

    scorer = commands.add_parser("score", help="print the official metrics, one row per answers file")
    scorer.add_argument("--questions", nargs="+", required=True, help="question files, one per answers file")
    scorer.add_argument("--answers", nargs="+", required=True, help="answers files written by `answer`")
    scorer.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.objects:
            with open(args.objects) as f:
                objects = json.load(f)
        else:
            objects = objects_from_coco(args.coco)
        os.makedirs(args.out, exist_ok=True)
        for split in SPLITS:
            path = os.path.join(args.out, f"{args.prefix}_pope_{split}.json")
            records = build_questions(objects, split, per_image=args.per_image, seed=args.seed)
            write_jsonl(records, path)
            print(f"wrote {len(records)} questions to {path}")
    elif args.command == "answer":
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            parser.error(f"--model {args.model}: not a local checkpoint folder (no config.json; nothing is downloaded)")
        dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        model, processor = decode.load_model(args.model, args.device, dtype)
        contrast = contrast_settings(args) if DECODINGS[args.decoding].get("contrast") else {}
        answers = answer_questions(model, processor, args.questions, image_dir=args.images, out_path=args.out,
                                   decoding=args.decoding,
                                   batch_size=args.batch_size, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                   **contrast)
        print(f"{len(answers)} answers in {args.out}")
    else:
        if len(args.questions) != len(args.answers):
            parser.error("give one --questions file per --answers file")
        rows = {os.path.basename(a): score_files(q, a) for q, a in zip(args.questions, args.answers)}
        print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # bad records name file and line; a missing file names itself
        sys.exit(f"error: {error}")
