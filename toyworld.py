"""A built-in synthetic world in which a tiny *real* LLaVA hallucinates objects the way big LVLMs
do.

Not from the paper: this is our stand-in for LLaVA-1.5 + COCO, so that `python train.py` shows
SEED's effect on a CPU in minutes (it is to SEED what Shakespeare-char is to nanoGPT).

The world, from one `world_seed`:
- 16 object classes, each a word and a glyph (shape x colour, so naming one needs both), with a
  skewed frequency and partner pairs: an object usually brings its partner, drawn small.
- Scenes of 1-4 objects rendered with pillow at the vision tower's resolution.
- Training text with the habits that make real LVLMs hallucinate: frequent objects; partners
  *mentioned* in captions and yes/no answers though not drawn (`mention_rate`), as in crowd- or
  LLM-written instruction data; and yes/no questions asked mostly about objects that are there
  (`asked_present_rate`), so the model leans to "yes" as the LVLMs that POPE measured do.
- A real transformers LlavaForConditionalGeneration from a tiny config, a word-level tokenizer made
  with `tokenizers`, and a LlavaProcessor with a PIL image processor and a chat template, so every
  other file takes the code path it takes with llava-hf/llava-1.5-7b-hf.
- Pretraining on the CPU; about a fifth of the images are shown with diffusion noise
  (purge.distort) and unchanged text, as real data varies in quality. Without that, a distorted
  image makes a model plainly unsure (P(yes) near 0.5) instead of falling back on its prior, and the
  contrast of METHOD.md 2 has nothing to isolate. The prior it falls back on is the text's: the
  questions' lean to "yes", strongest for the partners the text names anyway. `diagnose` shows
  whether that happened (P(yes) on absent partners rises under distortion).
Evaluation labels always come from the true scene contents, never from the (noisy) text.
"""
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

import torch

import eval_pope
import models
import purge
import runs

# ---------------------------------------------------------------------------------------------
# The world: classes, glyphs, frequencies, partners

NAMES = ["cat", "dog", "bird", "fish", "tree", "car", "boat", "cup", "ball", "book", "lamp",
         "chair", "clock", "shoe", "hat", "kite", "bell", "key", "apple", "drum"]
SHAPES = ["square", "circle", "triangle", "cross", "diamond"]
COLOURS = {"red": (225, 45, 45), "green": (40, 185, 60), "blue": (50, 90, 235),
           "yellow": (235, 215, 40), "white": (240, 240, 240)}
BACKGROUND = (70, 70, 70)
DESCRIBE = "Describe the image."
# The distortion step for this world's images (train.py's default here; VCD's 500 on real photos).
# At k = 500 a pixel keeps 74 % of its signal's variance (abar_500 = 0.74) and flat 32-pixel glyphs
# stay legible: with a logit written as prior plus evidence, z = P + e, the distorted one keeps most
# of the evidence (z' = P + lambda e, lambda near 1), so the contrast c = 2z - z' = P + (2 - lambda)
# e hardly moves an answer. At k = 700 (abar = 0.35) less evidence survives, and VCD's own greedy
# gain on popular / adversarial rises from +0.7..+3.6 to +2.2..+4.1 F1 (worlds 0-6).
NOISE_STEP = 700


@dataclass
class WorldConfig:
    """Every setting that changes the world or the trained model (the cache key)."""
    world_seed: int = 0         # the classes' names, glyphs, frequencies and partner pairs
    n_classes: int = 16         # object classes (12-20)
    image_size: int = 32        # pixels; the vision tower's resolution
    partner_rate: float = 0.6   # P(an object's partner is drawn beside it)
    mention_rate: float = 0.7   # P(an undrawn partner is mentioned anyway): the hallucination habit
    # P(a yes/no training question asks about an object that is there)
    asked_present_rate: float = 0.8
    contrast: float = 0.5       # large glyphs: colour blended this far from the background
    small_contrast: float = 0.6  # small glyphs: colour strength of the partners drawn small
    small_radius: float = 0.18  # radius of a small (partner) glyph, as a share of its grid cell
    noisy_share: float = 0.2    # share of pretraining images shown with diffusion noise
    # their noise steps, noise_low..noise_high - 1: heavy noise that hides the small partners, so
    # the model learns to fall back on its prior there distinct pretraining images pretraining steps
    noise_low: int = 800
    noise_high: int = 1000
    train_scenes: int = 4000
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1.5e-3          # higher rates can stall on a text-only plateau in some worlds
    seed: int = 0               # pretraining seed (init, batches, noise)


