"""Loading: a model folder or hub name -> the encoder and how to embed with it.

- ``load_encoder(path)``: the Hugging Face base model (a Llama-family base or causal LM, an export
  of this project, a BERT-family encoder), every weight checked to come from the checkpoint.
- ``load_config`` / ``empty_encoder``: its config and its shapes without weights (plan.py, the
  trainer's bucket sizes); ``stored_tensor_names`` / ``encoder_key_report``: the checkpoint's names
  against the encoder's.
- ``check_rotary_buffers``: the repair of RoPE buffers a bf16 cast rounded.
- ``model_files`` / ``stored_prompts`` / ``stored_pooling`` / ``stored_max_length``: what a model's
  sentence-transformers files say, for evaluate.py and the miner.

The architecture that runs the encoder is model/biencoder.py.
"""

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel

from common import UserError, read_json_file

from .attention import ATTN_IMPLEMENTATION

# config.json of an export in the reference's format (see export_hf.py)
BIDIRECTIONAL_LLAMA_TYPE = "llama_bidirec"
# The model families this project trains and exports, by config.json model_type. Llama-family
# models are made bidirectional; encoders are bidirectional already and used as they are.
LLAMA_TYPES = ("llama", BIDIRECTIONAL_LLAMA_TYPE)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
# The keys an export adds to its base model's Llama config (hf_files.write_model_files).
EXPORT_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "pooling", "is_causal")


def base_llama_fields(fields: dict) -> dict:
    """config.json fields of an export (model_type llama_bidirec) -> the LlamaConfig fields it was built
    from, without model_type (EXPORT_CONFIG_KEYS dropped)."""
    return {k: v for k, v in fields.items() if k not in EXPORT_CONFIG_KEYS}


# The poolings BiEncoder implements (segment_pool), so the ones a stored sentence-transformers
# config may name. Defined here, where configs are read, so that model/biencoder.py imports this
# module and not the other way round.
POOLINGS = ("mean", "cls", "lasttoken")


def check_vocab_covers_tokenizer(num_tokens: int, vocab_size: int, model: str) -> None:
    """Every id the tokenizer can emit must have an embedding row. A token id >= vocab_size fails
    only when a text contains it (an index error on the CPU, a device-side assert on CUDA), and
    llama.cpp's converter refuses such a model outright: check it before any work instead."""
    if num_tokens > vocab_size:
        raise UserError(
            f"the tokenizer of {model} has {num_tokens} tokens but the model has {vocab_size} embedding rows "
            f"(config.json vocab_size): ids {vocab_size}..{num_tokens - 1} have no embedding. Use the tokenizer "
            "the model was trained with, or grow the embedding to the tokenizer "
            "(model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(folder)) and train from that folder"
        )


# Checkpoint tensors that are not part of the encoder and are dropped on purpose: a causal LM's
# head (Llama-3.1-8B is published as LlamaForCausalLM) and BERT's [CLS] pooler (we mean-pool).
DROPPED_HEADS = ("lm_head.", "pooler.")


