"""CHAIR: object hallucination in free descriptions of COCO images, by the metric's published rules.

Paper: SEED (arXiv 2507.04680) and the papers in its line measure what a model says unprompted
with CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018), as OPERA's
`chair_eval.py` runs it on LVLMs: 500 COCO val2014 images drawn with a seed, the prompt "Please
describe this image in detail.", up to 512 new tokens. METHOD.md 6 has the figures' formulas.

    python eval_chair.py build  --images /data/coco/val2014 --out chair_sample.jsonl
    python eval_chair.py answer --model CKPT --sample chair_sample.jsonl \
        --images /data/coco/val2014 --out captions.jsonl   # --decoding greedy, vcd-greedy, ...
    python eval_chair.py score  --annotations /data/coco/annotations --captions captions.jsonl

The figures, over the descriptions of one file:
- CHAIR_s: descriptions with at least one hallucinated mention / all descriptions;
- CHAIR_i: hallucinated mentions / all mentions, every occurrence counted;
- Recall: distinct ground-truth objects mentioned / ground-truth objects, summed over descriptions;
- Len: words a description (`words`: punctuation off).

An object is mentioned when a word (or two-word name) of the description is in CHAIR's synonym
table (`chair_synonyms.txt`: the 80 COCO categories and their synonyms, the published table byte
for byte); it is hallucinated when its category is not in the image's ground truth: its instance
annotations' categories plus every category the same word procedure finds in its five reference
captions. The procedure is the metric's original code's (LisaAnne/Hallucination `chair.py`, as
OPERA and the Python 3 port CHAIR-metric-standalone run it), rule for rule, except the reduction of
plurals, which that code leaves to a library (pattern's `singularize`; nltk in the port) that this
project cannot install, and which is written here (`singular`):
- the same: lower-case; words as nltk's tokenizer splits them ("dog's" gives "dog", a hyphenated
  word stays one); two-word names merged left to right ("hot dog", "teddy bear", "traffic light",
  ...; "bow tie" -> tie, "toilet seat" -> toilet, "baby" / "adult" + an animal -> the animal,
  "passenger jet" / "train" -> jet / train, "train track" and "home plate" no object); where both
  "toilet" and "seat" occur every "seat" is dropped; the table's quirks kept as published (" motor
  bike" and " cheesecake" carry a leading space and never match, "iPhone" is never matched by a
  lower-cased word, "stove top oven" is three words and never merges);
- different, on purpose: "buses" and "bus" count as bus (pattern turns "bus" into "bu" and loses
  every bus), "ties" as tie (pattern: "ty"), "tennis racket" merges (pattern: "tenni racket", the
  racket then counted alone: the same category either way); verb forms are never reduced
  ("skiing", "training", "born" are not skis, train, bear, where the nltk port's lemmatizer reads
  them so), and "men" is man (the port keeps "men").
"""
import argparse
import json
import os
import random
import re

import eval_pope
import runs

PROMPT = "Please describe this image in detail."
SYNONYMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chair_synonyms.txt")

# ---------------------------------------------------------------------------------------------
# Words: the procedure of the metric's original code, plurals reduced by stated rules

def read_synonyms(path=SYNONYMS):
    """{word or two-word name: its category} of CHAIR's table (80 lines, one a category), read as
    the original reads it: each line split on ", ", the first entry its category, leading spaces
    kept (such an entry never matches a word, as in the original)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip().split(", ") for line in f.read().splitlines() if line.strip()]
    return {word: line[0] for line in lines for word in line}


CATEGORY_OF = read_synonyms()
ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
           "animal", "cub"]
# two words read as one, and what they are read as (the original's double_word_dict)
TWO_WORDS = {**{name: name for name in (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track")},
    **{f"{age} {animal}": animal for age in ("baby", "adult") for animal in ANIMALS},
    "passenger jet": "jet", "passenger train": "train", "bow tie": "tie", "toilet seat": "toilet"}

# plurals the rules below would get wrong, for the table's words (and a few beside them)
IRREGULAR = {"men": "man", "women": "woman", "gentlemen": "gentleman", "policemen": "policeman",
             "servicemen": "serviceman", "children": "child", "grandchildren": "grandchild",
             "people": "people", "knives": "knife", "pocketknives": "pocketknife", "calves": "calf",
             "thieves": "thief", "mice": "mouse", "teeth": "tooth", "geese": "goose",
             "feet": "foot", "oxen": "ox", "buses": "bus", "busses": "bus", "minibuses": "minibus",
             "glasses": "glass", "scissors": "scissors", "skis": "ski",
             "buffaloes": "buffalo", "potatoes": "potato", "tomatoes": "tomato"}


def singular(word):
    """A lower-case noun's singular, by rules (ours; the original calls pattern's singularize):
    an irregular plural from IRREGULAR; a word not ending in s, or ending in ss, us or is (glass,
    bus, tennis, this) as it is; -ies: the last s dropped in words of four letters (ties, pies),
    else -y (puppies, ladies); -sses, -shes, -ches, -xes, -zzes: -es dropped (glasses, benches,
    boxes); else the last s dropped (cats, giraffes, bananas). Verb forms are left alone: a word
    ending in -ing or -ed has no s to drop."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if len(word) <= 2 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-1] if len(word) <= 4 else word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    return word[:-1]