def make_world(world_seed=0, n_classes=16):
    """The classes of one world: names, glyphs, frequency weights and partner pairs."""
    if not 2 <= n_classes <= min(len(NAMES), len(SHAPES) * len(COLOURS)) or n_classes % 2:
        raise ValueError(f"n_classes must be even and in 2..{len(NAMES)}, got {n_classes}")
    rng = random.Random(world_seed)
    names = rng.sample(NAMES, n_classes)
    glyphs = rng.sample([(shape, colour) for shape in SHAPES for colour in COLOURS], n_classes)
    # Skewed frequency: a Zipf-like weight per rank, ranks shuffled by the world seed.
    ranks = list(range(n_classes))
    rng.shuffle(ranks)
    frequency = {name: 1.0 / (rank + 1) ** 0.9 for name, rank in zip(names, ranks)}
    order = names[:]
    rng.shuffle(order)
    partner = {}
    for a, b in zip(order[0::2], order[1::2]):
        partner[a], partner[b] = b, a
    return {"names": names, "glyphs": dict(zip(names, glyphs)), "frequency": frequency,
            "partner": partner}


def sample_scene(world, rng, partner_rate=0.6, min_objects=1):
    """A scene: a list of (object, cell, size, jitter) with 1-4 distinct objects in a 2x2 grid."""
    while True:
        names, weights = world["names"], [world["frequency"][n] for n in world["names"]]
        objects, sizes = [], []
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            # Primary objects follow the skewed frequency; each may bring its partner, drawn small.
            name = rng.choices(names, weights)[0]
            if name in objects or len(objects) >= 4:
                continue
            objects.append(name), sizes.append("large")
            mate = world["partner"][name]
            if mate not in objects and len(objects) < 4 and rng.random() < partner_rate:
                objects.append(mate), sizes.append("small")
        if len(objects) >= min_objects:
            break
    cells = rng.sample(range(4), len(objects))
    return [{"object": o, "cell": c, "size": s, "jitter": (rng.randint(-2, 2), rng.randint(-2, 2))}
            for o, c, s in zip(objects, cells, sizes)]


def render(scene, world, config=None):
    """Draw the scene with pillow: each glyph in its grid cell, large or small, in its colour."""
    from PIL import Image, ImageDraw

    config = config or WorldConfig()
    image_size = config.image_size
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 2
    for item in scene:
        shape, colour = world["glyphs"][item["object"]]
        radius = cell * (0.42 if item["size"] == "large" else config.small_radius)
        cx = (item["cell"] % 2 + 0.5) * cell + item["jitter"][0]
        cy = (item["cell"] // 2 + 0.5) * cell + item["jitter"][1]
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        strength = config.contrast if item["size"] == "large" else config.small_contrast
        fill = tuple(round(b + strength * (c - b)) for c, b in zip(COLOURS[colour], BACKGROUND))
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx + radius, cy + radius),
                          (cx - radius, cy + radius)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius),
                          (cx - radius, cy)], fill=fill)
        else:  # cross
            bar = radius / 2.5
            draw.rectangle([cx - radius, cy - bar, cx + radius, cy + bar], fill=fill)
            draw.rectangle([cx - bar, cy - radius, cx + bar, cy + radius], fill=fill)
    return image


def scene_objects(scene):
    return [item["object"] for item in scene]


# ---------------------------------------------------------------------------------------------
# Training text, with the hallucination habits of real instruction data

def caption(scene, world, rng, mention_rate):
    """'there is a cat , a dog and a bird .' -- with undrawn partners mentioned at mention_rate."""
    mentioned = scene_objects(scene)
    for item in scene:
        mate = world["partner"][item["object"]]
        if item["size"] == "large" and mate not in mentioned and rng.random() < mention_rate:
            mentioned.append(mate)
    phrases = [f"{eval_pope.article(n)} {n}" for n in mentioned]
    listed = phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"there is {listed} ."


def probe(scene, world, rng, mention_rate, asked_present_rate):
    """A yes/no question and its (noisy) answer: absent partners are answered 'yes' at mention_rate.

    Most questions (asked_present_rate) are about objects that are there, as in instruction data, so
    a model that cannot see leans to "yes": the language prior that the contrast later isolates.
    """
    present = scene_objects(scene)
    absent = [n for n in world["names"] if n not in present]
    partners = [world["partner"][n] for n in present if world["partner"][n] in absent]
    if rng.random() < asked_present_rate:
        return rng.choice(present), "yes"
    if partners and rng.random() < 0.5:
        return rng.choice(partners), ("yes" if rng.random() < mention_rate else "no")
    return rng.choice(absent), "no"


