"""A local replica of llava-1.5-7b-hf where the code's behaviour depends on it, with COCO-like data
(no download).

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
# the shape of llava-1.5-7b-hf's chat template, for one user turn with one image
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif "
    "%}{% endfor %}{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor "
    "%}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def sentences(object_names, count=400, seed=0):
    """Training text for the tokenizer: descriptions and POPE questions about COCO objects."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.sample(object_names, 2)
        lines += [f"There is a {a} next to the {b} in this image.", f"Is there a {a} in the image?",
                  f"A photo of a {a} and two {b}s on a table. Please answer this question with one "
                  f"word."]
    return lines


def bpe_core(object_names, vocab_size=600, specials=("<unk>", "<s>", "</s>")):
    """A byte-level BPE (tokenizers' Tokenizer) trained on COCO sentences, `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(sentences(object_names), trainer)
    return core


def make_tokenizer(object_names, vocab_size=600):
    """A byte-level BPE tokenizer (Llama's specials first, <image> and <pad> appended after the
    vocabulary)."""
    from transformers import PreTrainedTokenizerFast

    core = bpe_core(object_names, vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tokenizer


def make_processor(object_names):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # llava-1.5's: resize the short side to 336, centre-crop, CLIP's stats
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    return LlavaProcessor(image_processor=image_processor, tokenizer=make_tokenizer(object_names),
                          patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_15_TEMPLATE,
                          image_token="<image>")


def make_model(tokenizer, seed=0):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32,
                                       intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id,
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
    <root>/val2014 (POPE's images) and <root>/pope/coco_pope_{split}.json; returns the four
    paths."""
    import eval_pope

    object_names = object_names or eval_pope.COCO_OBJECTS
    rng = random.Random(seed)
    paths = {name: os.path.join(root, name)
             for name in ("llava-1.5-7b-replica", "train2014", "val2014", "pope")}
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


# ---------------------------------------------------------------------------------------------
# Checkpoint folders laid out as the hub repositories ship them (every file; tiny random weights)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                 "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>", "<|vision_start|>",
                 # 151643.. in the real ones
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                     "<box>", "</box>"]
# the shape of Qwen2.5-VL-Instruct's chat_template.json, for image and text content
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] "
    "is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content %}{% set "
    "image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>{% "
    "elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif "
    "%}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INTERNVL3_TEMPLATE = (  # the shape of InternVL3-1B-hf's chat_template.jinja
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if "
    "message['content'] is string %}{{ message['content'] }}{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif "
    "content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ "
    "content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if "
    "add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")


def write_coco_annotations(folder, image_dir, seed=0):
    """COCO's instances_val2014.json and captions_val2014.json for the images of `image_dir` (named
    as COCO names them): each image 1-3 annotated categories and five reference captions naming
    them, in COCO's file format (what eval_chair.py reads)."""
    import eval_chair
    import eval_pope

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(eval_pope.COCO_OBJECTS)]
    images, instances, captions = [], [], []
    for name in sorted(os.listdir(image_dir)):
        image_id = eval_chair.image_id_of(name)
        images.append({"id": image_id, "file_name": name})
        present = rng.sample(categories, rng.randint(1, 3))
        instances += [{"id": len(instances) + 1, "image_id": image_id,
                       "category_id": c["id"]} for c in present]
        captions += [{"id": len(captions) + 1, "image_id": image_id,
                      "caption": f"A photo of a {rng.choice(present)['name']} on a table."}
                     for _ in range(5)]
    write_json(os.path.join(folder, "instances_val2014.json"),
               {"images": images, "annotations": instances, "categories": categories})
    write_json(os.path.join(folder, "captions_val2014.json"),
               {"images": images, "annotations": captions})
    return folder


def write_json(path, record):
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def write_qwen2_tokenizer(folder, specials, extra_special_tokens=None):
    """Qwen2's tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json naming
    Qwen2Tokenizer): a byte-level BPE trained on COCO sentences, the special tokens after its
    vocabulary."""
    import eval_pope

    core = bpe_core(eval_pope.COCO_OBJECTS, specials=())  # Qwen2's vocabulary has no <unk> <s> </s>
    core.add_special_tokens(specials)
    core.save(os.path.join(folder, "tokenizer.json"))
    model = json.loads(core.to_str())["model"]
    write_json(os.path.join(folder, "vocab.json"), model["vocab"])
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    added = {str(core.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                        "rstrip": False,
                                        "single_word": False, "special": True} for t in specials}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 32768, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    if extra_special_tokens:
        config["extra_special_tokens"] = extra_special_tokens
    write_json(os.path.join(folder, "tokenizer_config.json"), config)
    return {t: core.token_to_id(t) for t in specials}