def words(text):
    """The words of a text, lower-case, as nltk's word_tokenize splits them, punctuation left out:
    "dog's" gives "dog", "don't" gives "do", a hyphenated word stays one word."""
    found = re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())
    return [w[:-2] if w.endswith("'s") else w[:-3] if w.endswith("n't") else w.split("'")[0]
            for w in found]


def mentions(text):
    """Every mention of a COCO object in `text`, in order, each occurrence: [(word, category)].

    The original's procedure: the words singularized, two-word names merged left to right
    (TWO_WORDS), every "seat" dropped where "toilet" occurs too, then the words of the synonym
    table kept, each with its category."""
    single = [singular(w) for w in words(text)]
    merged, i = [], 0
    while i < len(single):
        pair = " ".join(single[i:i + 2])
        if pair in TWO_WORDS:
            merged.append(TWO_WORDS[pair])
            i += 2
        else:
            merged.append(single[i])
            i += 1
    if "toilet" in merged and "seat" in merged:  # the seat of a toilet is not a chair
        merged = [w for w in merged if w != "seat"]
    return [(w, CATEGORY_OF[w]) for w in merged if w in CATEGORY_OF]


# ---------------------------------------------------------------------------------------------
# Ground truth and the figures

def image_id_of(file_name):
    """COCO's image id from its file name (COCO_val2014_000000391895.jpg -> 391895), or None."""
    match = re.search(r"(\d+)\.(?:jpg|jpeg|png)$", file_name, re.IGNORECASE)
    return int(match.group(1)) if match else None


def annotation_files(folder, kind):
    """The folder's COCO 2014 annotation files of a kind (instances, captions), val first."""
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(rf"{kind}_\w+2014\.json", n))
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: "val" not in n)]


def ground_truth(folder, image_ids):
    """{image_id: set of categories} for `image_ids`: each image's instance categories plus the
    categories its reference captions mention (by `mentions`), from the folder's
    instances_*2014.json and captions_*2014.json (val2014's first; the others, such as train2014's,
    read only while images are still missing). Raises ValueError naming what is missing."""
    wanted = set(image_ids)
    truth = {i: set() for i in wanted}
    for kind in ("instances", "captions"):
        files = annotation_files(folder, kind)
        if not files:
            raise ValueError(f"--annotations {folder}: no {kind}_*2014.json (COCO's "
                             f"{kind}_val2014.json is needed)")
        seen = set()
        for path in files:
            if wanted <= seen:
                break
            coco = eval_pope.read_coco(path)
            seen |= {image["id"] for image in coco.get("images", [])} & wanted
            names = {c["id"]: c["name"] for c in coco.get("categories", [])}
            for annotation in coco["annotations"]:
                image = annotation.get("image_id")
                if image not in truth:
                    continue
                if kind == "instances":
                    truth[image].add(CATEGORY_OF[names[annotation["category_id"]]])
                else:
                    truth[image] |= {category for _, category in mentions(annotation["caption"])}
        missing = sorted(wanted - seen)
        if missing:
            raise ValueError(f"--annotations {folder}: image_id {missing[0]} is in none of "
                             f"{[os.path.basename(p) for p in files]} ({len(missing)} missing)")
    return truth


def score(descriptions, truth):
    """CHAIR_s, CHAIR_i, Recall and Len of [(image_id, text)] against {image_id: categories},
    and per description {"image_id", "mentions": [category, ...], "hallucinated": [...]} (every
    occurrence, in the order of the text)."""
    per_description = []
    mentioned = hallucinated = with_any = recalled = objects = length = 0
    for image_id, text in descriptions:
        found = [category for _, category in mentions(text)]
        wrong = [category for category in found if category not in truth[image_id]]
        per_description.append({"image_id": image_id, "mentions": found, "hallucinated": wrong})
        mentioned, hallucinated = mentioned + len(found), hallucinated + len(wrong)
        with_any += bool(wrong)
        recalled += len(set(found) & truth[image_id])
        objects += len(truth[image_id])
        length += len(words(text))
    n = max(len(descriptions), 1)
    figures = {"chair_s": with_any / n, "chair_i": hallucinated / max(mentioned, 1),
               "recall": recalled / max(objects, 1), "len": length / n,
               "descriptions": len(descriptions), "mentions": mentioned}
    return figures, per_description