# ---------------------------------------------------------------------------------------------
# Tokenizer, processor and model: the same transformers classes as llava-hf/llava-1.5-7b-hf

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s> {% "
    "endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (["user", "assistant", ":", "?", ".", ",", "is", "there", "a", "an", "in", "the", "image",
          "yes", "no", "please", "answer", "this", "question", "with", "one", "word", "describe",
          "and"] + NAMES)


def make_tokenizer():
    """A word-level tokenizer over the world's words, built locally with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})


def make_processor(image_size=32, patch_size=8):
    """A LlavaProcessor with a PIL CLIP image processor and a LLaVA-1.5-style chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=make_tokenizer(),
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return processor


def make_model(tokenizer, image_size=32, patch_size=8, seed=0):
    """A tiny LlavaForConditionalGeneration (CLIP vision tower + Llama decoder) from a config."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=64,
                                       intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, projection_dim=64),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


# ---------------------------------------------------------------------------------------------
# Pretraining: the base model that SEED will correct

# (processor, text) -> ids: pretraining reuses a handful of prompts thousands of times
_PROMPT_IDS = {}


def prompt_ids(processor, text):
    """Token ids of the templated prompt for `text`, its image placeholder expanded."""
    key = (id(processor), text)
    if key not in _PROMPT_IDS:
        from PIL import Image

        size = processor.image_processor.crop_size["height"]
        blank = Image.new("RGB", (size, size))
        _PROMPT_IDS[key] = processor(images=[blank],
                                     text=[models.chat_prompt(processor, text)]).input_ids[0]
    return _PROMPT_IDS[key]


def response_ids(tokenizer, text):
    return tokenizer(" " + text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def collate(sequences, pad_id):
    """Right-padded (prompt ids, response ids) pairs: input_ids, attention_mask, labels (-100
    outside the response)."""
    length = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), length), pad_id)
    labels = torch.full((len(sequences), length), -100)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, len(prompt):len(ids)] = torch.tensor(response)
        attention_mask[i, :len(ids)] = 1
    return input_ids, attention_mask, labels


def training_batches(world, config, processor):
    """The pretraining stream, one batch a step: captions and yes/no probes with the text's habits.

    Yields {"input_ids", "attention_mask", "labels", "pixel_values", "noise_steps"} (noise_steps[i]:
    the diffusion step row i was shown at, None for a clean image). Everything is drawn from
    config.seed alone, so the stream is the same on every machine up to the float noise.
    """
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    scenes = [sample_scene(world, rng, config.partner_rate) for _ in range(config.train_scenes)]
    # scene index -> (3, H, W), rendered when a batch first needs it: training_fingerprint reads a
    # few batches, not all 4,000 scenes
    pixel_values = {}
    tokenizer = processor.tokenizer
    for _ in range(config.steps):
        batch = [rng.randrange(len(scenes)) for _ in range(config.batch_size)]
        new = sorted({i for i in batch if i not in pixel_values})
        if new:
            rendered = processor.image_processor([render(scenes[i], world, config) for i in new],
                                                 return_tensors="pt")["pixel_values"]
            pixel_values.update(zip(new, rendered))
        sequences = []
        for index in batch:
            if rng.random() < 0.4:
                text = caption(scenes[index], world, rng, config.mention_rate)
                sequences.append((prompt_ids(processor, DESCRIBE), response_ids(tokenizer, text)))
            else:
                name, answer = probe(scenes[index], world, rng, mention_rate=config.mention_rate,
                                     asked_present_rate=config.asked_present_rate)
                sequences.append((prompt_ids(processor, eval_pope.question_for(name)
                                             + eval_pope.PROMPT_SUFFIX),
                                  response_ids(tokenizer, answer)))
        input_ids, attention_mask, labels = collate(sequences, tokenizer.pad_token_id)
        pixels = torch.stack([pixel_values[i] for i in batch])
        # About a fifth of the images arrive degraded, with unchanged text: the model learns to fall
        # back on its prior when evidence fades, which is what the contrast later isolates.
        noisy = torch.rand(len(batch), generator=generator) < config.noisy_share
        noise_steps = [None] * len(batch)
        for i in noisy.nonzero().flatten().tolist():
            noise_steps[i] = int(
                torch.randint(config.noise_low, config.noise_high, (1,), generator=generator))
            pixels[i] = purge.distort(pixels[i], noise_steps[i], generator)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "pixel_values": pixels, "noise_steps": noise_steps}


def training_fingerprint(world, config, processor, n_batches=4):
    """sha256 of what pretraining is shown: the world, and the first batches' tokens, labels, noise
    steps and clean pixels (as the 0..255 values they were drawn with).

    Integer data only, so it is the same on every machine, while any change to the world's code
    (scenes, renderer, text habits, tokenizer, prompts) changes it: a checkpoint records the
    fingerprint it was trained on, and one whose fingerprint the current code does not give is
    stale.
    """
    digest = hashlib.sha256(json.dumps(world, sort_keys=True).encode())
    for _, batch in zip(range(n_batches), training_batches(world, config, processor)):
        clean = torch.tensor([step is None for step in batch["noise_steps"]])
        # pixels were normalised as v / 127.5 - 1 from integers v: floor((x + 1) * 127.5 + 0.5)
        # gives v back
        levels = ((batch["pixel_values"][clean] + 1) * 127.5 + 0.5).floor().to(torch.int16)
        for tensor in (batch["input_ids"], batch["attention_mask"], batch["labels"], levels):
            digest.update(tensor.numpy().tobytes())
        digest.update(json.dumps(batch["noise_steps"]).encode())
    return digest.hexdigest()


def pretrain(model, processor, world, config, progress=True):
    """Teach the tiny LLaVA to describe scenes and answer probes, habits of the text included."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    device = next(model.parameters()).device  # batches are built on the CPU and moved there
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    warmup = max(1, config.steps // 20)
    def warmup_cosine(s):
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps)))
        return min(1.0, (s + 1) / warmup) * cosine
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    bar = tqdm(training_batches(world, config, processor), total=config.steps,
               desc="pretraining the toy LLaVA", disable=not progress)
    for batch in bar:
        loss = model(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device),
                     pixel_values=batch["pixel_values"].to(device),
                     labels=batch["labels"].to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Held-out evaluation data and unlabeled images for SEED