def stored_tensor_names(path: str) -> set[str] | None:
    """Names of the tensors in a model's safetensors files (index or headers only, nothing loaded);
    None when they cannot be listed (.bin checkpoints, a hub name not in the local cache)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def find(name):
        if (Path(path) / name).is_file():
            return Path(path) / name
        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)  # fmt: skip
        return Path(found) if found else None

    index = find("model.safetensors.index.json")
    if index is not None:
        return set(json.loads(index.read_text())["weight_map"])
    single = find("model.safetensors")
    if single is None:
        return None
    with safe_open(str(single), framework="pt") as f:
        return set(f.keys())


def encoder_key_report(encoder: nn.Module, stored: set[str]) -> dict:
    """Compare a checkpoint's tensor names with the encoder's own state-dict keys.

    A causal LM checkpoint stores the encoder under its base-model prefix ("model.layers.0...");
    it is stripped here as transformers strips it. Returns the encoder keys the checkpoint lacks
    (`missing`), the checkpoint tensors that belong to no encoder key (`unexpected`) and the known
    heads dropped on purpose (`dropped`). Non-persistent buffers stored by old checkpoints (BERT's
    position_ids) are neither.
    """
    prefix = f"{encoder.base_model_prefix}."
    names = {k[len(prefix) :] if k.startswith(prefix) else k for k in stored}
    expected = set(encoder.state_dict().keys())
    buffers_not_saved = {n for n, _ in encoder.named_buffers()} - expected
    extra = names - expected - buffers_not_saved
    dropped = sorted(k for k in extra if k.startswith(DROPPED_HEADS))
    return {"missing": sorted(expected - names), "unexpected": sorted(extra - set(dropped)), "dropped": dropped}


def check_loaded(path: str, encoder: nn.Module, info: dict) -> list[str]:
    """Stop on any encoder weight the checkpoint did not provide or any tensor it has that the
    encoder does not take: transformers only logs those (missing weights stay randomly initialised,
    silently, e.g. if a renaming path between a causal-LM checkpoint and the bare model changes).
    Returns the head tensors dropped on purpose, for the caller to report."""
    stored = stored_tensor_names(path)
    report = encoder_key_report(encoder, stored) if stored is not None else {"missing": [], "unexpected": []}
    missing = sorted(set(report["missing"]) | set(info.get("missing_keys", ())))
    problems = []
    if missing:
        problems.append(f"{len(missing)} encoder weights missing from the checkpoint (they would train from random "
                        f"values): {missing[:6]}")  # fmt: skip
    if report["unexpected"]:
        problems.append(f"{len(report['unexpected'])} checkpoint tensors match no encoder weight: "
                        f"{report['unexpected'][:6]}")  # fmt: skip
    for key in ("mismatched_keys", "error_msgs"):
        if info.get(key):
            problems.append(f"{key}: {list(info[key])[:6]}")
    if problems:
        raise UserError(
            f"{path} does not load as a {type(encoder).__name__}: "
            + "; ".join(problems)
            + ". Check that the folder is a complete checkpoint of a supported architecture (a Llama-family "
            "base or causal LM, an export of this project, or a BERT-family encoder)"
        )
    return report.get("dropped", [])


def is_export(path: str) -> bool:
    """A local folder in the reference's export format (config.json model_type llama_bidirec)."""
    config_file = Path(path) / "config.json"
    return config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == BIDIRECTIONAL_LLAMA_TYPE


def load_config(path: str):
    """The encoder's config: for an export, the LlamaConfig it was built from (no remote code needed);
    else AutoConfig's."""
    if is_export(path):
        return LlamaConfig(**base_llama_fields(json.loads((Path(path) / "config.json").read_text())))
    return AutoConfig.from_pretrained(path)


def check_rotary_buffers(encoder: nn.Module) -> tuple[list[str], list[str]]:
    """Make every rotary-embedding buffer (`inv_freq`, `original_inv_freq`) fp32 and equal to the
    values computed from the config; return (the names checked, the names that were not and were
    recomputed).

    A blanket `module.bfloat16()` (DeepSpeed releases before 0.19.2 cast buffers with the weights)
    rounds inv_freq to bf16: for Llama-3.1's frequencies up to ~0.9 rad of angle error by position
    511, so training would see other positions than the pretrained model and the export.
    """
    checked, fixed = [], []
    for name, module in encoder.named_modules():
        if not isinstance(getattr(module, "inv_freq", None), torch.Tensor) or not hasattr(module, "config"):
            continue
        fresh = type(module)(module.config)  # computes the buffers from the config, in fp32, on the CPU
        for buf in ("inv_freq", "original_inv_freq"):
            have, want = getattr(module, buf, None), getattr(fresh, buf, None)
            if have is None or want is None:
                continue
            want = want.to(device=have.device, dtype=torch.float32)
            checked.append(f"{name}.{buf}")
            if have.dtype != torch.float32 or not torch.equal(have, want):
                module._buffers[buf] = want
                fixed.append(f"{name}.{buf}")
            assert module._buffers[buf].dtype == torch.float32 and torch.equal(module._buffers[buf], want)
    return checked, fixed


def encoder_kwargs(config) -> dict:
    """Extra from_pretrained / from_config arguments of the encoder of a model family."""
    if config.model_type in ENCODER_TYPES and config.model_type != "distilbert":
        return {"add_pooling_layer": False}  # mean pooling; the [CLS] pooler would be dead weight
    return {}


def empty_encoder(config) -> nn.Module:
    """The encoder built from its config on the meta device: shapes and parameter names, no memory."""
    with torch.device("meta"):
        return AutoModel.from_config(config, **encoder_kwargs(config))