def read_descriptions(path):
    """[(image_id, caption)] of a JSON-lines file of {"image_id": int, "caption": str} (OPERA's,
    or `answer`'s own), every line checked: an error names the file and the line."""
    descriptions = []
    for line_number, record in runs.json_lines(path):
        image_id, caption = record.get("image_id"), record.get("caption")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{path}:{line_number}: \"image_id\" must be an integer (COCO's), "
                             f"got {image_id!r}")
        if not isinstance(caption, str):
            raise ValueError(f"{path}:{line_number}: \"caption\" must be a string, got "
                             f"{type(caption).__name__}")
        descriptions.append((image_id, caption))
    if not descriptions:
        raise ValueError(f"{path}: no descriptions in the file")
    return descriptions


# ---------------------------------------------------------------------------------------------
# The sample and the descriptions

def sample_images(image_dir, count=500, seed=0):
    """[{"image_id", "image"}]: `count` images of a COCO folder drawn with `seed` from its sorted
    file names (OPERA draws from the order the disk lists them, which no other machine repeats)."""
    names = sorted(n for n in os.listdir(image_dir) if image_id_of(n) is not None)
    chosen = random.Random(seed).sample(names, min(count, len(names)))
    return [{"image_id": image_id_of(n), "image": n} for n in chosen]


def read_sample(path):
    """The records of a sample file written by `build`, each checked."""
    sample = []
    for line_number, record in runs.json_lines(path):
        if not (isinstance(record.get("image_id"), int) and isinstance(record.get("image"), str)):
            raise ValueError(f"{path}:{line_number}: a sample record needs an integer \"image_id\" "
                             f"and an \"image\" file name, got {sorted(record)}")
        sample.append(record)
    if not sample:
        raise ValueError(f"{path}: no images in the sample")
    return sample


def description_settings(sample, decoding, seed, max_new_tokens, made_with=None,
                         **decode_options):
    """A description's "made_with": the sample's images (their ids' sha256), the decoding and its
    settings, and the caller's (the model, or train.py's run)."""
    import hashlib

    ids = json.dumps([s["image_id"] for s in sample]).encode()
    return {"sample": hashlib.sha256(ids).hexdigest()[:16], "decoding": decoding, "seed": seed,
            "max_new_tokens": max_new_tokens, **decode_options, **(made_with or {})}


def describe(model, processor, sample, image_dir, out_path, decoding="greedy", batch_size=8,
             seed=0, max_new_tokens=512, prompt=PROMPT, made_with=None, progress=True,
             meter=None, **decode_options):
    """A description of every image of `sample`, appended to out_path as JSON lines {"image_id",
    "prompt", "caption", "image"} (OPERA's keys), resumably (eval_pope.answer_prompts)."""
    settings = description_settings(sample, decoding, seed, max_new_tokens, made_with,
                                    **decode_options)
    items = [{"image_id": s["image_id"], "prompt": prompt, "image": s["image"],
              "_image": os.path.join(image_dir, s["image"])} for s in sample]
    return eval_pope.answer_prompts(model, processor, items, "image_id", out_path, settings,
                                    decoding, batch_size, seed, max_new_tokens,
                                    text_key="caption", progress=progress, meter=meter,
                                    desc=f"CHAIR {decoding}", **decode_options)


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="draw the images to describe, into a sample file")
    build.add_argument("--images", required=True, help="a COCO image folder (val2014)")
    build.add_argument("--out", required=True, help="the sample file to write (JSON lines)")
    build.add_argument("--count", type=int, default=500, help="images to draw (OPERA's 500)")
    build.add_argument("--seed", type=int, default=0, help="seed of the draw")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    answer = commands.add_parser("answer", help="describe the sampled images, resumably")
    answer.add_argument("--model", required=True, help="local checkpoint folder")
    answer.add_argument("--sample", required=True, help="the sample file `build` wrote")
    answer.add_argument("--images", required=True, help="the folder holding the sampled images")
    answer.add_argument("--out", required=True,
                        help="descriptions file (JSON lines); an existing one is resumed")
    answer.add_argument("--decoding", default="greedy", choices=sorted(eval_pope.DECODINGS),
                        help="how to pick tokens (as eval_pope.py answer)")
    answer.add_argument("--batch-size", type=int, default=8, help="images per decoding pass")
    answer.add_argument("--seed", type=int, default=0, help="seed of the sampling and distortion")
    answer.add_argument("--max-new-tokens", type=int, default=512,
                        help="description length limit (OPERA's 512)")
    answer.add_argument("--prompt", default=PROMPT, help="the instruction (OPERA's)")
    eval_pope.add_decoding_flags(answer)

    scorer = commands.add_parser("score", help="print CHAIR_s, CHAIR_i, Recall and Len")
    scorer.add_argument("--annotations", required=True,
                        help="folder of COCO's instances_*2014.json and captions_*2014.json")
    scorer.add_argument("--captions", required=True,
                        help="descriptions, JSON lines of {\"image_id\", \"caption\"}")
    scorer.add_argument("--out", help="one JSON line per description: its mentions, hallucinated")
    scorer.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    command = {"build": build_command, "answer": answer_command,
               "score": score_command}[args.command]
    try:
        command(args)
    except eval_pope.Refused as refusal:  # before any work: one line naming the flag or the file
        parser.exit(2, f"{parser.prog} {args.command}: error: {refusal}\n")