def write_eval_set(world, out_dir, n_images=150, seed=10_000, config=None):
    """Held-out scenes (>= 3 objects, as POPE needs) as PNGs, their true contents, and the three
    POPE files.

    Labels come from the scenes themselves, never from the noisy training text.
    """
    config = config or WorldConfig()
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    objects = {}
    for i in range(n_images):
        scene = sample_scene(world, rng, config.partner_rate, min_objects=3)
        name = f"scene_{i:05d}.png"
        render(scene, world, config).save(os.path.join(out_dir, "images", name))
        objects[name] = scene_objects(scene)
    with open(os.path.join(out_dir, "objects.json"), "w") as f:
        json.dump(objects, f, indent=1)
    # popular / adversarial negatives follow the frequencies and co-occurrences of this annotated
    # set, as POPE's do on COCO.
    files = {}
    for split in eval_pope.SPLITS:
        files[split] = os.path.join(out_dir, f"toy_pope_{split}.json")
        eval_pope.write_jsonl(eval_pope.build_questions(objects, split, seed=seed), files[split])
    return files


def unlabeled_images(world, n_images, seed=20_000, config=None, min_objects=3):
    """Fresh scenes for SEED with at least three objects (as POPE's COCO images), as PIL images
    only: nothing about a scene reaches SEED but pixels."""
    config = config or WorldConfig()
    rng = random.Random(seed)
    return [render(sample_scene(world, rng, config.partner_rate, min_objects), world, config)
            for _ in range(n_images)]


@torch.no_grad()
def yes_probability(model, processor, images, names, noise_step=None, seed=0):
    """P('yes') / (P('yes') + P('no')) for 'Is there a {name}?' on each image (or distorted)."""
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    inputs = models.prompt_batch(processor, images,
                                 [eval_pope.question_for(n) + eval_pope.PROMPT_SUFFIX
                                  for n in names],
                                 next(model.parameters()).device)
    pixels = inputs["pixel_values"]
    if noise_step is not None:
        pixels = purge.distort(pixels, noise_step, torch.Generator().manual_seed(seed))
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=pixels, logits_to_keep=1).logits[:, -1]
    return torch.softmax(logits[:, [yes, no]], dim=-1)[:, 0]