# the real checkpoints' output vocabularies (their config.json's vocab_size)
QWEN25_VL_VOCAB, INTERNVL3_VOCAB = 152064, 151674


def qwen2_5_vl_folder(folder, seed=0, full_size=False):
    """A folder laid out like Qwen/Qwen2.5-VL-7B-Instruct: config.json, generation_config.json,
    chat_template.json, preprocessor_config.json (no processor_config.json, no video processor
    file), the tokenizer files, model safetensors. 14-pixel patches merged 2 x 2, as in the real
    one. full_size: the real output vocabulary (152,064 logits a position) and the real pixel
    limits (a COCO photo becomes about 400 image tokens), tiny widths still."""
    import transformers

    os.makedirs(folder, exist_ok=True)
    ids = write_qwen2_tokenizer(folder, QWEN_SPECIALS)
    vocab = QWEN25_VL_VOCAB if full_size else max(ids.values()) + 1
    text = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"],
                bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [2, 2, 2]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=48,
                  fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                                           image_token_id=ids["<|image_pad|>"],
                                           video_token_id=ids["<|video_pad|>"],
                                           vision_start_token_id=ids["<|vision_start|>"],
                                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    write_json(os.path.join(folder, "chat_template.json"), {"chat_template": QWEN25_VL_TEMPLATE})
    # the real file's fields; fewer pixels
    write_json(os.path.join(folder, "preprocessor_config.json"), {
        "min_pixels": 3136, "max_pixels": 12845056 if full_size else 4 * 3136, "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"})
    return folder


def internvl3_hf_folder(folder, seed=0, full_size=False):
    """A folder laid out like OpenGVLab/InternVL3-1B-hf: config.json, generation_config.json,
    chat_template.jinja, preprocessor_config.json (GotOcr2ImageProcessorFast, tiles),
    processor_config.json (image_seq_length), video_preprocessor_config.json, the Qwen2 tokenizer
    files with InternVL's image tokens, model.safetensors. 56-pixel tiles of 14-pixel patches,
    pixel-shuffled to 4 tokens a tile; full_size: the real 448-pixel tiles (256 tokens each, up to
    12 and a thumbnail: 3,328 tokens for a COCO photo) and the real output vocabulary (151,674),
    tiny widths still."""
    import transformers

    tile, per_tile = (448, 256) if full_size else (56, 4)
    os.makedirs(folder, exist_ok=True)
    ids = write_qwen2_tokenizer(folder, QWEN_SPECIALS + INTERNVL_SPECIALS + ["<video>"],
                                extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    config = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[tile, tile], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=INTERNVL3_VOCAB if full_size
                         else max(ids.values()) + 1, hidden_size=48,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"],
                         bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<IMG_CONTEXT>"], downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    transformers.InternVLForConditionalGeneration(config).save_pretrained(folder)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(INTERNVL3_TEMPLATE)
    normalise = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                 "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
                 "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
                 "size": {"height": tile, "width": tile}, "processor_class": "InternVLProcessor"}
    write_json(os.path.join(folder, "preprocessor_config.json"), {
        **normalise, "image_processor_type": "GotOcr2ImageProcessorFast",
        "crop_to_patches": full_size, "min_patches": 1, "max_patches": 12 if full_size else 4,
        "default_to_square": True, "data_format": "channels_first"})
    write_json(os.path.join(folder, "processor_config.json"), {
        "image_seq_length": per_tile, "processor_class": "InternVLProcessor"})
    write_json(os.path.join(folder, "video_preprocessor_config.json"), {
        **normalise, "video_processor_type": "InternVLVideoProcessor", "initial_shift": True,
        "do_sample_frames": False, "default_to_square": True, "data_format": "channels_first"})
    return folder
