"""A local replica of llava-1.5-7b-hf where the code's behaviour depends on it, with COCO-like data (no download).

What matches the real checkpoint: the classes (LlavaForConditionalGeneration with a CLIP vision
tower and a Llama decoder, LlavaProcessor with CLIP preprocessing), 336-pixel images in 14-pixel
patches (576 image tokens, the CLS token dropped by the "default" feature strategy), the
second-to-last vision layer as features, LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" chat
template, a byte-level BPE tokenizer in which COCO names such as "traffic light" and "hair drier"
are several tokens, <unk> <s> </s> first and the <image> and <pad> special tokens appended after the
vocabulary (as 32000 and 32001 are in the real one); JPEGs of COCO sizes named like COCO files, POPE
question files in the official format. What does not: the widths and depths (tiny, random weights),
the vocabulary (trained here on a few hundred sentences).

Used by tests/test_real_run.py and docs/measure_host_memory.py.
"""
import json
import os
import random

import torch

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 512)]
LLAVA_15_TEMPLATE = (  # the shape of llava-1.5-7b-hf's chat template, for one user turn with one image
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def sentences(object_names, count=400, seed=0):
    """Training text for the tokenizer: descriptions and POPE questions about COCO objects."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.sample(object_names, 2)
        lines += [f"There is a {a} next to the {b} in this image.", f"Is there a {a} in the image?",
                  f"A photo of a {a} and two {b}s on a table. Please answer this question with one word."]
    return lines


def make_tokenizer(object_names, vocab_size=600):
    """A byte-level BPE tokenizer (Llama's specials first, <image> and <pad> appended after the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(sentences(object_names), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tokenizer


def make_processor(object_names):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(  # llava-1.5's: resize the short side to 336, centre-crop, CLIP's stats
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaProcessor(image_processor=image_processor, tokenizer=make_tokenizer(object_names), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_15_TEMPLATE, image_token="<image>")


def make_model(tokenizer, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def write_jpeg(path, size, rng):
    """A photo-sized JPEG of a few coloured boxes on a gradient: decodes like a COCO photo does."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x, y = rng.randrange(width - 40), rng.randrange(height - 40)
        draw.rectangle([x, y, x + rng.randint(20, 200), y + rng.randint(20, 200)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    image.save(path, quality=90)


def build(root, unlabeled=8, pope_images=4, questions_per_image=2, object_names=None, seed=0):
    """Write <root>/llava-1.5-7b-replica (model + processor), <root>/train2014 (unlabeled JPEGs),
    <root>/val2014 (POPE's images) and <root>/pope/coco_pope_{split}.json; returns the four paths."""
    import train

    object_names = object_names or train.COCO_OBJECTS
    rng = random.Random(seed)
    paths = {name: os.path.join(root, name) for name in ("llava-1.5-7b-replica", "train2014", "val2014", "pope")}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    processor = make_processor(object_names)
    make_model(processor.tokenizer, seed).save_pretrained(paths["llava-1.5-7b-replica"])
    processor.save_pretrained(paths["llava-1.5-7b-replica"])
    for i in range(unlabeled):
        name = f"COCO_train2014_{100_000 + i:012d}.jpg"
        write_jpeg(os.path.join(paths["train2014"], name), rng.choice(COCO_SIZES), rng)
    val_names = [f"COCO_val2014_{300_000 + i:012d}.jpg" for i in range(pope_images)]
    for name in val_names:
        write_jpeg(os.path.join(paths["val2014"], name), rng.choice(COCO_SIZES), rng)
    for split in ("random", "popular", "adversarial"):
        with open(os.path.join(paths["pope"], f"coco_pope_{split}.json"), "w") as f:
            question_id = 1
            for name in val_names:  # the official files' records: question_id, image, text, label
                for k, obj in enumerate(rng.sample(object_names, questions_per_image)):
                    f.write(json.dumps({"question_id": question_id, "image": name,
                                        "text": f"Is there a {obj} in the image?",
                                        "label": "yes" if k % 2 == 0 else "no"}) + "\n")
                    question_id += 1
    return paths
