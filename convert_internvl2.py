"""The paper's second family: an InternVL2 checkpoint converted to transformers' native InternVL.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680, reports LLaVA-1.5 and InternVL2. InternVL2's hub folders
(OpenGVLab/InternVL2-1B, -2B, -8B, -26B) ship as remote code (`InternVLChatModel`), which this
project never runs. This script reads such a folder's files only (config.json, the safetensors
weights, the tokenizer files), executes none of its Python, downloads nothing, and writes a folder
of `InternVLForConditionalGeneration` with its processor, which `train.py --model` and
`eval_pope.py` take as they take any transformers checkpoint:

    python convert_internvl2.py InternVL2-2B/ InternVL2-2B-hf/

What changes (docs/INTERNVL2.md lists every fact read from the published files):
- the vision tower (InternViT): the fused `attn.qkv` split into q / k / v, names to the native ones;
- the projector `mlp1` (LayerNorm, Linear, GELU, Linear after InternVL2's pixel shuffle "v2", which
  is the native one) to `multi_modal_projector`;
- InternLM2 (2B, 8B, 26B) to a Llama language model: the fused `wqkv`, laid out as one group per
  key-value head of [its query heads, the key head, the value head], split into q / k / v;
  w1 / w3 / w2 to gate / up / down; norms, embeddings and the output head renamed. Qwen2 (1B) is
  already native: renamed only;
- the sentencepiece tokenizer (tokenizer.model) to a `tokenizers` one that splits text the same way,
  with InternVL2's image tokens (`<img>`, `<IMG_CONTEXT>`, `</img>`);
- InternVL2's conversation format as the chat template, its tiling limits and normalisation as the
  image processor's settings.
Refused in one line: Phi-3 (InternVL2-4B) and anything else this script was not tested on.
"""
import argparse
import json
import os
import shutil
import struct
import sys

import runs