def diagnose(model, processor, world, n_images=200, seed=30_000, noise_step=NOISE_STEP,
             config=None):
    """Mean P(yes) on clean vs distorted images for objects truly there and for absent partners.

    The contrast works if distortion lowers P(yes) on real objects far more than on hallucinated
    ones: what survives without visual evidence is the prior.
    """
    config = config or WorldConfig()
    rng = random.Random(seed)
    groups = {"present": ([], []), "absent partner": ([], [])}
    for _ in range(n_images):
        scene = sample_scene(world, rng, config.partner_rate)
        image, present = render(scene, world, config), scene_objects(scene)
        groups["present"][0].append(image), groups["present"][1].append(rng.choice(present))
        partners = [world["partner"][n] for n in present if world["partner"][n] not in present]
        if partners:
            groups["absent partner"][0].append(image), groups["absent partner"][1].append(
                rng.choice(partners))
    result = {}
    for group, (images, names) in groups.items():
        clean = yes_probability(model, processor, images, names).mean().item()
        distorted = yes_probability(model, processor, images, names, noise_step=noise_step,
                                    seed=seed).mean().item()
        result[group] = {"clean": clean, "distorted": distorted, "n": len(names)}
    return result


def false_positive_partners(question_file, answer_file, objects_by_image, world):
    """(share of false positives that are partners of present objects, same share among all
    negatives, count).

    The first far above the second means the hallucinations follow the partner habit of the text.
    """
    questions = {q["question_id"]: q for q in eval_pope.load_questions(question_file)}
    negatives = partner_negatives = false_positives = partner_false_positives = 0
    for answer in eval_pope.read_answers(answer_file):
        q = questions[answer["question_id"]]
        if q["label"] != "no":
            continue
        name = eval_pope.object_in(q["text"])
        is_partner = name in {world["partner"][o] for o in objects_by_image[q["image"]]}
        said_yes = eval_pope.parse_answer(answer["text"]) == "yes"
        negatives, partner_negatives = negatives + 1, partner_negatives + is_partner
        false_positives += said_yes
        partner_false_positives += said_yes and is_partner
    return (partner_false_positives / max(false_positives, 1),
            partner_negatives / max(negatives, 1), false_positives)


# ---------------------------------------------------------------------------------------------
# The shipped base model and the cache: built once, then reloaded with from_pretrained

CACHE_VERSION = 2  # bump when a change to the *training* (optimiser, schedule) changes the model
# The default world's pretrained base model ships with the repository, so `python train.py` starts
# from the same weights on every machine (pretraining rounds differently on other CPUs and thread
# counts). `python toyworld.py --ship` rebuilds it from WorldConfig().
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyworld_base")
_KEYS = {}


def world_key(config):
    """The name of what `config` trains with the current code: settings, architecture and data
    stream.

    The fingerprint covers the world's code (scenes, renderer, text, tokenizer, model config), so a
    change there gives a new key instead of reusing a stale checkpoint; CACHE_VERSION covers the
    rest.
    """
    settings = json.dumps(asdict(config), sort_keys=True)
    if settings not in _KEYS:
        processor = make_processor(config.image_size)
        architecture = make_model(processor.tokenizer, config.image_size).config.to_dict()
        architecture.pop("transformers_version", None)
        fingerprint = training_fingerprint(make_world(config.world_seed, config.n_classes), config,
                                           processor)
        _KEYS[settings] = hashlib.sha256(json.dumps({"version": CACHE_VERSION,
                                                     "config": asdict(config),
                                                     "architecture": architecture,
                                                     "data": fingerprint},
                                                    sort_keys=True).encode()).hexdigest()[:16]
    return _KEYS[settings]


