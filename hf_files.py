"""The Hugging Face side of an export: every file of the folder export_hf.py writes except the weights.

config.json (the reference's format for Llama, with its remote code), the tokenizer, the
sentence-transformers files (modules, mean pooling, normalisation, the training data's prompts, the
token limit), export_info.json and the model card. Plain JSON and text: no torch, and transformers
only for its version number.

    write_model_files(out, config, "llama", "LlamaModel", "meta-llama/Llama-3.1-8B", "bfloat16")
    write_sentence_transformers(out, 4096, sentence_transformers_prompts(subsets), 512)
"""

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

from common import UserError
from model.loading import LLAMA_TYPES

# The reference's remote code, shipped in every Llama export (trust_remote_code=True loads it).
REMOTE_CODE = Path(__file__).resolve().parent / "model" / "llama_bidirectional_model.py"
AUTO_MAP = {
    "AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
    "AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel",
}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def resolve_file(path: str, name: str) -> Path | None:
    """A file of a model: in a local folder, or for a hub name in the local Hugging Face cache."""
    if Path(path).is_dir():
        f = Path(path) / name
        return f if f.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    f = try_to_load_from_cache(path, name)
    return Path(f) if isinstance(f, str) else None


def write_model_files(out: Path, config, family: str, base_class: str, tokenizer_path: str, dtype: str) -> None:
    """config.json: the base model's, plus the reference's fields for Llama (and its remote code); the tokenizer.

    base_class: the class of the weights the folder holds, e.g. BertModel (not ...ForMaskedLM), written
    as an encoder's architecture; a Llama export names the reference's LlamaBidirectionalModel instead.
    """
    fields = dict(config)
    for key in ("_name_or_path", "auto_map", "torch_dtype", "id2label", "label2id", "problem_type"):
        fields.pop(key, None)  # the last three describe classifier heads, which an encoder has not
    fields.update(dtype=dtype, transformers_version=importlib.metadata.version("transformers"))
    rope = fields.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        # transformers 5 writes rope_parameters only; 4.x readers (vLLM, llama.cpp's converter) read
        # rope_theta and rope_scaling and would silently fall back to defaults without them.
        fields["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if family == "llama":
        # The reference's format: vLLM and llama.cpp select their bidirectional Llama by this name.
        fields.update(architectures=["LlamaBidirectionalModel"], model_type="llama_bidirec", pooling="avg")
        fields.update(is_causal=False, auto_map=AUTO_MAP)
        shutil.copy(REMOTE_CODE, out / REMOTE_CODE.name)
    else:
        fields["architectures"] = [base_class]
    write_json(out / "config.json", fields)
    copy_tokenizer(tokenizer_path, out, left_pad_with_eos=family == "llama")


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
TOKENIZER_FILES += [
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
]


def copy_tokenizer(src: str, out: Path, left_pad_with_eos: bool) -> None:
    """The base model's tokenizer files byte for byte (a hub name resolves through the local Hugging
    Face cache, as AutoTokenizer would); only tokenizer_config.json is edited."""
    for name in TOKENIZER_FILES:
        path = resolve_file(src, name)
        if path:
            shutil.copy(path, out / name)
    config_file, special_file = out / "tokenizer_config.json", out / "special_tokens_map.json"
    if not config_file.is_file():
        raise UserError(f"the base model {src} has no tokenizer_config.json: cannot ship its tokenizer")
    config = json.loads(config_file.read_text())
    special = json.loads(special_file.read_text()) if special_file.is_file() else {}
    if left_pad_with_eos:  # the reference: pad = EOS (<|end_of_text|>), left padding
        eos = config.get("eos_token") or special.get("eos_token")
        if eos is None:
            raise UserError(f"the tokenizer of {src} names no eos_token, which Llama exports pad with")
        config.update(pad_token=eos, padding_side="left")
        if special:
            write_json(special_file, {**special, "pad_token": eos})
    for key in ("is_local", "local_files_only"):  # loader flags that transformers 5 saves
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4.x reads this one
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_json = out / "tokenizer.json"
    if tokenizer_json.is_file() and json.loads(tokenizer_json.read_text())["model"]["type"] == "BPE":
        # The clean-up is meant for WordPiece; transformers 5 ignores it for BPE with a warning at every
        # load (4.x applied it, stripping spaces before punctuation when decoding). Off: the same ids.
        config["clean_up_tokenization_spaces"] = False
    write_json(config_file, config)


def write_sentence_transformers(out: Path, hidden_size: int, prompts: dict, max_seq_length: int) -> None:
    """modules.json: the model, mean pooling, L2 normalisation; the prompts of training.

    The module type names are sentence-transformers' classic ones, which 5.x and 6.x both read.
    """
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    write_json(
        out / "modules.json",
        [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(modules)
        ],
    )
    write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_mean_tokens": True, "include_prompt": True}
    for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken"):
        pooling[f"pooling_mode_{mode}"] = False
    write_json(out / "1_Pooling" / "config.json", pooling)
    write_json(
        out / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


RECIPE_MAX_LENGTH = 512  # tokens: the export's max_seq_length when the training data's limits are unknown


def export_max_seq_length(max_len: dict | None, model_type: str, max_positions: int | None) -> int:
    """The export's max_seq_length (sentence-transformers truncates every text at one length): the
    longer of the training data's two limits (prepare_data.py --query-max-len / --passage-max-len,
    BOS included; None: a plain model folder, the recipe's 512), capped by `position_cap`. What
    export_hf.py writes and the evaluation during training uses."""
    return position_cap(max(max_len.values()) if max_len else RECIPE_MAX_LENGTH, model_type, max_positions)


def position_cap(n: int, model_type: str, max_positions: int | None) -> int:
    """n tokens, at most where absolute position embeddings (the BERT family) end."""
    if model_type not in LLAMA_TYPES and max_positions:
        n = min(n, max_positions)
    return int(n)


def prompt_pair(prompts: dict, prompt_name: str | None, where: str) -> tuple[str | None, str | None]:
    """The (query, document) prompts of stored sentence-transformers prompts: "<prompt_name>-query" /
    "-document" (one training subset's), or "query" / "document" without a prompt_name; None where
    absent. A prompt_name with neither stored is a UserError (`where` names the flag, and the file)."""
    prefix = "" if prompt_name is None else f"{prompt_name}-"
    query, document = prompts.get(f"{prefix}query"), prompts.get(f"{prefix}document")
    if prompt_name is not None and query is None and document is None:
        names = sorted({k.rsplit("-", 1)[0] for k in prompts if k.endswith(("-query", "-document"))})
        raise UserError(f"{where} {prompt_name!r}: no such prompts; the subsets with prompts: {names or 'none'}")
    return query, document


def sentence_transformers_prompts(subsets: dict) -> dict:
    """config_sentence_transformers.json's prompts from the training data's exact strings
    ({subset: {"query": str | None, "passage": str}}, prepare_data.py's meta.json via train_state.json).

    "query" / "document", the prompts encode_query / encode_document apply, exist when every subset
    used the same one; "<subset>-query" / "<subset>-document" always (MTEB picks "<task>-query" /
    "<task>-document" by task name). A query prompt None (JSONL lines with prompts of their own) has
    no entry: those prompts are part of each query's text.
    """
    queries = {p["query"] for p in subsets.values()}
    passages = {p["passage"] for p in subsets.values()}
    prompts = {}
    if len(queries) == 1 and None not in queries:
        prompts["query"] = queries.pop()
    if len(passages) == 1:
        prompts["document"] = passages.pop()
    for name, p in subsets.items():
        if p["query"] is not None:
            prompts[f"{name}-query"] = p["query"]
        prompts[f"{name}-document"] = p["passage"]
    return prompts


def is_hub_name(name: str) -> bool:
    """'org/name' (or a bare legacy name) that is not a local path: what a card's base_model may say."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None and not Path(name).exists()


def bash_quote(text: str) -> str:
    """$'...': one shell word whatever the text holds (the instructions contain newlines)."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def write_info_and_card(
    out: Path,
    sources: list,
    weights: list[float],
    config: dict,
    family: str,
    num_params: int,
    prompts: dict,
    dtype: str,
    weight_map: dict,
) -> None:
    """export_info.json (where the weights came from, read by export_hf.py --verify-only) and a short model
    card: what the model is, how it was made, its prompts, and how each client loads it.

    sources: export_hf.py's checkpoints and exported folders (their label, kind, step, final_loss,
    train_state, base_model), averaged with `weights`; config: the base model's config.json;
    prompts: sentence_transformers_prompts' dict.
    """
    train_state = sources[0].train_state or {}  # the first source's run, as export_hf's Job.train_state
    records = [
        {"path": str(Path(s.label).resolve()), "kind": s.kind, "step": s.step, "final_loss": s.final_loss, "weight": w}
        for s, w in zip(sources, weights, strict=True)
    ]
    info = {"dtype": dtype, "family": family, "num_parameters": num_params, "prompts": prompts}
    write_json(out / "export_info.json", {**info, "sources": records, "train_state": train_state})

    train_config = train_state.get("config", {})
    base = train_config.get("model", sources[0].base_model)  # an export's own path when it records no run
    remote = ", trust_remote_code=True" if family == "llama" else ""
    front = ["library_name: sentence-transformers", "pipeline_tag: feature-extraction"]
    if is_hub_name(base):  # a local path would become a bogus hub URL (e.g. in GGUF metadata)
        front.append(f"base_model: {base}")
    rows = [f"| base model | `{base}` |", f"| training data | `{train_config.get('data', 'unknown')}` |"]
    rows += [f"| parameters | {num_params:,} ({dtype}, {len(set(weight_map.values()))} safetensors file(s)) |"]
    rows += [f"| embedding dimension | {config['hidden_size']} |"]
    for s, w in zip(sources, weights, strict=True):
        loss = f"{s.final_loss:.4f}" if isinstance(s.final_loss, (int, float)) else "unknown"
        steps = f"{s.step}/{(s.train_state or {}).get('num_steps', '?')}"
        rows.append(f"| checkpoint | `{s.label}`: step {steps}, final loss {loss}, weight {w:.4g} |")
    prompt_rows = "\n".join(f"| `{name}` | `{text!r}` |" for name, text in prompts.items()) or "| (none) | |"
    n = len(sources)
    merged = [f"The weights are the parameter-wise weighted average of these {n} checkpoints.", ""] if n > 1 else []
    lines = [
        "---",
        *front,
        "---",
        "",
        f"# Text embeddings fine-tuned from {base}",
        "",
        "A bi-encoder: bidirectional attention, mean pooling over every token (prompt included), L2 normalisation;",
        "similarity = cosine. Queries and documents are embedded with the prompts below, as in training.",
        "",
        "| | |",
        "|---|---|",
        *rows,
        "",
        *merged,
        "## Prompts (config_sentence_transformers.json)",
        "",
        '`encode_query` / `encode_document` apply `query` / `document`; a subset\'s own: `prompt_name="NAME-query"`.',
        "",
        "| name | prompt |",
        "|---|---|",
        prompt_rows,
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        f"model = SentenceTransformer(path{remote})",
        'q = model.encode_query(["how much protein should a female eat"])',
        'd = model.encode_document(["The CDC recommends 46 grams of protein per day for women."])',
        "print(model.similarity(q, d))",
        "```",
        "",
    ]
    if family == "llama":
        q = prompts.get("query", "") + "how much protein should a female eat"
        lines += [
            "`trust_remote_code=True` runs `llama_bidirectional_model.py` from this folder (a LlamaModel with",
            "bidirectional attention on every transformers 5.x); `AutoModel`, `AutoTokenizer` and vLLM need it too",
            "(`config.json` has the reference's `model_type: llama_bidirec`). The tokenizer alone loads without",
            "any code: `PreTrainedTokenizerFast.from_pretrained(path)`.",
            "",
            "```python",
            "from vllm import LLM  # vLLM >= 0.14: LlamaBidirectionalModel",
            "llm = LLM(model=path, runner='pooling', trust_remote_code=True)",
            "# CLI: vllm serve PATH --runner pooling --trust-remote-code",
            f"out = llm.embed([{q!r}])",
            "```",
            "",
            "llama.cpp (llama-embed architecture, non-causal; the converter records no pooling type, and",
            "llama-embedding splits prompts at newlines by default, which cuts instructions in two; when the",
            "converter asks whether to run this folder's code, answer N):",
            "",
            "```bash",
            "python convert_hf_to_gguf.py PATH --outfile model.gguf --outtype bf16",
            "llama-embedding -m model.gguf --pooling mean --embd-normalize 2 --embd-separator '<#sep#>' \\",
            f"    -p {bash_quote(q)}",
            "```",
            "",
        ]
    if family == "encoder":
        lines += ["Trained with mean pooling: the encoder has no [CLS] pooler (ignore `pooler_output`).", ""]
    lines += ["Loading without remote code, and the training recipe: the README of the project that wrote"]
    lines += ["this folder (export_hf.py).", "", "## Training", "", "```", train_state.get("command", "?"), "```"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
