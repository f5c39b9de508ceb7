"""convert_internvl2.py on tiny checkpoints laid out as OpenGVLab/InternVL2-{1B,2B,26B} ship them.

The reference below is written from InternVL2's published architecture, not from the converter:
InternViT blocks with a fused qkv and layer scales, pixel shuffle "v2", the mlp1 projector,
InternLM2 with its grouped fused wqkv and rotary embedding, and dynamic_preprocess's tiling. The
tokenizer is a real sentencepiece BPE model (sentencepiece, a test dependency, trains it and is the
reference tokenizer), with InternLM2's chat tokens inside it and InternVL2's image tokens after it.
"""
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
import replica

spm = pytest.importorskip("sentencepiece")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert_internvl2  # noqa: E402

# InternLM2's chat tokens (ids 92538-92543 of its 92544-piece tokenizer.model) and InternVL2's added
# tokens (92544-92552), as the InternVL2-2B / 8B / 26B tokenizer_config.json files list them
INTERNLM2_CHAT = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
                  "<|im_end|>", "<|im_start|>"]
INTERNVL2_ADDED = replica.INTERNVL_SPECIALS
TEXTS = ["Is there a dog in the image? Please answer this question with one word.",
         "A cat sits on the mat near two dogs and a traffic light.",
         "Describe this image in detail.", convert_internvl2.SYSTEM_MESSAGE, "yes", "no",
         "There is a person riding a bicycle."]
# 56-pixel tiles of 14-pixel patches: 16 patches, 4 tokens a tile after pixel shuffle
IMAGE, PATCH = 56, 14