def cache_dir(config):
    """$XDG_CACHE_HOME/seed-toyworld/<world_key>: one folder per world and training."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "seed-toyworld", world_key(config))


def recorded_key(folder):
    """The world_key a checkpoint folder was built under (its world.json), or None."""
    try:
        with open(os.path.join(folder, "world.json")) as f:
            return json.load(f).get("key")
    except (OSError, ValueError):
        return None


def _publish(tmp, final):
    """Move a fully written folder into place; readers only trust folders with a COMPLETE marker.

    If another run published the same folder meanwhile, keep theirs (it is built from the same
    settings) rather than delete files that run may be reading.
    """
    complete = os.path.join(final, "COMPLETE")
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write("ok\n")
    # a crashed run's leftover, never trusted
    if os.path.exists(final) and not os.path.exists(complete):
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)  # fails if another run's folder is already there
    except OSError:
        if not os.path.exists(complete):
            raise
        shutil.rmtree(tmp)


def build(config=None, progress=True, shipped=True):
    """Return (checkpoint folder, world): the shipped base model when `config` is the default world
    and the shipped folder was built under its current key (shipped=False skips it), else the
    cached one, else pretrain and cache it.

    A crash mid-save leaves only a *.tmp-<pid> folder without the COMPLETE marker, never loaded.
    """
    config = config or WorldConfig()
    world = make_world(config.world_seed, config.n_classes)
    if shipped and config == WorldConfig():
        if recorded_key(SHIPPED) == world_key(config):
            return SHIPPED, world
        print(f"{SHIPPED} was not built by this code's WorldConfig(): pretraining the default "
              f"world instead")
    final = cache_dir(config)
    if os.path.exists(os.path.join(final, "COMPLETE")):
        return final, world
    start = time.time()
    processor = make_processor(config.image_size)
    model = make_model(processor.tokenizer, config.image_size, seed=config.seed)
    pretrain(model, processor, world, config, progress=progress)
    seconds = time.time() - start
    tmp = f"{final}.tmp-{os.getpid()}"
    with runs.written_aside(tmp):  # a full disk, say: no half-written cache folder left behind
        os.makedirs(tmp, exist_ok=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "world.json"), "w") as f:
            json.dump({"key": world_key(config), "cache_version": CACHE_VERSION,
                       "config": asdict(config), "world": world,
                       "pretrain_seconds": round(seconds, 1),
                       "pretrain_steps_per_second": round(config.steps / seconds, 2),
                       "torch_threads": torch.get_num_threads()}, f, indent=1)
        _publish(tmp, final)
    return final, world


def ship(progress=True):
    """Pretrain the default world here (or take it from the cache) and write it to SHIPPED."""
    folder, _ = build(WorldConfig(), progress, shipped=False)
    tmp = f"{SHIPPED}.tmp-{os.getpid()}"
    shutil.copytree(folder, tmp)
    # the repository's copy needs no marker: its key says what it is
    os.remove(os.path.join(tmp, "COMPLETE"))
    if os.path.exists(SHIPPED):
        shutil.rmtree(SHIPPED)
    os.replace(tmp, SHIPPED)
    return SHIPPED


def eval_set(n_images, world, config=None):
    """(POPE files by split, image folder, true objects by image) for n held-out images, cached
    under the world's cache folder (the images depend on the world, not on the model)."""
    config = config or WorldConfig()
    folder = os.path.join(cache_dir(config), f"pope{n_images}")
    if not os.path.exists(os.path.join(folder, "COMPLETE")):
        tmp = f"{folder}.tmp-{os.getpid()}"
        with runs.written_aside(tmp):  # no half-written evaluation set left behind
            write_eval_set(world, tmp, n_images, config=config)
            _publish(tmp, folder)
    files = {split: os.path.join(folder, f"toy_pope_{split}.json") for split in eval_pope.SPLITS}
    with open(os.path.join(folder, "objects.json")) as f:
        objects = json.load(f)
    return files, os.path.join(folder, "images"), objects


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Build (or reload) the toy world's LLaVA and show why the contrast works.")
    parser.add_argument("--world-seed", type=int, default=0,
                        help="which world (classes, glyphs, partners)")
    parser.add_argument("--noise-step", type=int, default=NOISE_STEP,
                        help="diffusion step of the distortion (0..999)")
    parser.add_argument("--ship", action="store_true",
                        help=f"pretrain the default world here and write it to {SHIPPED}")
    args = parser.parse_args()
    if not 0 <= args.noise_step < purge.NUM_DIFFUSION_STEPS:  # before the model loads, in one line
        parser.exit(2, f"{parser.prog}: error: --noise-step must be in "
                       f"0..{purge.NUM_DIFFUSION_STEPS - 1}, got {args.noise_step}\n")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    world_config = WorldConfig(world_seed=args.world_seed)
    if args.ship:
        if world_config != WorldConfig():
            parser.exit(2, f"{parser.prog}: error: --ship writes the default world only (no "
                           f"--world-seed)\n")
        print(f"--ship: pretraining the default world ({world_config.steps} steps, minutes on a "
              f"CPU), then replacing {SHIPPED}/ (tracked by git: `git checkout "
              f"{os.path.basename(SHIPPED)}` brings it back)", flush=True)
        ship()
    path, world = build(world_config)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    print(f"checkpoint: {path}")
    for group, d in diagnose(model, AutoProcessor.from_pretrained(path), world,
                             noise_step=args.noise_step, config=world_config).items():
        print(f"mean P(yes) on {group:<15} clean {d['clean']:.2f}  distorted {d['distorted']:.2f}  "
              f"({d['n']} probes)")
