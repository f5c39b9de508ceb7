"""POPE: build, answer and score object-hallucination probes, compatible with the official files.

Paper: SEED (arXiv 2507.04680) reports POPE (Li et al., "Evaluating Object Hallucination in Large
Vision-Language Models", EMNLP 2023) as its headline metric. Formulas and protocol: METHOD.md 6.

    python eval_pope.py build  --objects map.json --out DIR  # or --coco instances_val2014.json
    python eval_pope.py answer --model CKPT --questions Q.json --images DIR --out A.jsonl
    python eval_pope.py score  --questions Q.json ... --answers A.jsonl ...

Three decodings, side by side as METHOD.md 6 asks, all through decode.generate: `greedy`;
`sample` (temperature 1, top-p 1, seeded: the protocol behind the published 81.3); `vcd-sample` /
`vcd-greedy` (purge.distort + purge.purify at every generated token: two forward passes per
token, the inference-time rival).
Sampling noise comes from one generator per question, seeded by (seed, question_id), so the
answers do not depend on the batch size or on where a resumed run restarted.
Not from the paper: the scorer's rule is the official one, quirks included; everything else
(batching, resuming, error messages) is ours.
"""
import argparse
import json
import os
import random
import re
import sys
from collections import Counter

import torch

import decode
import distributed
import models
import purge
import runs

PROMPT_SUFFIX = " Please answer this question with one word."
SPLITS = ("random", "popular", "adversarial")


# ---------------------------------------------------------------------------------------------
# build: questions from object annotations

