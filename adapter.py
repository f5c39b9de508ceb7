"""Hallucination Elimination Adapter: a zero-initialised low-rank residual on the language model.

Paper: "Identify, Isolate, and Purge: Mitigating Hallucinations in LVLMs via Self-Evolving
Distillation" (SEED), arXiv 2507.04680 -- "Hallucination Elimination Adapter".
Formulas: METHOD.md section 4, in the low-rank form of LoRA (Hu et al., 2021):
    h = W x + (alpha_r / r) B A x,   A: r x d_in small random,   B: d_out x r zeros.

B = 0 makes the student start exactly equal to the teacher, and the teacher *is* the student with
the adapter switched off, so one copy of the weights serves both. Merging W <- W + (alpha_r / r) B A
afterwards leaves a plain model with zero inference overhead.

Not from the paper (ours): rank 8, alpha_r 16; add_adapter's default targets are LoRA's q_proj and
v_proj, train.py wraps every linear layer of the decoder (targets=("all-linear",), measured in
docs/EXPERIMENTS.md); the adapter's own weights are kept in float32 even when the model is bf16
(small updates to a zero-initialised B vanish in bf16 rounding), its product computed in the
activations' dtype; files are safetensors + JSON, never pickle.
save_peft_adapter writes the same adapter in PEFT's LoRA format, for use with peft elsewhere.
Imports: torch and the standard library only (safetensors comes with torch's ecosystem and is
imported where it is used), so this file can be copied on its own.
"""
import contextlib
import json
import math
import os
import re

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# PEFT's file names; its config is also adapter_config.json, so a PEFT copy gets its own folder
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


class AdapterLinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank residual (alpha_r / r) B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha_r: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha_r, self.scale = rank, alpha_r, alpha_r / rank
        device = base.weight.device
        self.A = nn.Parameter(
            torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        # LoRA's init for A; B = 0 keeps the start exact
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:  # the teacher: exactly the base layer, not base + 0
            return out
        # B A x in the activations' dtype: under autocast the matmuls run in bf16 whatever their
        # inputs, so a float32 copy of x would only be one more tensor saved for the backward
        # (bench.py --memory); A and B stay float32 parameters, where the small steps accumulate
        update = (x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype)
        return out + self.scale * update


def language_model(model, decoder=None):
    """The decoder the adapter belongs in: `decoder` (a submodule's qualified name) when given; an
    LVLM's model.model.language_model (LLaVA, InternVL, Qwen2-VL); else, for a text-only causal
    LM, the whole model.

    Refuses a model with a vision part and no language_model rather than fall back to the whole
    model: the targets would then also match q_proj / v_proj in the vision tower, and the vision
    features would no longer be the same with the adapter on and off (the SEED step shares them
    between teacher and student).
    """
    if decoder is not None:
        return model.get_submodule(decoder)
    for owner in (getattr(model, "model", None), model):
        found = getattr(owner, "language_model", None)
        if isinstance(found, nn.Module):
            return found
    if not any("vision" in name or "visual" in name for name, _ in model.named_modules()):
        return model  # a text-only causal LM: all of it is the decoder
    raise ValueError(f"{type(model).__name__} has a vision part but no `language_model` (looked "
                     f"for model.model.language_model and model.language_model): name the decoder, "
                     f"add_adapter(model, decoder='qualified.name')")


def adapter_layers(model):
    """{qualified name: AdapterLinear} for every adapter attached to `model`."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, AdapterLinear)}


def _set_submodule(root, qualified_name, module):
    parent_name, _, child_name = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child_name, module)


# Short names for sets of targets, as `train.py --adapter-targets` takes them (PEFT calls the last
# one "all-linear" too: every linear layer of the language model, its output head excluded)
TARGET_SETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "down_proj")}
ALL_LINEAR = "all-linear"


def parse_targets(text):
    """"q_proj,v_proj", "attention", "attention,mlp" or "all-linear" as a tuple of target names
    (the sets spelled out; all-linear kept as the one name add_adapter expands itself)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    expanded = [t for name in names for t in TARGET_SETS.get(name, (name,))]
    return (ALL_LINEAR,) if ALL_LINEAR in expanded else tuple(dict.fromkeys(expanded))


def target_layers(model, targets=("q_proj", "v_proj"), decoder=None):
    """{qualified name in the decoder: nn.Linear} of every linear layer of the language model
    (language_model(model, decoder)) whose name ends with a target, or all of them for
    ("all-linear",); a target that matches none is an error naming the names it could match."""
    linears = {name: m for name, m in language_model(model, decoder).named_modules()
               if isinstance(m, nn.Linear)}
    if tuple(targets) == (ALL_LINEAR,):
        return linears
    chosen = {}
    for target in targets:
        matches = [name for name in linears if name == target or name.endswith("." + target)]
        if not matches:
            suffixes = sorted({name.rpartition(".")[2] for name in linears})
            raise ValueError(f"adapter target {target!r} matches no nn.Linear in the language "
                             f"model; Linear names it could match: {suffixes} (or {ALL_LINEAR})")
        chosen.update({name: linears[name] for name in matches})
    return chosen


def add_adapter(model, rank=8, alpha_r=16.0, targets=("q_proj", "v_proj"), decoder=None):
    """Wrap every nn.Linear of the language model (language_model(model, decoder)) whose name ends
    with a target (target_layers; ("all-linear",): every one); freeze all else. Returns the
    trainable parameters (every adapter's A and B).
    """
    if adapter_layers(model):
        raise ValueError(
            "model already has an adapter: merge_adapter(model) first, or keep training this one")
    decoder_name, decoder = decoder, language_model(model, decoder)
    chosen = target_layers(model, targets, decoder_name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for name, linear in chosen.items():
        wrapped = AdapterLinear(linear, rank, alpha_r)
        _set_submodule(decoder, name, wrapped)
        trainable += [wrapped.A, wrapped.B]
    model._adapter_settings = {"rank": rank, "alpha_r": alpha_r, "targets": list(targets)}
    # saved with the adapter, so that load_adapter finds the same layers
    if decoder_name is not None:
        model._adapter_settings["decoder"] = decoder_name
    return trainable


@contextlib.contextmanager
def adapter_disabled(model):
    """Inside this block the model is exactly the base model: the teacher of METHOD.md 3."""
    layers = list(adapter_layers(model).values())
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was_enabled in zip(layers, previous):
            layer.enabled = was_enabled


@torch.no_grad()
def merge_adapter(model):
    """W <- W + (alpha_r / r) B A, each wrapper replaced by its plain nn.Linear; returns the model.

    In bfloat16 weights an update below half a weight's rounding step is lost in the merge (at
    |dW| / |W| = 1e-3 about half of it). The unmerged bf16 model loses the same share where it adds
    the adapter's output to the bf16 base output, so merging costs nothing the bf16 student had
    (README, "Merging into bfloat16"); only float32 weights and activations keep such an update.
    """
    for name, layer in adapter_layers(model).items():
        weight = layer.base.weight
        weight.copy_((weight.float() + layer.scale * layer.B @ layer.A).to(weight.dtype))
        _set_submodule(model, name, layer.base)
    if hasattr(model, "_adapter_settings"):
        del model._adapter_settings
    return model


def remove_adapter(model):
    """Each wrapper replaced by its base layer, the update thrown away: the model as it was before
    add_adapter (its parameters still frozen); returns the model."""
    for name, layer in adapter_layers(model).items():
        _set_submodule(model, name, layer.base)
    if hasattr(model, "_adapter_settings"):
        del model._adapter_settings
    return model


def _write_adapter_files(path, tensors, weights_name, config, config_name, metadata=None):
    """<path>/<weights_name> (safetensors) and <path>/<config_name> (JSON), each written under a
    temporary name and renamed, so a crash never leaves a half-written adapter behind."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    written = [os.path.join(path, name + ".tmp") for name in (weights_name, config_name)]
    try:
        save_file(tensors, written[0], metadata=metadata)
        with open(written[1], "w") as f:
            json.dump(config, f, indent=2)
    except BaseException as error:  # a full disk, say: no half-written file left beside it
        for tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        # safetensors reports a failed write as "... (os error 28)": raise the OSError it is
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code and not isinstance(error, OSError):
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from error
        raise
    os.replace(written[0], os.path.join(path, weights_name))
    os.replace(written[1], os.path.join(path, config_name))


def save_adapter(model, path):
    """Write the adapter's A and B to <path>/adapter.safetensors and its settings to
    adapter_config.json."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter to save")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.A"] = layer.A.detach().contiguous().cpu()
        tensors[f"{name}.B"] = layer.B.detach().contiguous().cpu()
    _write_adapter_files(path, tensors, ADAPTER_WEIGHTS,
                         {**model._adapter_settings, "layers": sorted(layers)}, ADAPTER_CONFIG)


def load_adapter(model, path):
    """Attach (if needed) and fill the adapter saved by save_adapter; returns its parameters."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, ADAPTER_CONFIG)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    with open(config_path) as f:
        settings = json.load(f)
    if not adapter_layers(model):
        add_adapter(model, rank=settings["rank"], alpha_r=settings["alpha_r"],
                    targets=tuple(settings["targets"]), decoder=settings.get("decoder"))
    layers = adapter_layers(model)
    tensors = load_file(weights_path)
    if sorted(layers) != settings["layers"]:
        missing = sorted(set(settings["layers"]) ^ set(layers))
        raise ValueError(
            f"{config_path}: adapter layers do not match this model (differ at {missing[:5]})")
    trainable = []
    with torch.no_grad():
        for name, layer in layers.items():
            for key, parameter in (("A", layer.A), ("B", layer.B)):
                saved = tensors[f"{name}.{key}"]
                if saved.shape != parameter.shape:
                    raise ValueError(f"{weights_path}: {name}.{key} has shape "
                                     f"{tuple(saved.shape)}, this model needs "
                                     f"{tuple(parameter.shape)}")
                parameter.copy_(saved)
                trainable.append(parameter)
    return trainable


def save_peft_adapter(model, path, base_model_name_or_path=None):
    """Write the adapter in PEFT's LoRA format, importing nothing from peft, so that
    `peft.PeftModel.from_pretrained(base_model, path)` rebuilds this very student and its
    `merge_and_unload()` is merge_adapter's model. Returns the path.

    PEFT's LoRA computes the same update, W x + (lora_alpha / r) lora_B lora_A x with lora_A of
    shape (r, d_in) and lora_B (d_out, r): A and B are copied as they are, under PEFT's key names
    base_model.model.<module>.lora_A.weight / .lora_B.weight. target_modules lists the exact module
    names (language-model layers only): PEFT matches a list entry by name or dotted suffix, so the
    vision tower's q_proj / v_proj are never touched.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter to save")
    settings = model._adapter_settings
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.A.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.B.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": settings["rank"], "lora_alpha": settings["alpha_r"], "target_modules": sorted(layers),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }
    _write_adapter_files(path, tensors, PEFT_WEIGHTS, config, PEFT_CONFIG,
                         metadata={"format": "pt"})
    return path