def build_command(args):
    refuse = eval_pope.refuse_if
    refuse(None if args.count >= 1 else f"--count must be at least 1, got {args.count}")
    refuse(eval_pope.folder_problem("--images", args.images))
    refuse(eval_pope.output_problem("--out", args.out, folder=False))
    refuse(f"--out {args.out}: exists (--overwrite replaces it)"
           if os.path.exists(args.out) and not args.overwrite else None)
    sample = sample_images(args.images, args.count, args.seed)
    refuse(None if sample else f"--images {args.images}: no COCO image files (*_<id>.jpg)")
    runs.write_json_lines(args.out, sample)
    print(f"wrote {len(sample)} images ({args.images}, seed {args.seed}) to {args.out}")


def answer_command(args):
    refuse = eval_pope.refuse_if
    refuse(eval_pope.model_problem(args.model))
    for flag, value in (("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        refuse(None if value >= 1 else f"{flag} must be at least 1, got {value}")
    refuse(eval_pope.contrast_problem(args) or eval_pope.device_problem(args.device))
    try:
        sample = read_sample(args.sample)
    except ValueError as error:
        raise eval_pope.Refused(f"--sample {error}") from None
    refuse(eval_pope.output_problem("--out", args.out, folder=False))
    questions = [{"image": s["image"], "_line": i + 1} for i, s in enumerate(sample)]
    refuse(eval_pope.image_problem(questions, args.sample, args.images))
    dtype = eval_pope.weights_dtype(args.dtype, args.device)
    options = (eval_pope.contrast_options(args)
               if eval_pope.DECODINGS[args.decoding].get("contrast") else {})
    made_with = {"model": os.path.abspath(args.model), "dtype": str(dtype).removeprefix("torch."),
                 "prompt": args.prompt}
    lock = eval_pope.claim_output(args.out)  # one writer a file: refused while another runs
    try:
        runs.resume_records(args.out, description_settings(sample, args.decoding, args.seed,
                                                           args.max_new_tokens, made_with,
                                                           **options))
    except ValueError as error:  # made otherwise: refused before the model loads
        raise eval_pope.Refused(str(error)) from None
    model, processor = eval_pope.load_or_refuse(args.model, args.device, dtype)
    descriptions = describe(model, processor, sample, args.images, args.out, args.decoding,
                            args.batch_size, args.seed, args.max_new_tokens, args.prompt,
                            made_with, **options)
    lock.close()
    print(f"{len(descriptions)} descriptions in {args.out}")


def score_command(args):
    refuse = eval_pope.refuse_if
    refuse(eval_pope.folder_problem("--annotations", args.annotations))
    for flag, path in (("--out", args.out), ("--json", args.json)):
        refuse(eval_pope.output_problem(flag, path, folder=False) if path else None)
    try:
        descriptions = read_descriptions(args.captions)
        truth = ground_truth(args.annotations, {image_id for image_id, _ in descriptions})
    except ValueError as error:  # names the file and the line, or the image
        raise eval_pope.Refused(str(error)) from None
    figures, per_description = score(descriptions, truth)
    print(f"{'':<28}{'CHAIR_s':>9}{'CHAIR_i':>9}{'Recall':>9}{'Len':>8}")
    print(f"{os.path.basename(args.captions):<28}{100 * figures['chair_s']:>9.1f}"
          f"{100 * figures['chair_i']:>9.1f}{100 * figures['recall']:>9.1f}"
          f"{figures['len']:>8.1f}")
    print(f"{figures['descriptions']} descriptions, {figures['mentions']} object mentions")
    if args.out:
        runs.write_json_lines(args.out, per_description)
    if args.json:
        runs.write_json(args.json, figures, indent=2)


if __name__ == "__main__":
    eval_pope.run_command(main, "descriptions")