def internlm2_tokenizer_files(folder):
    """tokenizer.model (sentencepiece BPE, byte fallback, the chat tokens as its last pieces' kind:
    user-defined), tokenizer_config.json (InternLM2Tokenizer by auto_map, added_tokens_decoder) and
    the remote tokenizer code, which must never run. Returns {token: id}."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model,
                                   model_type="bpe", vocab_size=420, byte_fallback=True,
                                   character_coverage=1.0, user_defined_symbols=INTERNLM2_CHAT,
                                   normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=3)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = {t: sp.piece_to_id(t) for t in ["<unk>", "<s>", "</s>"] + INTERNLM2_CHAT}
    ids.update({t: sp.get_piece_size() + i for i, t in enumerate(INTERNVL2_ADDED)})
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    replica.write_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": 1000000000, "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"})
    replica.write_json(os.path.join(folder, "special_tokens_map.json"), {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    return ids


def internvl2_folder(folder, language="internlm2", vision="300m", seed=0):
    """A folder with InternVL2's layout: config.json (model_type internvl_chat, llm_config,
    vision_config, template, tiling limits, ps_version), two safetensors shards with an index,
    InternVL2's weight names, its tokenizer files, and its remote code files (made to fail if
    anything imports or runs them)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if language == "internlm2":
        ids = internlm2_tokenizer_files(folder)
        llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
               "hidden_size": 48, "intermediate_size": 96, "max_position_embeddings": 512,
               "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
               "rms_norm_eps": 1e-5, "rope_theta": 1000000,
               "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "tie_word_embeddings": False,
               "vocab_size": max(ids.values()) + 1, "attn_implementation": "flash_attention_2",
               "auto_map": {"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"}}
        template = "internlm2-chat"
    else:  # InternVL2-1B: Qwen2-0.5B-Instruct and its tokenizer, InternVL's tokens after Qwen's
        ids = replica.write_qwen2_tokenizer(folder, replica.QWEN_SPECIALS + INTERNVL2_ADDED)
        llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
               "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
               "hidden_act": "silu", "hidden_size": 48, "intermediate_size": 96,
               "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
               "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
               "tie_word_embeddings": False, "vocab_size": max(ids.values()) + 1,
               "attn_implementation": "flash_attention_2", "use_sliding_window": False}
        template = "Hermes-2"
    # InternViT-6B (26B): RMSNorm, q/k norms, no qkv bias; InternViT-300M: LayerNorm, bias
    six_b = vision == "6b"
    vision_config = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                     "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 2, "patch_size": PATCH, "image_size": IMAGE,
                     "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                     "norm_type": "rms_norm" if six_b else "layer_norm", "qk_normalization": six_b,
                     "qkv_bias": not six_b, "use_flash_attn": True, "drop_path_rate": 0.0,
                     "dropout": 0.0}
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
              "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": IMAGE,
              "llm_config": llm, "max_dynamic_patch": 4, "min_dynamic_patch": 1, "ps_version": "v2",
              "select_layer": -1, "template": template, "use_thumbnail": True,
              "vision_config": vision_config, "torch_dtype": "float32"}
    replica.write_json(os.path.join(folder, "config.json"), config)
    for name in ("modeling_internvl_chat.py", "configuration_internvl_chat.py",
                 "modeling_internlm2.py", "tokenization_internlm2.py", "conversation.py"):
        with open(os.path.join(folder, name), "w") as f:
            f.write("raise RuntimeError('the checkpoint remote code was executed')\n")
    weights = internvl2_weights(config, torch.Generator().manual_seed(seed))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, os.path.join(folder, shard),
                  metadata={"format": "pt"})
    replica.write_json(os.path.join(folder, "model.safetensors.index.json"), {
        "metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}})
    return folder, config, weights, ids


def internvl2_weights(config, g):
    """Random weights under InternVL2's names and shapes (InternVLChatModel's state dict)."""
    v, llm = config["vision_config"], config["llm_config"]
    C, D, H = v["hidden_size"], llm["hidden_size"], llm["num_attention_heads"]
    rand = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale
    w = {"vision_model.embeddings.class_embedding": rand(1, 1, C),
         "vision_model.embeddings.patch_embedding.weight": rand(C, 3, PATCH, PATCH, scale=0.05),
         "vision_model.embeddings.patch_embedding.bias": rand(C),
         "vision_model.embeddings.position_embedding": rand(1, (IMAGE // PATCH) ** 2 + 1, C)}
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        w.update({p + "attn.qkv.weight": rand(3 * C, C), p + "attn.proj.weight": rand(C, C),
                  p + "attn.proj.bias": rand(C),
                  p + "mlp.fc1.weight": rand(v["intermediate_size"], C),
                  p + "mlp.fc1.bias": rand(v["intermediate_size"]),
                  p + "mlp.fc2.weight": rand(C, v["intermediate_size"]),
                  p + "mlp.fc2.bias": rand(C), p + "norm1.weight": 1 + rand(C),
                  p + "norm2.weight": 1 + rand(C), p + "ls1": rand(C, scale=0.5),
                  p + "ls2": rand(C, scale=0.5)})
        if v["qkv_bias"]:
            w[p + "attn.qkv.bias"] = rand(3 * C)
        if v["norm_type"] == "layer_norm":
            w.update({p + "norm1.bias": rand(C), p + "norm2.bias": rand(C)})
        if v["qk_normalization"]:
            w.update({p + "attn.q_norm.weight": 1 + rand(C), p + "attn.k_norm.weight": 1 + rand(C)})
    w.update({"mlp1.0.weight": 1 + rand(4 * C), "mlp1.0.bias": rand(4 * C),
              "mlp1.1.weight": rand(D, 4 * C), "mlp1.1.bias": rand(D), "mlp1.3.weight": rand(D, D),
              "mlp1.3.bias": rand(D)})
    V, I, kv = llm["vocab_size"], llm["intermediate_size"], llm["num_key_value_heads"]
    head = D // H
    if llm["model_type"] == "internlm2":
        w.update({"language_model.model.tok_embeddings.weight": rand(V, D, scale=1.0),
                  "language_model.model.norm.weight": 1 + rand(D),
                  "language_model.output.weight": rand(V, D)})
        for i in range(llm["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            w.update({p + "attention.wqkv.weight": rand((H + 2 * kv) * head, D),
                      p + "attention.wo.weight": rand(D, D),
                      p + "feed_forward.w1.weight": rand(I, D),
                      p + "feed_forward.w3.weight": rand(I, D),
                      p + "feed_forward.w2.weight": rand(D, I),
                      p + "attention_norm.weight": 1 + rand(D), p + "ffn_norm.weight": 1 + rand(D)})
    else:
        w.update({"language_model.model.embed_tokens.weight": rand(V, D, scale=1.0),
                  "language_model.model.norm.weight": 1 + rand(D),
                  "language_model.lm_head.weight": rand(V, D)})
        for i in range(llm["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (kv * head, D)),
                                ("self_attn.v_proj", (kv * head, D))):
                w.update({p + name + ".weight": rand(*shape), p + name + ".bias": rand(shape[0])})
            w.update({p + "self_attn.o_proj.weight": rand(D, D),
                      p + "mlp.gate_proj.weight": rand(I, D), p + "mlp.up_proj.weight": rand(I, D),
                      p + "mlp.down_proj.weight": rand(D, I),
                      p + "input_layernorm.weight": 1 + rand(D),
                      p + "post_attention_layernorm.weight": 1 + rand(D)})
    return w


# ---------------------------------------------------------------------------------------------
# The reference: InternVL2's forward pass, from its published architecture

def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def vision_norm(x, w, p, v):
    if v["norm_type"] == "layer_norm":
        return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], v["layer_norm_eps"])
    return rms_norm(x, w[p + ".weight"], v["layer_norm_eps"])


def internvit(pixel_values, w, v):
    """InternVisionModel: patch embedding, class token, position embedding, then blocks of
    x + ls1 * proj(attn(norm1 x)) and x + ls2 * fc2(gelu(fc1(norm2 x))); qkv fused as [q; k; v]."""
    x = F.conv2d(pixel_values, w["vision_model.embeddings.patch_embedding.weight"],
                 w["vision_model.embeddings.patch_embedding.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    cls = w["vision_model.embeddings.class_embedding"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + w["vision_model.embeddings.position_embedding"]
    heads, C = v["num_attention_heads"], v["hidden_size"]
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        h = vision_norm(x, w, p + "norm1", v)
        qkv = F.linear(h, w[p + "attn.qkv.weight"], w.get(p + "attn.qkv.bias"))
        B, N, _ = qkv.shape
        q, k, val = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if v["qk_normalization"]:
            q = rms_norm(q.transpose(1, 2).flatten(-2), w[p + "attn.q_norm.weight"],
                         v["layer_norm_eps"])
            k = rms_norm(k.transpose(1, 2).flatten(-2), w[p + "attn.k_norm.weight"],
                         v["layer_norm_eps"])
            q, k = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), dim=-1) @ val
        x = x + w[p + "ls1"] * F.linear(attn.transpose(1, 2).reshape(B, N, C),
                                        w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = vision_norm(x, w, p + "norm2", v)
        hidden = F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        x = x + w[p + "ls2"] * F.linear(hidden, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return x


def pixel_shuffle_v2(x, scale=0.5):
    """InternVL2's pixel_shuffle with ps_version 'v2': (n, w, h, c) -> (n, w*s, h*s, c/s^2)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3)


def extract_feature(pixel_values, w, config):
    """InternVLChatModel.extract_feature: the last layer without the class token, pixel shuffle,
    mlp1."""
    x = internvit(pixel_values, w, config["vision_config"])[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = pixel_shuffle_v2(x.reshape(x.shape[0], side, side, -1))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = F.layer_norm(x, x.shape[-1:], w["mlp1.0.weight"], w["mlp1.0.bias"])
    return F.linear(F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"],
                    w["mlp1.3.bias"])


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def internlm2(embeddings, w, llm):
    """InternLM2ForCausalLM on input embeddings: wqkv rows as (kv head, [q_per_kv queries, key,
    value], head_dim), rotary embedding (rotate_half, rope_theta), causal GQA attention, w2(silu(w1
    x) * w3 x)."""
    D, H, kv = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    d, groups = D // H, H // kv
    B, L, _ = embeddings.shape
    inv = 1.0 / (llm["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(L).float(), inv)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    mask = torch.full((L, L), float("-inf")).triu(1)
    x = embeddings
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        h = rms_norm(x, w[p + "attention_norm.weight"], llm["rms_norm_eps"])
        qkv = F.linear(h, w[p + "attention.wqkv.weight"]).reshape(B, L, kv, groups + 2, d)
        q = qkv[..., :groups, :].reshape(B, L, H, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2).repeat_interleave(groups, dim=1)
        v = qkv[..., -1, :].transpose(1, 2).repeat_interleave(groups, dim=1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
        x = x + F.linear(attn.transpose(1, 2).reshape(B, L, D), w[p + "attention.wo.weight"])
        h = rms_norm(x, w[p + "ffn_norm.weight"], llm["rms_norm_eps"])
        gate, up = F.linear(h, w[p + "feed_forward.w1.weight"]), F.linear(
            h, w[p + "feed_forward.w3.weight"])
        x = x + F.linear(F.silu(gate) * up, w[p + "feed_forward.w2.weight"])
    x = rms_norm(x, w["language_model.model.norm.weight"], llm["rms_norm_eps"])
    return F.linear(x, w["language_model.output.weight"])


def internvl2_logits(input_ids, pixel_values, w, config, context_id):
    """InternVLChatModel.forward: the token embeddings, with the <IMG_CONTEXT> rows replaced by the
    tiles' features in order, through the language model. The Qwen2 1B's language model is
    transformers' own."""
    llm = config["llm_config"]
    table = w.get("language_model.model.tok_embeddings.weight",
                  w.get("language_model.model.embed_tokens.weight"))
    embeddings = F.embedding(input_ids, table)
    if pixel_values is not None:
        features = extract_feature(pixel_values, w, config).reshape(-1, llm["hidden_size"])
        embeddings = embeddings.clone()
        embeddings[input_ids == context_id] = features
    if llm["model_type"] == "internlm2":
        return internlm2(embeddings, w, llm)
    import transformers

    settings = {k: v for k, v in llm.items() if k not in ("architectures", "attn_implementation")}
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings)).eval()
    qwen.load_state_dict(
        {k[len("language_model."):]: t for k, t in w.items() if k.startswith("language_model.")})
    return qwen(inputs_embeds=embeddings).logits


def dynamic_preprocess(image, min_num=1, max_num=4, size=IMAGE):
    """InternVL2's load_image: the closest aspect ratio of min_num..max_num tiles (ties: more tiles
    while the image covers over half of them), resize, crop row by row, a thumbnail when tiled;
    ImageNet norm."""
    from PIL import Image

    width, height = image.size
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(width / height - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * size * size * r[0] * r[1]:
            best = r
    resized = image.resize((size * best[0], size * best[1]), Image.BICUBIC)
    tiles = [resized.crop(((i % best[0]) * size, (i // best[0]) * size, (i % best[0] + 1) * size,
                           (i // best[0] + 1) * size)) for i in range(best[0] * best[1])]
    if len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    mean = torch.tensor(convert_internvl2.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(convert_internvl2.IMAGENET_STD).view(3, 1, 1)
    import numpy as np

    pixels = [torch.from_numpy(np.asarray(t, dtype=np.float32) / 255).permute(2, 0, 1)
              for t in tiles]
    return torch.stack([(p - mean) / std for p in pixels])


def conversation_prompt(question, tiles, template_name, tokens_per_tile=4):
    """InternVL2's chat(): '<image>\\n' + question in its template (SeparatorStyle.MPT), the image
    as <img>, tokens_per_tile <IMG_CONTEXT> per tile, </img>."""
    system_template, system_message, user, assistant, sep = convert_internvl2.TEMPLATES[
        template_name]
    prompt = system_template.format(
        system_message=system_message) + sep + user + "<image>\n" + question + sep
    prompt += assistant
    return prompt.replace("<image>",
                          "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * tiles) + "</img>", 1)


def internlm2_reference_ids(text, folder, ids):
    """InternLM2Tokenizer's ids for `text`, as a transformers slow tokenizer makes them: <s>, then
    the added tokens cut out and each piece of text between them encoded by sentencepiece itself."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    specials = sorted((t for t in ids if t not in ("<unk>",)), key=len, reverse=True)
    out = [ids["<s>"]]
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in ids:
            out.append(ids[part])
        elif part:
            out += sp.encode(part)
    return out


# ---------------------------------------------------------------------------------------------

KINDS = {"2B": ("internlm2", "300m"), "26B": ("internlm2", "6b"), "1B": ("qwen2", "300m")}


@pytest.fixture(scope="module", params=sorted(KINDS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"internvl2-{request.param}")
    src, config, weights, ids = internvl2_folder(str(root / "src"), *KINDS[request.param])
    dst = str(root / "dst")
    convert_internvl2.convert(src, dst)
    return request.param, src, dst, config, weights, ids


def test_the_converted_model_computes_internvl2s_forward_on_text_and_on_tiled_images(converted):
    from PIL import Image


    kind, src, dst, config, weights, ids = converted
    model, processor = models.load_model(dst)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    context = model.config.image_token_id
    assert context == ids["<IMG_CONTEXT>"]
    # every tensor of the folder is one the class has, and the class has no other
    from safetensors import safe_open

    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"]
    assert set(index) == set(model.state_dict())
    assert all(safe_open(os.path.join(dst, f), "pt") for f in set(index.values()))

    # a text prompt
    text = processor.tokenizer(["There is a person riding a bicycle."], return_tensors="pt")
    with torch.no_grad():
        ours = model(input_ids=text.input_ids, attention_mask=text.attention_mask).logits
    torch.testing.assert_close(ours, internvl2_logits(text.input_ids, None, weights, config,
                                                      context).to(ours.dtype),
                               rtol=1e-4, atol=1e-4)
    # an image prompt, the image 2:1, so dynamic tiling gives two tiles and a thumbnail
    rng = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(40, 80, 3, generator=rng) * 255).to(torch.uint8).numpy())
    batch = models.prompt_batch(processor, [image], ["Is there a dog in the image?"])
    assert batch["pixel_values"].shape == (3, 3, IMAGE, IMAGE)
    torch.testing.assert_close(batch["pixel_values"], dynamic_preprocess(image), rtol=0, atol=2e-5)
    with torch.no_grad():
        ours = model(**batch).logits
    reference = internvl2_logits(batch["input_ids"], batch["pixel_values"], weights, config,
                                 context)
    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-4, atol=1e-4)


def test_the_chat_prompt_is_internvl2s_conversation_token_for_token(converted):
    from PIL import Image


    kind, src, dst, config, weights, ids = converted
    model, processor = models.load_model(dst)
    image = Image.new("RGB", (80, 40), (120, 30, 200))
    question = "Is there a traffic light in the image? Please answer this question with one word."
    batch = models.prompt_batch(processor, [image], [question])
    expected = conversation_prompt(question, tiles=3, template_name=config["template"])
    if KINDS[kind][0] == "internlm2":
        reference = internlm2_reference_ids(expected, src, ids)
    # the 1B's Qwen2 tokenizer is transformers' own: the same files, loaded from the source folder
    else:
        from transformers import AutoTokenizer

        reference = AutoTokenizer.from_pretrained(src)(expected).input_ids
    assert batch["input_ids"][0].tolist() == reference
    # a turn ends at the template's separator, which is the converted tokenizer's end token: where
    # generation stops
    assert processor.tokenizer.eos_token == "<|im_end|>"
    generation = json.load(open(os.path.join(dst, "generation_config.json")))
    assert ids["<|im_end|>"] in generation["eos_token_id"]
    # decoding gives the text back (the dummy prefix and byte fallback undone)
    assert processor.tokenizer.decode(processor.tokenizer("A cat 🦓 near two dogs.").input_ids,
                                      skip_special_tokens=True) == "A cat 🦓 near two dogs."


@pytest.mark.parametrize("dummy_prefix,extra_whitespace",
                         [(True, False), (False, True), (True, True)])
def test_sentencepiece_settings_are_followed_as_the_model_file_says(tmp_path, dummy_prefix,
                                                                    extra_whitespace):
    """Whatever the model file's normaliser says (dummy prefix, whitespace removal, byte fallback),
    the rebuilt tokenizer splits text as sentencepiece does."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model,
                                   model_type="bpe", vocab_size=420, byte_fallback=True,
                                   character_coverage=1.0, add_dummy_prefix=dummy_prefix,
                                   remove_extra_whitespaces=extra_whitespace,
                                   normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=3)
    path = str(tmp_path / "tokenizer.model")
    open(path, "wb").write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=path)
    tokenizer = convert_internvl2.sentencepiece_tokenizer(path, {}, add_bos=False)
    for text in TEXTS + ["  two  spaces  ", "emoji 🦓 and ünïcode", "a\nb\n\n c"]:
        assert tokenizer.encode(text).ids == sp.encode(text), text


def test_the_command_converts_and_train_and_eval_pope_run_on_the_result(tmp_path):
    """As a user runs it: python convert_internvl2.py SRC DST, then eval_pope.py answer and train.py
    --model."""
    paths = replica.build(str(tmp_path), unlabeled=3, pope_images=2, questions_per_image=2)
    src, _, _, _ = internvl2_folder(str(tmp_path / "InternVL2-2B"))
    dst = str(tmp_path / "InternVL2-2B-hf")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=600)
    converted = run("convert_internvl2.py", src, dst)
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert not os.path.exists(dst + ".tmp") and not os.path.exists(
        os.path.join(dst, "tokenization_internlm2.py"))
    answer = run("eval_pope.py", "answer", "--model", dst, "--questions",
                 os.path.join(paths["pope"], "coco_pope_random.json"), "--images", paths["val2014"],
                 "--out", str(tmp_path / "answers.jsonl"), "--device", "cpu", "--decoding",
                 "vcd-greedy", "--max-new-tokens", "2")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert len(open(tmp_path / "answers.jsonl").read().splitlines()) == 4
    train = run("train.py", "--model", dst, "--images", paths["train2014"], "--pope", paths["pope"],
                "--pope-images", paths["val2014"], "--out", str(tmp_path / "out"), "--divergence",
                "reverse", "--steps", "1", "--batch-size", "2", "--probes-per-image", "1",
                "--description-tokens", "2", "--sample-seeds", "1", "--no-progress")
    assert train.returncode == 0, train.stderr[-2000:]
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert list(results["seed_reverse"]["greedy"]) == ["random", "popular", "adversarial"]


@pytest.mark.parametrize("change,says", [
    ({"llm_config": {"architectures": ["Phi3ForCausalLM"]}}, "Phi3ForCausalLM (InternVL2-4B)"),
    ({"ps_version": "v1"}, "ps_version 'v1'"),
    ({"template": "vicuna_v1.1"}, "conversation template 'vicuna_v1.1'"),
    ({"model_type": "llava"}, "model_type 'llava'")])
def test_what_it_does_not_convert_is_refused_in_one_line(tmp_path, change, says):
    src, config, _, _ = internvl2_folder(str(tmp_path / "src"))
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    replica.write_json(os.path.join(src, "config.json"), config)
    done = subprocess.run([sys.executable, "convert_internvl2.py", src, str(tmp_path / "dst")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr and len(
        done.stderr.strip().splitlines()) == 1, done.stderr
    assert not os.path.exists(tmp_path / "dst")