def load_encoder(path: str, dtype=torch.float32, attn_implementation: str = ATTN_IMPLEMENTATION) -> nn.Module:
    """A Hugging Face base model (no head) from a hub name, a local folder or an export, with every
    weight checked to come from the checkpoint (`check_loaded`); `encoder.dropped_heads` lists the
    head tensors left out (e.g. a causal LM's lm_head.weight)."""
    config = load_config(path)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "output_loading_info": True}
    kwargs.update(encoder_kwargs(config))
    if isinstance(config, LlamaConfig) and is_export(path):
        encoder, info = LlamaModel.from_pretrained(path, config=config, **kwargs)
    else:
        encoder, info = AutoModel.from_pretrained(path, **kwargs)
    encoder.dropped_heads = check_loaded(path, encoder, info)
    return encoder


# ----------------------------------------------------------------------------------------------
# What a model folder's sentence-transformers files say: prompts, max length, pooling. One reading
# for evaluate.py and the miner (training always uses the recipe's mean pooling, bidirectional).

DEFAULT_MAX_LENGTH = 512  # tokens, when a model folder stores no max_seq_length


def model_files(name: str) -> Path:
    """The folder holding a model's configuration files: the folder itself, or for a hub name its
    JSON files (config, sentence-transformers modules and prompts), fetched or read from the cache."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json"]))


def stored_prompts(folder: Path) -> dict[str, str]:
    """config_sentence_transformers.json's prompts: an export stores the training data's exact strings,
    "query" / "document" when every subset had the same, "<subset>-query" / "<subset>-document" always."""
    file = Path(folder) / "config_sentence_transformers.json"
    return (read_json_file(file).get("prompts") or {}) if file.is_file() else {}


def stored_pooling(name: str, folder: Path) -> tuple[str, bool]:
    """(pooling, bidirectional) of a model folder (name: how the user gave it, for messages): what its
    sentence-transformers files say, so that the miner and evaluate.py embed it as
    sentence-transformers would. A folder without modules.json (a base model, a
    plain encoder): mean pooling, bidirectional (BiEncoder's way). An export of this project (or
    llama-embed-nemotron-8b) is bidirectional by its config; any other model keeps its own
    attention, as sentence-transformers runs it (a BERT-family encoder: bidirectional; e5-mistral,
    Qwen3-Embedding: causal, last token). Anything else is refused: embedding it another way would
    give wrong negatives without a word."""
    if not (folder / "modules.json").is_file():
        return "mean", True
    modules = json.loads((folder / "modules.json").read_text())  # a list of {idx, name, path, type}
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(f"--model {name}: {folder / 'modules.json'} is not a sentence-transformers module list")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    pooling_modules = [m for m in modules if m.get("type", "").endswith("Pooling")]
    other = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if other or len(pooling_modules) != 1 or kinds[0] != "Transformer":
        raise UserError(
            f"--model {name}: its sentence-transformers modules are {' -> '.join(kinds)}; supported: "
            "Transformer -> Pooling [-> Normalize] (no Dense or other layers)"
        )
    cfg = read_json_file(folder / pooling_modules[0].get("path", "") / "config.json")
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 6; before: one pooling_mode_<x>_tokens flag each
    if mode is None:
        legacy = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "lasttoken"}
        flags = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        mode = [legacy.get(f, f) for f in flags]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise UserError(
            f"--model {name}: pooling {'+'.join(modes) or 'none'} in its sentence-transformers config; "
            "supported: one of mean, cls, lasttoken"
        )
    if cfg.get("include_prompt") is False:
        raise UserError(
            f"--model {name}: its pooling leaves the prompt's tokens out (include_prompt false): not supported "
            "(pooling here covers every token)"
        )
    return modes[0], is_export(str(folder))


def stored_max_length(folder: Path) -> int | None:
    """A sentence-transformers folder's max_seq_length: sentence_bert_config.json (sentence-transformers
    < 6), else its tokenizer's model_max_length (>= 6 keeps it there); None for other folders."""
    if (folder / "sentence_bert_config.json").is_file():
        stored = read_json_file(folder / "sentence_bert_config.json").get("max_seq_length")
        if stored:
            return int(stored)
    if (folder / "modules.json").is_file() and (folder / "tokenizer_config.json").is_file():
        stored = read_json_file(folder / "tokenizer_config.json").get("model_max_length")
        if isinstance(stored, int) and stored < 10**6:  # transformers writes ~1e30 for "no limit"
            return stored
    return None