# The 80 COCO classes, the objects POPE asks about; train.py probes unlabeled images with them
COCO_OBJECTS = [name.replace("_", " ") for name in (  # 80 names, some of two words
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush").split()]

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
    # used for positives only, so every split draws the same ones
    positives_rng = random.Random(seed)
    negatives_rng = random.Random(f"{seed}/{split}")
    present = {image: list(dict.fromkeys(objects)) for image, objects in objects_by_image.items()}
    frequency = Counter(o for objects in present.values() for o in objects)
    vocabulary = sorted(frequency)
    co_occurrence = Counter((a, b) for objects in present.values() for a in objects for b in objects
                            if a != b)
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
                negatives.append(
                    min(candidates, key=lambda o: (-co_occurrence[positive, o], -frequency[o], o)))
        for positive, negative in zip(positives, negatives):
            for name, label in ((positive, "yes"), (negative, "no")):
                records.append({"question_id": len(records) + 1, "image": image,
                                "text": question_for(name), "label": label})
    return records


def write_jsonl(records, path):
    runs.write_json_lines(path, records)


def objects_from_coco(coco):
    """{file_name: [category names]} from a COCO instances_*.json, as read."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    objects = {name: [] for name in files.values()}
    for annotation in coco["annotations"]:
        objects[files[annotation["image_id"]]].append(names[annotation["category_id"]])
    return objects


# ---------------------------------------------------------------------------------------------
# Question and answer files, and the checks made before any work


def load_questions(path, labelled=False):
    """Read a POPE question file (JSON lines); errors name the file, the line and the question_id.
    labelled: every question must carry its "label", yes or no (scoring needs it)."""
    numbered = runs.json_lines(path)
    for line_number, record in numbered:
        needed = ("question_id", "image", "text") + (("label",) if labelled else ())
        missing = [key for key in needed if key not in record]
        if missing:
            raise ValueError(
                f"{path}:{line_number}: question_id {record.get('question_id')} lacks {missing}")
        kinds = {"question_id": "an integer", "image": "a string (a file name)",
                 "text": "a string"}
        wrong = next((key for key, kind in kinds.items()
                      if not (isinstance(record[key], int) and not isinstance(record[key], bool)
                              if key == "question_id" else isinstance(record[key], str))), None)
        if wrong:
            raise ValueError(f"{path}:{line_number}: \"{wrong}\" must be {kinds[wrong]} (as in "
                             f"POPE's files), got {json.dumps(record[wrong])[:60]}")
        if labelled and record["label"] not in ("yes", "no"):
            raise ValueError(f"{path}:{line_number}: question_id {record['question_id']}: label "
                             f"must be yes or no, got {record['label']!r}")
        record["_line"] = line_number
    refuse_repeated_ids(path, numbered, "a second question with")
    if not numbered:
        raise ValueError(f"{path}: no questions in the file")
    return [record for _, record in numbered]


def read_answers(path):
    """The answers of a JSON-lines file: each an object with a question_id and a "text", one per
    question_id; anything else is an error naming the file and the line (which is left as it is).
    """
    numbered = runs.json_lines(path)
    for line_number, record in numbered:
        if "question_id" not in record or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{line_number}: an answer needs a question_id and a \"text\" "
                             f"string, got keys {sorted(record)}")
    refuse_repeated_ids(path, numbered, "a second answer to")
    return [record for _, record in numbered]


def refuse_repeated_ids(path, numbered, what):
    """An error naming both lines where a question_id comes twice in [(line number, record)]."""
    first = {}
    for line_number, record in numbered:
        if record["question_id"] in first:
            raise ValueError(f"{path}:{line_number}: {what} question_id {record['question_id']} "
                             f"(the first on line {first[record['question_id']]})")
        first[record["question_id"]] = line_number


def fingerprint(path):
    """The first 16 hex digits of a file's sha256: which question file answers belong to."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def unreadable_images(paths, progress=False, desc="checking images"):
    """[(path, why)] of the images that cannot be read: each is opened and decoded whole (JPEGs at
    1/8 scale, which still reads every byte, so a truncated file shows), before any forward pass."""
    from PIL import Image
    from tqdm import tqdm

    bad = []
    for path in tqdm(paths, desc=desc, disable=not progress):
        try:
            with Image.open(path) as image:
                # a JPEG decodes at 1/8 scale: ~10x faster, every byte still read
                image.draft("RGB", (1, 1))
                image.load()
        # PIL raises SyntaxError on some broken headers, DecompressionBombError on images of more
        # than 2 x Image.MAX_IMAGE_PIXELS pixels (a file that would fill the memory)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            bad.append((path, " ".join(str(error).split())[:200]))
    return bad


def image_problem(questions, question_file, image_dir, progress=False):
    """The first question whose image is missing or unreadable, as one sentence naming its line;
    None if all read."""
    if not os.path.isdir(image_dir):
        return f"{image_dir}: " + ("not a folder" if os.path.exists(image_dir)
                                   else "no such folder")
    first = {}
    for q in questions:
        first.setdefault(q["image"], q)
    absent = [q for name, q in first.items() if not os.path.isfile(os.path.join(image_dir, name))]
    if absent:
        return (f"{question_file}:{absent[0]['_line']}: image {absent[0]['image']} is not in "
                f"{image_dir} ({len(absent)} of the file's images are missing)")
    bad = unreadable_images([os.path.join(image_dir, name) for name in first], progress,
                            desc="checking POPE images")
    if bad:
        q = first[os.path.basename(bad[0][0])]
        return (f"{question_file}:{q['_line']}: cannot read image {bad[0][0]} ({bad[0][1]}; "
                f"{len(bad)} unreadable)")
    return None


def out_of_range(flag, value, low=None, high=None, above=False, below=False):
    """'flag must be ...' when a number is not finite or out of [low, high] (above / below:
    strictly), else None."""
    if value != value or value in (float("inf"), float("-inf")):
        return f"{flag} must be a finite number, got {value}"
    if low is not None and (value <= low if above else value < low):
        return f"{flag} must be {'above' if above else 'at least'} {low}, got {value}"
    if high is not None and (value >= high if below else value > high):
        return f"{flag} must be {'below' if below else 'at most'} {high}, got {value}"
    return None


def output_problem(flag, path, folder):
    """Why `path` cannot be written as an output folder (folder=True) or file, or None."""
    if not path.strip():
        return f"{flag} is empty: name a {'folder' if folder else 'file'}"
    if os.path.exists(path):
        if folder != os.path.isdir(path):
            return f"{flag} {path}: " + ("a file, not a folder" if folder
                                         else "a folder, not a file")
        return None if os.access(path, os.W_OK) else f"{flag} {path}: not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: cannot be made, {parent} is a file"
    if os.access(parent, os.W_OK):
        return None
    return f"{flag} {path}: cannot be made, {parent} is not writable"


# ---------------------------------------------------------------------------------------------
# answer: POPE questions through decode.generate, resumably

DECODINGS = {"greedy": dict(), "sample": dict(sample=True),
             "vcd-sample": dict(sample=True, contrast=True), "vcd-greedy": dict(contrast=True)}
FORMER_NAMES = {"vcd": "vcd-sample"}  # still accepted by --decoding


def contrast_options(options):
    """The contrast's settings of METHOD.md 2 (alpha, beta, noise_step) from parsed flags."""
    return {"alpha": options.alpha, "beta": options.beta, "noise_step": options.noise_step}


def answer_settings(question_file, decoding, seed, max_new_tokens, made_with=None,
                    **decode_options):
    """An answer's "made_with": the caller's (the model, or train.py's run), the question file's
    sha256 and the decoding settings; resume_records refuses other ones."""
    return {"questions": fingerprint(question_file), "decoding": decoding, "seed": seed,
            "max_new_tokens": max_new_tokens, **decode_options, **(made_with or {})}


def answer_questions(model, processor, question_file, image_dir, out_path, decoding="greedy",
                     batch_size=16, seed=0, max_new_tokens=8, progress=True, made_with=None,
                     meter=None, **decode_options):
    """Answer every question of `question_file`, appending JSON lines to `out_path` as they come.

    Rerunning with the same `out_path` and settings resumes after the last answer written; a file
    made with other settings (answer_settings) is refused. Returns the answers.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {sorted(DECODINGS)}, got {decoding!r}")
    questions = load_questions(question_file)
    settings = answer_settings(question_file, decoding, seed, max_new_tokens, made_with,
                               **decode_options)
    items = [{"question_id": q["question_id"], "prompt": q["text"] + PROMPT_SUFFIX,
              "label": q.get("label"), "_image": os.path.join(image_dir, q["image"])}
             for q in questions]
    return answer_prompts(model, processor, items, "question_id", out_path, settings, decoding,
                          batch_size, seed, max_new_tokens, progress=progress, meter=meter,
                          desc=f"POPE {decoding}", **decode_options)


def answer_prompts(model, processor, items, id_key, out_path, settings, decoding="greedy",
                   batch_size=16, seed=0, max_new_tokens=8, text_key="text", progress=True,
                   meter=None, desc=None, **decode_options):
    """One answer per item, decoded with `decoding` and appended to `out_path` as JSON lines as
    they come (POPE's questions here, CHAIR's descriptions in eval_chair.py).

    items: {id_key: its id (one answer each; it seeds the item's noise, so an answer never depends
    on its batch), "prompt": the text, "_image": the image's path, and any fields to copy into its
    answer}. Each answer is {id_key, "prompt", text_key: the decoded text, the item's other fields,
    "made_with": settings}; a file holding answers made with other settings is refused
    (runs.resume_records), one made with these is resumed after its last answer. Each batch's
    images are read on a thread while the batch before is decoded; meter(answers, seconds) is told
    of each batch (optional). Returns every answer, in the items' order.
    """
    # Under torchrun process 0 reads the file (cutting a torn last line) and writes it
    answers = distributed.broadcast(runs.resume_records(out_path, settings) if distributed.is_main()
                                    else None)
    done = {a[id_key] for a in answers}
    todo = [item for item in items if item[id_key] not in done]
    device = next(model.parameters()).device
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    def prepare(batch):  # on a thread, a batch ahead: reads the images (an unreadable one named)
        return models.prompt_batch(processor, [item["_image"] for item in batch],
                                   [item["prompt"] for item in batch])

    def answer_batch(batch, _, inputs):
        generators = [decode.seeded_generator(seed, int(item[id_key])) for item in batch]
        ids = decode.generate(model, inputs.to(device), max_new_tokens, generators=generators,
                              eos_token_id=processor.tokenizer.eos_token_id,
                              suppress_token_ids=models.placeholder_token_ids(model, processor),
                              **DECODINGS[decoding], **decode_options)
        return [{id_key: item[id_key], "prompt": item["prompt"],
                 text_key: processor.tokenizer.decode(row, skip_special_tokens=True).strip(),
                 **{k: v for k, v in item.items() if k not in (id_key, "prompt")
                    and not k.startswith("_")}}
                for item, row in zip(batch, ids)]

    answers += runs.decode_and_log(todo, answer_batch, batch_size, out_path, settings,
                                   progress=progress, desc=desc, total=len(items),
                                   prepare=prepare, meter=meter)
    distributed.barrier()  # the file is complete before any process reads it
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
    """Accuracy, precision, recall, F1, yes-ratio (fractions; yes is positive) and tp/fp/tn/fn."""
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
    """Match answers to questions by question_id and score them. Refused: a missing or stray id, and
    answers made for another question file (by the sha256 they record, and by their prompts)."""
    questions = {q["question_id"]: q for q in load_questions(question_file, labelled=True)}
    answers = {a["question_id"]: a for a in read_answers(answer_file)}
    missing = sorted(set(questions) - set(answers), key=str)
    extra = sorted(set(answers) - set(questions), key=str)
    if missing or extra:
        raise ValueError(f"{answer_file}: does not answer {question_file}: "
                         + (f"no answer for question_id {missing[0]} ({len(missing)} missing)"
                            if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"question_id {extra[0]} is not a question there ({len(extra)} stray)"
                            if extra else ""))
    sha = fingerprint(question_file)
    for i, a in answers.items():
        made_for = a.get("made_with", {}).get("questions", sha)  # files from elsewhere record none
        if made_for != sha:
            raise ValueError(f"{answer_file}: made for a question file of sha256 {made_for}, not "
                             f"for {question_file} ({sha})")
        if questions[i]["text"] not in a.get("prompt", questions[i]["text"]):
            raise ValueError(f"{answer_file}: question_id {i} answers {a['prompt']!r}, but "
                             f"{question_file}:{questions[i]['_line']} asks "
                             f"{questions[i]['text']!r}: another question file's answers")
    ids = sorted(questions, key=str)
    return score([parse_answer(answers[i]["text"]) for i in ids],
                 [questions[i]["label"] for i in ids])


def format_table(rows):
    """rows: {name: metrics}, in percent: accuracy, precision, recall, F1, yes-ratio."""
    width = max([28] + [len(name) + 2 for name in rows])
    lines = [f"{'':<{width}}{'accuracy':>10}{'precision':>11}{'recall':>9}{'F1':>8}"
             f"{'yes-ratio':>11}"]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}{m['accuracy']:>10.2%}{m['precision']:>11.2%}"
                     f"{m['recall']:>9.2%}"
                     f"{m['f1']:>8.2%}{m['yes_ratio']:>11.2%}".replace("%", ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build",
                                help="write the three POPE question files from object annotations")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--objects", help="JSON map: image file name -> list of objects in it")
    source.add_argument("--coco", help="a COCO instances_*.json annotation file")
    build.add_argument("--out", required=True,
                       help="folder for <prefix>_pope_{random,popular,adversarial}.json")
    build.add_argument("--prefix", default="custom",
                       help="file name prefix (the official files use 'coco')")
    build.add_argument("--per-image", type=int, default=3,
                       help="positives (and negatives) per image")
    build.add_argument("--seed", type=int, default=0, help="seed for the random choices")
    build.add_argument("--overwrite", action="store_true",
                       help="replace question files already in --out (refused without it)")

    answer = commands.add_parser("answer", help="run a model over a question file, resumably")
    answer.add_argument("--model", required=True,
                        help="local checkpoint folder (LLaVA-1.5, InternVL, toy model)")
    answer.add_argument("--questions", required=True, help="POPE question file (JSON lines)")
    answer.add_argument("--images", required=True, help="folder holding the questions' images")
    answer.add_argument("--out", required=True,
                        help="answers file (JSON lines); an existing one is resumed")
    answer.add_argument("--decoding", default="greedy",
                        choices=sorted(DECODINGS) + list(FORMER_NAMES), help="how to pick tokens")
    answer.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")
    answer.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling and distortion noise")
    answer.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit")
    add_decoding_flags(answer)

    scorer = commands.add_parser("score",
                                 help="print the official metrics, one row per answers file")
    scorer.add_argument("--questions", nargs="+", required=True,
                        help="question files, one per answers file")
    scorer.add_argument("--answers", nargs="+", required=True,
                        help="answers files written by `answer`")
    scorer.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    command = {"build": build_command, "answer": answer_command,
               "score": score_command}[args.command]
    try:
        command(args)
    # before any work: one line naming the flag, or the file and its line
    except Refused as refusal:
        parser.exit(2, f"{parser.prog} {args.command}: error: {refusal}\n")


def add_decoding_flags(parser):
    """The flags of the vcd decodings' contrast, the device and the weights' dtype (`answer`
    here and in eval_chair.py)."""
    parser.add_argument("--alpha", type=float, default=purge.ALPHA,
                        help="vcd decodings: contrast strength (METHOD.md 2)")
    parser.add_argument("--beta", type=float, default=purge.BETA,
                        help="vcd decodings: plausibility cut (METHOD.md 2)")
    parser.add_argument("--noise-step", type=int, default=purge.NOISE_STEP,
                        help="vcd decodings: diffusion step of the distortion")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")


class Refused(Exception):
    """A bad flag or input file, found before any work."""


def refuse_if(problem):
    if problem:
        raise Refused(problem)


def read_json(path, flag):
    """A JSON file, or a refusal naming the flag, the file and where it breaks."""
    refuse_if(None if os.path.isfile(path) else f"{flag} {path}: " + (
        "a folder, not a file" if os.path.isdir(path) else "no such file"))
    try:
        return read_coco(path)
    except ValueError as error:
        raise Refused(f"{flag} {error}") from None


def read_coco(path):
    """A JSON file (COCO's annotations, or any), or a ValueError naming it and where it breaks."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        parsed = isinstance(error, json.JSONDecodeError)
        where = f":{error.lineno}:{error.colno}: {error.msg}" if parsed else f": {error}"
        raise ValueError(f"{path}{where} (not a JSON file)") from None


def folder_problem(flag, path):
    """Why `path` is not a folder to read, or None."""
    if os.path.isdir(path):
        return None
    return f"{flag} {path}: " + ("not a folder" if os.path.exists(path) else "no such folder")


def model_problem(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
        return (f"--model {path}: not a local checkpoint folder (no config.json; nothing is "
                "downloaded)")
    return None


def contrast_problem(args):
    """The first of --alpha, --beta, --noise-step out of its range, or None."""
    return (out_of_range("--alpha", args.alpha, low=0)
            or out_of_range("--beta", args.beta, 0, 1, above=True)
            or out_of_range("--noise-step", args.noise_step, 0, purge.NUM_DIFFUSION_STEPS - 1))


def device_problem(device):
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        return f"--device {device}: no such device here (cpu, or cuda when there is one)"
    return None


def weights_dtype(name, device):
    """--dtype: auto is bfloat16 on a GPU, float32 on the CPU."""
    return {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def claim_output(path):
    """The output file claimed for this process (runs.claim), or a refusal naming the process that
    holds it: two writers would interleave their answers."""
    try:
        return runs.claim(path)
    except runs.InUse as error:
        raise Refused(str(error)) from None


def load_or_refuse(path, device, dtype):
    """models.load_model, or a one-line refusal naming the folder and the cause."""
    try:
        return models.load_model(path, device, dtype)
    except Exception as error:  # transformers', safetensors' and tokenizers' errors alike
        raise Refused(f"--model {path}: cannot be loaded ({runs.short(error)})") from None


def build_command(args):
    refuse_if(None if args.per_image >= 1
              else f"--per-image must be at least 1, got {args.per_image}")
    refuse_if(output_problem("--out", args.out, folder=True))
    written = [os.path.join(args.out, f"{args.prefix}_pope_{split}.json") for split in SPLITS]
    existing = [p for p in written if os.path.exists(p)]
    refuse_if(f"--out {args.out}: {os.path.basename(existing[0])} exists ({len(existing)} of the "
              f"three files): --overwrite replaces them, or another --out or --prefix"
              if existing and not args.overwrite else None)
    if args.objects:
        objects = read_json(args.objects, "--objects")
        if not isinstance(objects, dict) or not all(isinstance(v, list)
                                                    and all(isinstance(o, str) for o in v)
                                                    for v in objects.values()):
            raise Refused(f"--objects {args.objects}: must map each image file name to a list of "
                          f"object names")
    else:
        coco = read_json(args.coco, "--coco")
        if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
            raise Refused(f"--coco {args.coco}: not a COCO instances file (needs images, "
                          f"annotations, categories)")
        objects = objects_from_coco(coco)
    splits = {split: build_questions(objects, split, per_image=args.per_image, seed=args.seed)
              for split in SPLITS}
    refuse_if(None if splits["random"]
              else f"no image has {args.per_image} objects and {args.per_image} absent ones: "
                   f"no questions (a smaller --per-image?)")
    os.makedirs(args.out, exist_ok=True)
    for split, records in splits.items():
        path = os.path.join(args.out, f"{args.prefix}_pope_{split}.json")
        runs.write_json_lines(path, records)
        print(f"wrote {len(records)} questions to {path}")


def answer_problem(args):
    """The first thing wrong with `answer`'s flags and files, checked before the model loads; None
    if all is well."""
    for flag, value in (("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            return f"{flag} must be at least 1, got {value}"
    problem = model_problem(args.model) or contrast_problem(args) or device_problem(args.device)
    if problem:
        return problem
    try:
        questions = load_questions(args.questions)
    except ValueError as error:  # names the file and the line
        return f"--questions {error}"
    return (output_problem("--out", args.out, folder=False)
            or image_problem(questions, args.questions, args.images))


def answer_command(args):
    args.decoding = FORMER_NAMES.get(args.decoding, args.decoding)
    refuse_if(answer_problem(args))
    dtype = weights_dtype(args.dtype, args.device)
    options = contrast_options(args) if DECODINGS[args.decoding].get("contrast") else {}
    made_with = {"model": os.path.abspath(args.model), "dtype": str(dtype).removeprefix("torch.")}
    settings = answer_settings(args.questions, args.decoding, args.seed, args.max_new_tokens,
                               made_with, **options)
    lock = claim_output(args.out)  # one writer a file: refused while another process writes it
    try:
        # a file made otherwise is refused before the model loads
        done = runs.resume_records(args.out, settings)
    except ValueError as error:
        raise Refused(str(error)) from None
    model, processor = load_or_refuse(args.model, args.device, dtype)
    try:
        answers = answer_questions(model, processor, args.questions, image_dir=args.images,
                                   out_path=args.out, decoding=args.decoding,
                                   batch_size=args.batch_size, seed=args.seed,
                                   max_new_tokens=args.max_new_tokens, made_with=made_with,
                                   **options)
    except KeyboardInterrupt:
        kept = len(runs.resume_records(args.out, settings)) if os.path.exists(args.out) else 0
        sys.exit(f"stopped: {kept} answers kept in {args.out} ({len(done)} before this run); the "
                 f"same command resumes after them")
    lock.close()
    print(f"{len(answers)} answers in {args.out}")


def score_command(args):
    refuse_if(None if len(args.questions) == len(args.answers)
              else "give one --questions file per --answers file")
    refuse_if(output_problem("--json", args.json, folder=False) if args.json else None)
    try:  # a row per answers file, named by the path as given (two files may share a name)
        rows = {a: score_files(q, a) for q, a in zip(args.questions, args.answers)}
    except ValueError as error:  # names the file and the line, or the question_id
        raise Refused(str(error)) from None
    print(format_table(rows))
    if args.json:
        runs.write_json(args.json, rows, indent=2)


def run_command(main, written):
    """main(), an error found during the work ended in one line: a failed write (a full disk, say)
    names the file and says that the `written` appended before it are kept, a ValueError names
    the file (and line) it found."""
    try:
        main()
    except OSError as error:
        sys.exit(f"error: cannot write {error.filename}: {error.strerror or error}; the {written} "
                 f"written before are kept, and the same command resumes after them")
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    run_command(main, "answers")