# InternVL2's image tokens (its modeling_internvl_chat.py constants, also in its
# tokenizer_config.json)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# Its preprocessing (build_transform): ImageNet's mean and std, bicubic resizing
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Its conversation templates: name -> (system template, system message, user role, assistant role,
# separator). internlm2-chat (2B, 8B, 26B) and Hermes-2 (1B) render the same prompt
# (SeparatorStyle.MPT).
SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
TEMPLATES = {name: ("<|im_start|>system\n{system_message}", SYSTEM_MESSAGE, "<|im_start|>user\n",
                    "<|im_start|>assistant\n", "<|im_end|>")
             for name in ("internlm2-chat", "Hermes-2")}
LANGUAGE_MODELS = {"InternLM2ForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class Refused(ValueError):
    """A checkpoint this script does not convert, said in one line."""


# ---------------------------------------------------------------------------------------------
# Weights

def split_wqkv(wqkv, num_heads, num_kv_heads, head_dim):
    """InternLM2's fused attention input, (num_kv_heads * (q_per_kv + 2) * head_dim, hidden) with
    rows grouped per key-value head as [q_per_kv query heads, 1 key head, 1 value head], into
    Llama's q, k, v. Query head g * q_per_kv + j (j-th of group g) attends with key-value head g, as
    Llama's GQA reads it."""
    q_per_kv = num_heads // num_kv_heads
    grouped = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, wqkv.shape[-1])
    q = grouped[:, :q_per_kv].reshape(num_heads * head_dim, -1)
    return q, grouped[:, -2].reshape(num_kv_heads * head_dim,
                                     -1), grouped[:, -1].reshape(num_kv_heads * head_dim, -1)


VISION_NAMES = {"attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm",
                "attn.k_norm": "attention.k_norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                "norm1": "layernorm_before", "norm2": "layernorm_after"}
INTERNLM2_NAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
                   "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
                   "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
PROJECTOR_NAMES = {"mlp1.0": "layer_norm", "mlp1.1": "linear_1", "mlp1.3": "linear_2"}


def native_tensors(key, tensor, llm):
    """[(native key, tensor)] for one tensor of an InternVL2 checkpoint; llm: its llm_config."""
    vision, tower = "vision_model.", "model.vision_tower."
    if key.startswith(vision + "embeddings."):
        name = key[len(vision + "embeddings."):]
        renamed = {"class_embedding": "cls_token", "position_embedding": "position_embeddings",
                   "patch_embedding.weight": "patch_embeddings.projection.weight",
                   "patch_embedding.bias": "patch_embeddings.projection.bias"}
        if name in renamed:
            return [(tower + "embeddings." + renamed[name], tensor)]
    if key.startswith(vision + "encoder.layers."):
        index, name = key[len(vision + "encoder.layers."):].split(".", 1)
        layer = f"{tower}encoder.layer.{index}."
        # rows [q; k; v], each hidden wide (InternAttention)
        if name in ("attn.qkv.weight", "attn.qkv.bias"):
            suffix = name.rsplit(".", 1)[1]
            return [(f"{layer}attention.{p}_proj.{suffix}", part)
                    for p, part in zip("qkv", tensor.chunk(3, dim=0))]
        if name in ("ls1", "ls2"):
            return [(layer + {"ls1": "lambda_1", "ls2": "lambda_2"}[name], tensor)]
        module, suffix = name.rsplit(".", 1)
        if module in VISION_NAMES:
            return [(f"{layer}{VISION_NAMES[module]}.{suffix}", tensor)]
    if key.startswith("mlp1."):
        module, suffix = key.rsplit(".", 1)
        if module in PROJECTOR_NAMES:
            return [(f"model.multi_modal_projector.{PROJECTOR_NAMES[module]}.{suffix}", tensor)]
    # already transformers' Qwen2: the prefix only
    if llm["architectures"][0] == "Qwen2ForCausalLM":
        if key == "language_model.lm_head.weight":
            return [("lm_head.weight", tensor)]
        if key.startswith("language_model.model."):
            return [("model.language_model." + key[len("language_model.model."):], tensor)]
    else:  # InternLM2
        text = "model.language_model."
        if key == "language_model.output.weight":
            return [("lm_head.weight", tensor)]
        if key == "language_model.model.tok_embeddings.weight":
            return [(text + "embed_tokens.weight", tensor)]
        if key == "language_model.model.norm.weight":
            return [(text + "norm.weight", tensor)]
        if key.startswith("language_model.model.layers."):
            index, name = key[len("language_model.model.layers."):].split(".", 1)
            layer = f"{text}layers.{index}."
            if name == "attention.wqkv.weight":
                heads, kv_heads = llm["num_attention_heads"], llm["num_key_value_heads"]
                q, k, v = split_wqkv(tensor, heads, kv_heads, llm["hidden_size"] // heads)
                return [(layer + "self_attn.q_proj.weight", q),
                        (layer + "self_attn.k_proj.weight", k),
                        (layer + "self_attn.v_proj.weight", v)]
            module, suffix = name.rsplit(".", 1)
            if module in INTERNLM2_NAMES:
                return [(f"{layer}{INTERNLM2_NAMES[module]}.{suffix}", tensor)]
    raise Refused(f"unknown weight {key!r}: not in InternVL2's layout")


def checkpoint_shards(src):
    """The folder's safetensors files, from model.safetensors.index.json or a single
    model.safetensors."""
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(src, "model.safetensors")):
        return ["model.safetensors"]
    raise Refused(f"{src}: no model.safetensors(.index.json): InternVL2's hub folders ship "
                  f"safetensors weights")


def convert_weights(src, dst, llm, shard_bytes=4 << 30):
    """Every tensor renamed and split (native_tensors), written as safetensors shards of at most
    shard_bytes with an index; in memory, one source tensor beyond the shard being filled."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, os.path.join(dst, name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({key: name for key in current})

    for shard in checkpoint_shards(src):
        with safe_open(os.path.join(src, shard), framework="pt") as f:
            for key in f.keys():
                for native, tensor in native_tensors(key, f.get_tensor(key), llm):
                    current[native] = tensor.contiguous()
                    size += tensor.numel() * tensor.element_size()
                    if size >= shard_bytes:
                        flush()
                        current, size = {}, 0
    if current:
        flush()
    total = len(shards)
    renamed = {name: f"model-{i + 1:05d}-of-{total:05d}.safetensors"
               for i, name in enumerate(shards)}
    for old, new in renamed.items():
        os.replace(os.path.join(dst, old), os.path.join(dst, new))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(
            weight_map.items())}}, f, indent=2)
    return sorted(weight_map)


# ---------------------------------------------------------------------------------------------
# Configuration

def vision_settings(vision, image_size):
    """InternViT's vision_config as InternVLVisionConfig's fields."""
    return dict(hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                num_hidden_layers=vision["num_hidden_layers"],
                num_attention_heads=vision["num_attention_heads"],
                attention_bias=vision.get("qkv_bias", True),
                use_qk_norm=vision.get("qk_normalization", False),
                norm_type=vision.get("norm_type", "rms_norm"),
                layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
                hidden_act=vision.get("hidden_act", "gelu"),
                num_channels=vision.get("num_channels", 3), image_size=[image_size, image_size],
                patch_size=[vision["patch_size"]] * 2, attention_dropout=0.0,
                projection_dropout=0.0, hidden_dropout_prob=0.0)


def rope_settings(llm):
    """InternLM2's rope_theta and rope_scaling ({"type": "dynamic" | "linear", "factor"}) as
    rope_parameters (transformers' dynamic NTK and linear scaling compute InternLM2's frequencies).
    """
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    scaling = llm.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("dynamic", "linear"):
            raise Refused(f"rope_scaling type {kind!r}: InternLM2 knows dynamic and linear only")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return rope


def text_settings(llm):
    """The language model's config: InternLM2's fields as a Llama config's, Qwen2's as they are."""
    if llm["architectures"][0] == "Qwen2ForCausalLM":
        return {k: v for k, v in llm.items()
                if k not in ("architectures", "auto_map", "_name_or_path", "attn_implementation",
                             "torch_dtype")}
    if llm.get("bias", False):
        raise Refused("an InternLM2 with bias=true: InternVL2's InternLM2 models have none, and "
                      "this script maps none")
    return dict(model_type="llama", vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
                intermediate_size=llm["intermediate_size"],
                num_hidden_layers=llm["num_hidden_layers"],
                num_attention_heads=llm["num_attention_heads"],
                num_key_value_heads=llm["num_key_value_heads"],
                head_dim=llm["hidden_size"] // llm["num_attention_heads"],
                hidden_act=llm.get("hidden_act", "silu"),
                rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
                max_position_embeddings=llm["max_position_embeddings"],
                rope_parameters=rope_settings(llm),
                tie_word_embeddings=llm.get("tie_word_embeddings", False), attention_bias=False,
                mlp_bias=False, bos_token_id=llm.get("bos_token_id", 1),
                eos_token_id=llm.get("eos_token_id", 2), pad_token_id=llm.get("pad_token_id", 2))


def check_supported(config):
    """One line on the first thing in InternVL2's config.json this script does not convert."""
    llm, vision = config.get("llm_config", {}), config.get("vision_config", {})
    architecture = (llm.get("architectures") or ["?"])[0]
    if config.get("model_type") != "internvl_chat":
        return f"model_type {config.get('model_type')!r}, not InternVL2's 'internvl_chat'"
    if architecture == "Phi3ForCausalLM":
        return ("Phi3ForCausalLM (InternVL2-4B): its Llama-style sentencepiece tokenizer and "
                "phi3-chat template are not converted or tested here; convert the 1B, 2B, 8B or "
                "26B")
    if architecture not in LANGUAGE_MODELS:
        return f"language model {architecture}: this script converts {', '.join(LANGUAGE_MODELS)}"
    if config.get("template") not in TEMPLATES:
        return (f"conversation template {config.get('template')!r}: this script knows "
                f"{', '.join(TEMPLATES)}")
    if config.get("ps_version", "v1") != "v2":
        return (f"ps_version {config.get('ps_version', 'v1')!r}: the native pixel shuffle is "
                "InternVL2's 'v2' only")
    if config.get("select_layer", -1) != -1:
        return (f"select_layer {config['select_layer']}: converted for the last vision layer (-1) "
                "only")
    if config.get("use_thumbnail", True) is not True and config.get("dynamic_image_size", True):
        return ("use_thumbnail false: the native image processor always adds the thumbnail to "
                "tiled images")
    image_size = config.get("force_image_size") or vision.get("image_size")
    if image_size != vision.get("image_size"):
        return (f"force_image_size {image_size} differs from the vision tower's "
                f"{vision.get('image_size')}")
    if config.get("downsample_ratio") != 0.5:
        return (f"downsample_ratio {config.get('downsample_ratio')}: InternVL2 and the native "
                "class use 0.5")
    return None


# ---------------------------------------------------------------------------------------------
# The tokenizer: sentencepiece's model file, read without sentencepiece

def protobuf_fields(data):
    """(field number, wire type, value) of one protobuf message: varints as ints, 32-bit as 4 bytes,
    length-delimited as bytes (enough to read sentencepiece's ModelProto)."""
    position = 0

    def varint():
        nonlocal position
        value, shift = 0, 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, position = data[position:position + 8], position + 8
        elif wire == 2:
            length = varint()
            value, position = data[position:position + length], position + length
        elif wire == 5:
            value, position = data[position:position + 4], position + 4
        else:
            raise Refused(f"tokenizer.model: protobuf wire type {wire} is not sentencepiece's")
        yield number, wire, value


def read_sentencepiece(path):
    """sentencepiece's ModelProto: pieces [(piece, score, type)] (type 1 normal, 2 unknown, 3
    control, 4 user-defined, 5 unused, 6 byte), the trainer's model type (2: BPE) and byte fallback,
    and the normaliser's name, precompiled character map, add_dummy_prefix and
    remove_extra_whitespaces."""
    with open(path, "rb") as f:
        data = f.read()
    pieces, trainer = [], {"model_type": 1, "byte_fallback": False}
    normalizer = {"name": "", "charsmap": b"", "add_dummy_prefix": True,
                  "remove_extra_whitespaces": True}
    for number, _, value in protobuf_fields(data):
        if number == 1:  # SentencePiece {piece = 1, score = 2, type = 3}
            piece = {"piece": "", "score": 0.0, "type": 1}
            for field, _, v in protobuf_fields(value):
                if field == 1:
                    piece["piece"] = v.decode("utf-8")
                elif field == 2:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif field == 3:
                    piece["type"] = v
            pieces.append((piece["piece"], piece["score"], piece["type"]))
        elif number == 2:  # TrainerSpec {model_type = 3, byte_fallback = 35}
            for field, _, v in protobuf_fields(value):
                if field == 3:
                    trainer["model_type"] = v
                elif field == 35:
                    trainer["byte_fallback"] = bool(v)
        # NormalizerSpec {name = 1, precompiled_charsmap = 2, add_dummy_prefix = 3, ... = 4}
        elif number == 3:
            for field, _, v in protobuf_fields(value):
                if field == 1:
                    normalizer["name"] = v.decode("utf-8")
                elif field == 2:
                    normalizer["charsmap"] = v
                elif field == 3:
                    normalizer["add_dummy_prefix"] = bool(v)
                elif field == 4:
                    normalizer["remove_extra_whitespaces"] = bool(v)
    return pieces, trainer, normalizer


def sentencepiece_tokenizer(path, added_tokens, add_bos):
    """A `tokenizers` Tokenizer that splits text as sentencepiece's BPE model at `path` does, the
    way a transformers slow tokenizer calls it: the added tokens ({id: (content, special)}) cut out
    first, each piece of text between them normalised and encoded on its own (so each gets the dummy
    prefix when the model adds one), <s> in front when add_bos."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import generate_merges

    pieces, trainer, spec = read_sentencepiece(path)
    if trainer["model_type"] != 2:
        raise Refused(f"{path}: a sentencepiece model of type {trainer['model_type']}, not BPE "
                      f"(2), as InternLM2's is")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next(piece for piece, _, kind in pieces if kind == 2)
    # sentencepiece merges the pair whose merged piece scores highest: pieces are stored best first
    mergeable = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == 1}
    merges = generate_merges(vocab, {p: -i for p, i in mergeable.items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=trainer["byte_fallback"]))
    steps = []
    if spec["charsmap"]:
        steps.append(normalizers.Precompiled(spec["charsmap"]))
    if spec["remove_extra_whitespaces"]:
        # sentencepiece's whitespace rule: runs of spaces to one, none at either end (\A, \z: the
        # text's ends; ^ and $ would also match at each newline)
        steps += [normalizers.Replace(Regex(" {2,}"), " "),
                  normalizers.Replace(Regex(r"\A | \z"), "")]
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        decode + ([decoders.Strip(" ", 1, 0)] if spec["add_dummy_prefix"] else []))
    # sentencepiece never splits control and user-defined pieces; after them, the folder's added
    # tokens, unsplit too
    in_model = {i: (piece, kind == 3) for i, (piece, _, kind) in enumerate(pieces)
                if kind in (3, 4)}
    for i, (content, special) in sorted({**in_model, **added_tokens}.items()):
        if i < len(pieces) and pieces[i][0] != content:
            raise Refused(f"added token {i} {content!r} is {pieces[i][0]!r} in {path}")
        if i >= tokenizer.get_vocab_size(with_added_tokens=True) + 1:
            raise Refused(
                f"added token {i} {content!r} leaves a gap after the vocabulary of {path}")
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
        if tokenizer.token_to_id(content) != i:
            raise Refused(
                f"added token {content!r} would get id {tokenizer.token_to_id(content)}, not {i}")
    if add_bos:
        if "<s>" not in vocab:
            raise Refused(
                f"{path}: no <s> piece, which InternLM2's tokenizer puts before every text")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                 pair="<s> $A <s> $B",
                                                                 special_tokens=[("<s>",
                                                                                  vocab["<s>"])])
    return tokenizer


def read_added_tokens(src):
    """{id: (content, special)} of the folder's tokenizer_config.json added_tokens_decoder
    (InternVL2's image tokens among them), and the config itself."""
    path = os.path.join(src, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    return {int(i): (t["content"], bool(t.get("special", True)))
            for i, t in config.get("added_tokens_decoder", {}).items()}, config


def converted_tokenizer(src, llm, template):
    """The transformers tokenizer of the converted folder: InternLM2's tokenizer.model rebuilt
    without its remote code, or the 1B's Qwen2 tokenizer as it is, both naming InternVL's image
    tokens and ending a turn at the template's separator."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    added, settings = read_added_tokens(src)
    names = {content for content, _ in added.values()}
    missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT, template[-1]) if t not in names]
    if missing:
        raise Refused(f"{src}/tokenizer_config.json: no added token {missing[0]!r}, which "
                      f"InternVL2's folders list")
    image_tokens = {"start_image_token": IMG_START, "end_image_token": IMG_END,
                    "context_image_token": IMG_CONTEXT,
                    # InternVL2 has no video token: a name only, never in the vocabulary
                    "video_token": "<video>"}
    if llm["architectures"][0] == "Qwen2ForCausalLM":
        name = settings.get("tokenizer_class")
        if name not in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
            raise Refused(f"{src}/tokenizer_config.json: tokenizer_class {name!r}, not the 1B's "
                          f"Qwen2Tokenizer")
        tokenizer = transformers.Qwen2Tokenizer.from_pretrained(src,
                                                                extra_special_tokens=image_tokens)
        tokenizer.eos_token = template[-1]
        return tokenizer
    model_file = os.path.join(src, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise Refused(f"{src}: no tokenizer.model, InternLM2's sentencepiece model")
    backend = sentencepiece_tokenizer(model_file, added,
                                      add_bos=settings.get("add_bos_token", True))

    # tokenizer_config.json writes a token as its text or as {"content": text, ...}
    def token(name, default):
        value = settings.get(name, default)
        return value.get("content") if isinstance(value, dict) else value

    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=token("bos_token", "<s>"),
                                   eos_token=template[-1], unk_token=token("unk_token", "<unk>"),
                                   pad_token=token("pad_token", "</s>"),
                                   extra_special_tokens=image_tokens,
                                   add_bos_token=settings.get("add_bos_token", True),
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=settings.get("model_max_length",
                                                                 llm["max_position_embeddings"]))


def chat_template(template):
    """InternVL2's conversation (SeparatorStyle.MPT) as a jinja chat template: system prompt +
    separator, then each turn as role + message + separator, and the assistant's role to generate
    after. An image is `<image>\\n` before the question, as InternVL2's chat() writes it; here the
    processor's <IMG_CONTEXT>, which it expands to <img>, 256 <IMG_CONTEXT> per tile, </img>."""
    system_template, system_message, user, assistant, sep = template
    head, tail = system_template.split("{system_message}")
    say = lambda s: json.dumps(s, ensure_ascii=False)
    return (
        "{%- set system = namespace(text=" + say(system_message) + ") -%}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        "{%- set system.text = message['content'] if message['content'] is string "
        "else message['content'] | map(attribute='text') | join('') -%}{%- endfor -%}"
        "{{- " + say(head) + " + system.text + " + say(tail + sep) + " -}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{{- " + say(user) + " if message['role'] == 'user' else " + say(assistant) + " -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{- " + say(IMG_CONTEXT + "\n") + " -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- "
        "endif -%}{{- " + say(sep) + " -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- "
        "" + say(assistant) + " -}}{%- endif -%}")


def image_settings(config, image_size):
    """InternVL2's dynamic tiling (dynamic_preprocess: tiles of image_size,
    min_dynamic_patch..max_dynamic_patch of them at the closest aspect ratio, plus a thumbnail) and
    normalisation, as GotOcr2's image processor's."""
    return {"image_processor_type": "GotOcr2ImageProcessorFast",
            "processor_class": "InternVLProcessor",
            "crop_to_patches": bool(config.get("dynamic_image_size", True)),
            "min_patches": config.get("min_dynamic_patch", 1),
            "max_patches": config.get("max_dynamic_patch", 12),
            "size": {"height": image_size, "width": image_size}, "resample": 3, "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_convert_rgb": True,
            "default_to_square": True, "data_format": "channels_first"}


# ---------------------------------------------------------------------------------------------

def convert(src, dst):
    """Write the native folder for the InternVL2 folder `src` to `dst` (via dst + '.tmp')."""
    import transformers

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    problem = check_supported(config)
    if problem:
        raise Refused(f"{src}/config.json: {problem}")
    llm, vision = config["llm_config"], config["vision_config"]
    template = TEMPLATES[config["template"]]
    image_size = vision["image_size"]
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # a failed write (a full disk, say) leaves no half-written folder: tmp is removed, and a
    # library's report of it raised as the OSError it is
    with runs.written_aside(tmp):
        os.makedirs(tmp)
        tokenizer = converted_tokenizer(src, llm, template)
        context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        tokens_per_tile = int(
            (image_size // vision["patch_size"]) ** 2 * config["downsample_ratio"] ** 2)
        native = transformers.InternVLConfig(
            vision_config=vision_settings(vision, image_size), text_config=text_settings(llm),
            image_token_id=context_id, image_seq_length=tokens_per_tile,
            downsample_ratio=config["downsample_ratio"], projector_hidden_act="gelu",
            vision_feature_layer=-1, vision_feature_select_strategy="default",
            tie_word_embeddings=llm.get("tie_word_embeddings", False))
        native.architectures = ["InternVLForConditionalGeneration"]
        native.save_pretrained(tmp)
        stops = [tokenizer.convert_tokens_to_ids(t) for t in (template[-1], "<|im_start|>")]
        # InternLM2's </s>
        stops += [llm["eos_token_id"]] if isinstance(llm.get("eos_token_id"), int) else []
        transformers.GenerationConfig(eos_token_id=list(dict.fromkeys(stops)),
                                      pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        written = convert_weights(src, tmp, llm)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
            f.write(chat_template(template))
        settings = image_settings(config, image_size)
        # the same settings for frames
        video = {k: v for k, v in settings.items() if k != "image_processor_type"}
        for name, body in (("preprocessor_config.json", settings),
                           ("video_preprocessor_config.json",
                            {**video, "video_processor_type": "InternVLVideoProcessor"}),
                           ("processor_config.json", {"image_seq_length": tokens_per_tile,
                                                      "processor_class": "InternVLProcessor"})):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(body, f, indent=2)
        runs.replace_folder(tmp, dst)  # the old folder kept until the new one is in place
    return written


def destination_problem(src, dst, overwrite=False):
    """Why `dst` may not be written for `src`, or None: src without its config.json; dst that is
    src, holds it or lies inside it (replacing it would delete the source); an existing dst without
    --overwrite."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        return f"{src}: no config.json" + (" (no such folder)" if not os.path.exists(src) else "")
    source, target = os.path.realpath(src), os.path.realpath(dst.rstrip("/") or dst)
    if target == source or source.startswith(target + os.sep):
        return (f"dst {dst} is src or holds it: converting would delete the source; choose a "
                f"folder outside {src}")
    if target.startswith(source + os.sep):
        return f"dst {dst} lies inside src {src}: choose a folder outside it"
    if os.path.exists(dst) and not overwrite:
        return f"dst {dst} exists: --overwrite replaces it, or choose another folder"
    if os.path.exists(dst) and not os.path.isdir(dst):
        return f"dst {dst} is a file, not a folder"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0]
                                     + " Reads local files only.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src",
                        help="an InternVL2 folder as its hub repository ships it (config.json with "
                             "llm_config / vision_config, safetensors, tokenizer files)")
    parser.add_argument("dst", help="the folder to write; it must not exist, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dst (never src, nor a folder holding it or "
                             "inside it)")
    args = parser.parse_args(argv)
    problem = destination_problem(args.src, args.dst, args.overwrite)
    if problem:
        parser.exit(2, f"convert_internvl2.py: error: {problem}\n")
    try:
        written = convert(args.src, args.dst)
    except Refused as refusal:
        parser.exit(2, f"convert_internvl2.py: error: {refusal}\n")
    except OSError as failed:  # a full disk, say: nothing half-written is left, dst as it was
        parser.exit(1, f"convert_internvl2.py: error: writing {failed.filename or args.dst}: "
                       f"{failed.strerror or failed}; {args.dst} is as it was before\n")
    print(f"{args.dst}: InternVLForConditionalGeneration, {len(written)} tensors; "
          f"python train.py --model {args.dst} ... runs on it")


if __name__ == "__main__":
    sys.exit(main())
