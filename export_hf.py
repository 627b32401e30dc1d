"""Export a ZeRO-3 training checkpoint (or an average of several) as one Hugging Face model folder.

In:  the run folder of train_biencoder.py: `<run>/checkpoints/latest` names the last complete tag,
     `<run>/checkpoints/<tag>/` holds DeepSpeed's ZeRO-3 files and train_state.json. Or, with
     --checkpoint, any list of run folders, checkpoints folders, tag folders or exported folders,
     averaged parameter by parameter (--weights, default equal).
Out: `<run>/export/` (or --output-dir), usable at once by transformers and vLLM (remote code),
     sentence-transformers, the project's BiEncoder and llama.cpp's converter (the model card says how):
     - model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
       (--dtype bfloat16 by default, --max-shard-size 5GB);
     - config.json in the reference's format for Llama ("architectures": ["LlamaBidirectionalModel"],
       "model_type": "llama_bidirec", "pooling": "avg", auto_map -> llama_bidirectional_model.py,
       shipped in the folder), the base model's own config for BERT-family encoders;
     - tokenizer (Llama: pad = EOS, left padding); modules.json, 1_Pooling/ (mean),
       Normalize, config_sentence_transformers.json with the training data's exact prompts (per
       subset, from prepare_data.py's meta.json through train_state.json), sentence_bert_config.json
       with the data's token limit;
     - README.md (model card) and export_info.json (where the weights came from).
     hf_files.py writes every file but the weights.

How: each tensor is rebuilt from the fp32 master slices of all ranks 16M elements at a time,
averaged over the sources, cast, and appended to a safetensors file whose header was written first.
Peak memory does not grow with the model, the shard size or the number of ranks: Python, torch and
transformers themselves, a 64 MB chunk, and at most 256 MB of mapped checkpoint pages per averaged
source (0.74 GiB in all for a 0.6B model, against 4.75 GiB for DeepSpeed's zero_to_fp32.py, which
holds whole shards and took ~41 GB for Llama-3-8B: bench/bench_export.py). So an 8B export fits a
16 GB machine. The folder is written as `<out>.tmp-<pid>`, verified (every tensor re-read and
compared; probe texts embedded with sentence-transformers and compared with the checkpoint's own
model), then renamed; on any error it is removed. The embedding check holds the model in fp32
(4 bytes per parameter; on a GPU when one is visible, see --device); where that memory is missing it is
skipped with a warning, and `--verify-only` repeats it on a bigger machine.

Trust: DeepSpeed checkpoints are pickles. They are loaded with torch.load(weights_only=True); the
few DeepSpeed objects pickled in the optimizer files (ZeRO stage enum, loss scaler) become inert
stand-ins, nothing else is allowed. Still, only export checkpoints from a source you trust.

    python export_hf.py                                   # latest checkpoint of output/llama_embed_nemotron_8b
    python export_hf.py --run output/run2 --tag step_00003000 --dtype float32
    python export_hf.py --checkpoint output/run1 output/run2 output/run3 --output-dir output/merged
    python export_hf.py --verify-only output/llama_embed_nemotron_8b/export

Tiny CPU example, after the tiny CPU run in train_biencoder.py's docstring (default --output-dir):

    python export_hf.py --max-shard-size 10MB
"""

import gc
import json
import math
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from common import UserError, atomic_dir, resolve_device, run_cli
from hf_files import (
    export_max_seq_length,
    resolve_file,
    sentence_transformers_prompts,
    write_info_and_card,
    write_model_files,
    write_sentence_transformers,
)
from options import option, parse_config

# Elements per read: 16M fp32 = 64 MB. Every tensor is streamed in row-aligned chunks of this size.
CHUNK_ELEMS = 1 << 24
# A source's memory-mapped files are dropped and re-mapped after this many bytes were read, so the
# pages already read leave the process's RSS instead of piling up to the checkpoint's size.
REMAP_BYTES = 1 << 28

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# safetensors' names for torch dtypes (https://github.com/huggingface/safetensors, format spec)
ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}

# Probe texts of the built-in check: different lengths, so that batches are padded.
PROBE_QUERIES = ["how much protein should a female eat", "what is the capital of France?", "bi-encoder"]
PROBE_DOCUMENTS = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
    "Paris is the capital and most populous city of France.",
    "x",
]
# Largest L2 distance between the export's and the checkpoint's probe embeddings (unit vectors;
# distance d <=> cosine 1 - d^2 / 2). fp32: float error of another attention path (padded SDPA vs
# packed); bf16: bf16 weights and arithmetic (about 0.05 on the tiny test model). A causal mask,
# a lost prompt or a wrong pooling moves embeddings much further.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.15}


@dataclass
class ExportConfig:
    """Every option of export_hf.py: its flag is --field-name."""

    run: str = option("output/llama_embed_nemotron_8b", "run folder of train_biencoder.py (its --output-dir)")
    checkpoint: list[str] = option(
        [], "run / checkpoints / tag / export folders, instead of --run; several are averaged", metavar="PATH"
    )
    tag: str | None = option(
        None, "checkpoint tag, e.g. step_00003000, or best (--keep-best's); unset: the one in checkpoints/latest"
    )
    output_dir: str | None = option(None, "output folder; unset: <run>/export", hidden_aliases=["--out"])
    dtype: str = option("bfloat16", "exported weights", choices=list(DTYPES))
    max_shard_size: str = option("5GB", "e.g. 5GB (10^9 bytes), 500MiB, 100000")
    weights: list[float] | None = option(None, "merge weights, one per --checkpoint (normalised to sum 1)")
    overwrite: bool = option(False, "replace an existing output folder")
    verify: bool = option(True, "check the written export against the checkpoints (--no-verify: skip)")
    verify_only: str | None = option(None, "re-check an existing export against its checkpoints", metavar="DIR")
    device: str = option(
        "auto", "device of the embedding check: cpu, cuda, cuda:N, or auto = cuda when a GPU is visible"
    )

    def validate(self):
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)
        if self.weights is not None:
            n = len(self.checkpoint) or 1
            if len(self.weights) != n:
                raise UserError(
                    f"--weights has {len(self.weights)} values for {n} checkpoints: give one per checkpoint"
                )
            if any(w <= 0 for w in self.weights):
                raise UserError(f"--weights {self.weights}: weights must be positive")
        if self.verify_only and (self.output_dir or self.overwrite):
            raise UserError("--verify-only DIR checks an existing export: drop --output-dir / --overwrite")
        if self.verify_only and not self.verify:
            raise UserError("--verify-only and --no-verify contradict each other")


def parse_args(argv=None) -> ExportConfig:
    return parse_config(ExportConfig, argv, __doc__)


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (Hugging Face's convention), '500MiB' -> 500 * 2**20, '123' -> 123."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text!r}: write a positive size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


# ----------------------------------------------------------------------------------------------
# Reading DeepSpeed's pickles with the least trust


class DeepSpeedStandIn:
    """What the unpickler builds instead of DeepSpeed's ZeroStageEnum and loss-scaler objects.

    optim_states.pt pickles these DeepSpeed objects next to the tensors, so weights_only=True
    refuses the file. Allow-listing the real classes would import and run DeepSpeed code; this
    class only stores what it is given (the enum's value, the scaler's attributes).
    """

    def __init__(self, *args):
        self.args = args


DEEPSPEED_PICKLED = [
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
]


def load_pickle(path: Path) -> dict:
    """torch.load, memory-mapped (tensors are read only when touched), weights_only=True."""
    try:
        with torch.serialization.safe_globals([(DeepSpeedStandIn, name) for name in DEEPSPEED_PICKLED]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), ...: all mean "cannot use this file"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e).lower():
            raise UserError(
                f"refusing to unpickle {path}: it holds objects other than tensors and the known "
                f"DeepSpeed classes ({first_line}). Checkpoints are pickles; only load ones you trust."
            ) from e
        raise UserError(f"cannot read {path} ({first_line}): the file is truncated or not a torch checkpoint") from e


# ----------------------------------------------------------------------------------------------
# Name table: checkpoint name -> export name


def export_name(name: str, family: str) -> str:
    """DeepSpeed saves BiEncoder's parameters; its Hugging Face base model is the attribute `encoder`.

    llama:   encoder.embed_tokens.weight, encoder.layers.N.*, encoder.norm.weight -> the same without
             `encoder.`: LlamaModel's names, which are the reference's (LlamaBidirectionalModel is a
             LlamaModel subclass) and what vLLM / llama.cpp read for that architecture.
    encoder: encoder.X -> X, the names BertModel.save_pretrained (and its relatives) write.
    """
    if family == "llama":
        m = re.fullmatch(r"encoder\.(embed_tokens\.weight|layers\.\d+\..+|norm\.weight)", name)
    else:
        m = re.fullmatch(r"encoder\.(.+)", name)
    if m is None:
        raise UserError(
            f"checkpoint parameter {name!r} has no export name: not a BiEncoder checkpoint of a {family} model?"
        )
    return m.group(1)


def load_base_config(path: str) -> dict:
    """The base model's config.json as a dict, read as JSON; an export's (model_type llama_bidirec)
    becomes the Llama config it was built from."""
    from model.loading import BIDIRECTIONAL_LLAMA_TYPE, base_llama_fields  # imports transformers: not at start

    f = resolve_file(path, "config.json")
    if f is None:
        raise UserError(
            f"no config.json for the base model {path!r}: not a local folder and not in the Hugging Face "
            f"cache; download it first (huggingface-cli download {path})"
        )
    fields = json.loads(f.read_text())
    if fields.get("model_type") == BIDIRECTIONAL_LLAMA_TYPE:
        fields = {**base_llama_fields(fields), "model_type": "llama"}
    return fields


def hf_config(fields: dict):
    """The transformers config object of a config.json dict."""
    from transformers import AutoConfig

    fields = {k: v for k, v in fields.items() if k != "transformers_version"}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def model_family(config: dict) -> str:
    from model.loading import ENCODER_TYPES, LLAMA_TYPES

    if config["model_type"] in LLAMA_TYPES:
        return "llama"
    if config["model_type"] in ENCODER_TYPES:
        return "encoder"
    raise UserError(
        f"base model type {config['model_type']!r} is not supported: export_hf.py knows {LLAMA_TYPES + ENCODER_TYPES}"
    )


def build_base_model(config: dict, family: str):
    """The Hugging Face model an export holds (no head); parameters uninitialised."""
    from transformers import AutoModel, LlamaModel

    if family == "llama":
        return LlamaModel(hf_config(config))
    extra = {} if config["model_type"] == "distilbert" else {"add_pooling_layer": False}  # as model.load_encoder
    return AutoModel.from_config(hf_config(config), **extra)


def base_class(config: dict, family: str) -> str:
    """The class of the weights an export holds, e.g. BertModel (not ...ForMaskedLM): config.json's architecture."""
    with torch.device("meta"):
        return type(build_base_model(config, family)).__name__


def expected_tensors(config: dict, family: str) -> dict:
    """{export name: (shape, dtype)} of the base model's state dict, read from the model built on the
    meta device (no memory, no initialisation): the reference's names for Llama (LlamaModel's)."""
    with torch.device("meta"):
        model = build_base_model(config, family)
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def architecture_fields(config: dict) -> dict:
    """The config fields that must agree between runs that are averaged (as transformers reads them)."""
    ignore = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "model_type"}
    ignore |= {"auto_map", "pooling", "is_causal", "pad_token_id", "id2label", "label2id"}
    return {k: v for k, v in hf_config(config).to_dict().items() if k not in ignore}


# ----------------------------------------------------------------------------------------------
# Sources: a ZeRO-3 checkpoint or an exported folder, read as flat element ranges of each tensor


class ZeroCheckpoint:
    """One tag folder of ZeRO-3 files, read lazily through memory maps.

    A parameter of n elements on W ranks has the partition size p = ceil(n / W) and lies at the
    same offset o in the fp32 flat groups of every rank (its groups concatenated): rank r holds
    elements [r * p, (r + 1) * p) of the flattened parameter, the last rank zero-padded. So the
    flat range [a, b) of a parameter is read from rank a // p on, in pieces, without ever
    holding more than that range.
    """

    def __init__(self, tag_dir: Path):
        self.dir = tag_dir
        self.label = str(tag_dir)
        model_files, optim_files = {}, {}
        for f in tag_dir.iterdir():
            if m := re.fullmatch(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt", f.name):
                model_files[int(m.group(1))] = (int(m.group(2)), f)
            elif m := re.fullmatch(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt", f.name):
                optim_files[int(m.group(1))] = (int(m.group(2)), f)
        if not model_files:
            raise UserError(
                f"{tag_dir} holds no ZeRO-3 files (zero_pp_rank_*_mp_rank_00_model_states.pt): "
                "export_hf.py reads ZeRO stage 3 checkpoints of train_biencoder.py"
            )
        if any(mp for mp, _ in list(model_files.values()) + list(optim_files.values())):
            raise UserError(
                f"{tag_dir} was saved with model parallelism (mp_rank > 0), which export_hf.py does not read"
            )
        state = load_pickle(model_files[min(model_files)][1])  # rank 0's, or the first rank's here
        stage = (state.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
        if stage != 3:
            raise UserError(f"{tag_dir} is a ZeRO stage {stage} checkpoint: export_hf.py reads stage 3 only")
        self.world_size = W = int(state["dp_world_size"])
        missing = [
            f"rank {r} {kind}"
            for r in range(W)
            for kind, files in (("model_states", model_files), ("optim_states", optim_files))
            if r not in files
        ]
        if missing and (state.get("ds_config") or {}).get("checkpoint", {}).get("use_node_local_storage"):
            here = sorted(set(model_files) & set(optim_files))
            raise UserError(
                f"{tag_dir} holds the shards of ranks {here} of {W}: the run kept its checkpoints on each node's "
                'own disk ("checkpoint": {"use_node_local_storage": true}), so every node holds only its own ranks\' '
                f"shards. Copy the {tag_dir.name} folder of every node into one folder (for example "
                f"`rsync -a NODE:{tag_dir}/ {tag_dir}/` for each other node), then export it"
            )
        if missing:
            raise UserError(
                f"partial checkpoint {tag_dir}: saved by {W} ranks but {', '.join(missing)} missing. "
                "The save was interrupted or files were removed; export an earlier tag (--tag)."
            )
        if state.get("shared_params"):
            raise UserError(f"{tag_dir} has tied parameters {state['shared_params']}: not supported")
        self._model_files = [model_files[r][1] for r in range(W)]
        self._optim_files = [optim_files[r][1] for r in range(W)]

        # Layout: name -> (kind, offset in the flat groups, partition size p, numel n)
        self.shapes, self._layout = {}, {}
        offset = 0
        for group in state["param_shapes"]:
            for name, shape in group.items():
                n = math.prod(shape)
                p = math.ceil(n / W)
                self.shapes[name], self._layout[name] = torch.Size(shape), ("flat", offset, p, n)
                offset += p
        self._flat_numel = offset
        for name, shape in (state.get("frozen_param_shapes") or {}).items():
            n = math.prod(shape)
            self.shapes[name], self._layout[name] = torch.Size(shape), ("frozen", 0, math.ceil(n / W), n)
        self._buffers = {}
        for name in state.get("buffer_names") or []:
            self._buffers[name] = state["module"][name].clone()  # small, and no reference to the map
            self.shapes[name], self._layout[name] = self._buffers[name].shape, ("buffer", 0, 0, 0)
        del state

        self._flat = [None] * W  # per rank: (list of fp32 flat group tensors, their start offsets)
        self._frozen = [None] * W
        self._read_bytes = 0
        for r in range(W):  # check every rank's optimizer file now, before anything is written
            groups, starts = self._flat_groups(r)
            held = starts[-1] + groups[-1].numel() if groups else 0
            if held != self._flat_numel:
                raise UserError(
                    f"{self._optim_files[r]} holds {held} master-weight elements but the parameter "
                    f"shapes of {W} ranks need {self._flat_numel}: files from different saves?"
                )
        self.release()

        state_file = tag_dir / "train_state.json"
        if not state_file.is_file():
            raise UserError(
                f"no train_state.json in {tag_dir}: export_hf.py takes the base model (config.model) and "
                "the query prompt from it; it is written by train_biencoder.py next to DeepSpeed's files"
            )
        self.train_state = json.loads(state_file.read_text())
        self.base_model = self.train_state["config"]["model"]
        self.step = self.train_state.get("step")
        self.final_loss = self.train_state.get("final_loss")
        self.kind = "zero3"

    def _flat_groups(self, rank: int):
        if self._flat[rank] is None:
            osd = load_pickle(self._optim_files[rank])["optimizer_state_dict"]
            stage = osd.get("zero_stage")
            stage = stage.args[0] if isinstance(stage, DeepSpeedStandIn) else stage
            if int(stage) != 3 or int(osd["partition_count"]) != self.world_size:
                raise UserError(
                    f"{self._optim_files[rank]}: ZeRO stage {stage} over {osd['partition_count']} ranks, "
                    f"expected stage 3 over {self.world_size}"
                )
            groups = [g.detach() for g in osd["fp32_flat_groups"]]
            starts = [0]
            for g in groups[:-1]:
                starts.append(starts[-1] + g.numel())
            self._flat[rank] = (groups, starts)  # the rest (Adam moments) is dropped unread
        return self._flat[rank]

    def _rank_pieces(self, name: str, rank: int, a: int, b: int) -> list:
        """Elements [a, b) of this rank's partition of `name`, as views into the mapped file."""
        kind, offset, _, _ = self._layout[name]
        if kind == "frozen":  # parameters without optimizer state: fragments in the model states
            if self._frozen[rank] is None:
                self._frozen[rank] = load_pickle(self._model_files[rank])["frozen_param_fragments"]
            return [self._frozen[rank][name].reshape(-1)[a:b]]
        groups, starts = self._flat_groups(rank)
        a, b = a + offset, b + offset
        pieces = []
        for g, s in zip(groups, starts, strict=True):
            lo, hi = max(a, s), min(b, s + g.numel())
            if lo < hi:
                pieces.append(g[lo - s : hi - s])
        return pieces

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, fp32 for parameters. Often a view into the
        mapped file (no copy; the map lives as long as the view): read it, do not modify it."""
        kind, _, p, n = self._layout[name]
        if kind == "buffer":
            return self._buffers[name].reshape(-1)[start:end].clone()
        assert 0 <= start <= end <= n, (name, start, end, n)
        pieces, k = [], start
        while k < end:
            rank, local = divmod(k, p)
            take = min(end - k, p - local)
            pieces += self._rank_pieces(name, rank, local, local + take)
            k += take
        out = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(torch.float32) if pieces else torch.empty(0)
        self._read_bytes += sum(x.nbytes for x in pieces)
        if self._read_bytes > REMAP_BYTES:
            self.release()
        return out

    def release(self):
        """Drop the memory maps (and with them the pages read so far from this process's RSS)."""
        self._flat = [None] * self.world_size
        self._frozen = [None] * self.world_size
        self._read_bytes = 0


class ExportFolder:
    """An exported folder (this script's output), read through safetensors' memory maps."""

    def __init__(self, path: Path):
        self.dir = path
        self.label = str(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise UserError(f"{path} has no model.safetensors or model.safetensors.index.json")
        self._file_of, self.shapes, self.dtypes = {}, {}, {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for fname in files:
            if not (path / fname).is_file():
                raise UserError(f"{path}: shard {fname} named in the index is missing")
            with safe_open(path / fname, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._file_of[name] = fname
                    self.shapes[name] = torch.Size(sl.get_shape())
                    self.dtypes[name] = TORCH_DTYPES[sl.get_dtype()]
        if weight_map and weight_map != self._file_of:
            raise UserError(f"{index} does not match the tensors in its shards")
        self._open = {}
        self._read_bytes = 0
        info_file = path / "export_info.json"
        self.info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        self.train_state = self.info.get("train_state")
        self.base_model = str(path)
        self.step = (self.train_state or {}).get("step")
        self.final_loss = (self.train_state or {}).get("final_loss")
        self.kind = "export"

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        fname = self._file_of[name]
        if fname not in self._open:
            self._open[fname] = safe_open(self.dir / fname, framework="pt")
        sl = self._open[fname].get_slice(name)
        shape = self.shapes[name]
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        if len(shape) == 0:
            x = sl[...].reshape(-1)[start:end]
        else:
            r0, r1 = start // row, -(-end // row)
            x = sl[r0:r1].reshape(-1)[start - r0 * row : end - r0 * row]
        self._read_bytes += x.nbytes
        x = x.to(torch.float32) if x.is_floating_point() else x.clone()
        if self._read_bytes > REMAP_BYTES:
            self.release()
        return x

    def release(self):
        self._open = {}
        self._read_bytes = 0


def open_source(path: str, tag: str | None):
    """A run folder, its checkpoints/ folder, one tag folder, or an exported folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no checkpoint at {p}: the folder does not exist")
    if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return ExportFolder(p)
    if any(p.glob("zero_pp_rank_*_model_states.pt")):
        return ZeroCheckpoint(p)
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tags = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and any(d.glob("zero_pp_rank_*_model_states.pt")))
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise UserError(
                f"no checkpoint in {p}: {latest} does not exist (no complete checkpoint was saved)"
                + (f"; tags present: {', '.join(tags)} (choose one with --tag)" if tags else "")
            )
        tag = latest.read_text().strip()
    elif tag == "best":  # train_biencoder.py --keep-best: checkpoints/best names that checkpoint's tag
        best = ckpt_dir / "best"
        if not best.is_file():
            raise UserError(f"--tag best: {best} does not exist (the run was not trained with --keep-best)")
        tag = best.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise UserError(f"no checkpoint tag {tag!r} in {ckpt_dir}; tags present: {', '.join(tags) or 'none'}")
    return ZeroCheckpoint(ckpt_dir / tag)


def source_tensors(source, family: str) -> dict:
    """{export name: checkpoint name} of a source."""
    if isinstance(source, ExportFolder):
        return {name: name for name in source.shapes}
    return {export_name(name, family): name for name in source.shapes}


class Average:
    """The weighted average of the sources, tensor by tensor, range by range, in fp32."""

    def __init__(self, sources: list, weights: list[float], family: str, expected: dict):
        self.sources, self.weights = sources, weights
        self.names = []  # per source: export name -> its own name
        for s in sources:
            names = source_tensors(s, family)
            got = {k: s.shapes[v] for k, v in names.items()}
            want = {k: shape for k, (shape, _) in expected.items()}
            if got != want:
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
                raise UserError(
                    f"{s.label} does not match the base model's architecture: missing {missing[:5]}, "
                    f"unexpected {extra[:5]}, shape differs {[(k, tuple(got[k]), tuple(want[k])) for k in wrong[:5]]}"
                )
            self.names.append(names)

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        xs = (s.read(names[name], start, end) for s, names in zip(self.sources, self.names, strict=True))
        if len(self.sources) == 1:
            return next(xs)
        first = next(xs)
        if not first.is_floating_point():  # integer buffers: must agree, nothing to average
            for x, s in zip(xs, self.sources[1:], strict=True):
                if not torch.equal(x, first):
                    raise UserError(f"buffer {name} differs between {self.sources[0].label} and {s.label}")
            return first
        acc = first * self.weights[0]  # a new tensor: `first` may be a source's own memory
        for x, w in zip(xs, self.weights[1:], strict=True):
            acc.add_(x, alpha=w)
        return acc

    def release(self):
        for s in self.sources:
            s.release()


def row_chunks(shape: torch.Size):
    """[start, end) element ranges covering a tensor in whole rows of at most CHUNK_ELEMS elements."""
    n = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMS // row) * row
    return [(a, min(a + step, n)) for a in range(0, n, step)]


# ----------------------------------------------------------------------------------------------
# Writing


def plan_shards(specs: list, max_bytes: int) -> list[list]:
    """Greedy split of [(name, shape, dtype)] into shards of at most max_bytes (bigger tensors alone)."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(path: Path, specs: list, average: Average, progress) -> None:
    """A safetensors file written in one pass: the header first (all shapes are known), then each
    tensor appended range by range, so only one range is ever in memory."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            for start, end in row_chunks(shape):
                x = average.read(name, start, end).to(dtype).contiguous()
                f.write(x.view(torch.uint8).numpy() if x.numel() else b"")
                progress.update(x.nbytes)
        assert f.tell() == 8 + len(raw) + offset, "wrote a different number of bytes than the header says"
        f.flush()
        os.fsync(f.fileno())


def write_weights(out: Path, average: Average, expected: dict, dtype: torch.dtype, max_bytes: int) -> dict:
    """All tensors in the base model's order; returns {name: file}."""
    specs = [(name, shape, dtype if d.is_floating_point else d) for name, (shape, d) in expected.items()]
    shards = plan_shards(specs, max_bytes)
    total = sum(math.prod(s[1]) * s[2].itemsize for s in specs)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights") as progress:
        for fname, shard in zip(files, shards, strict=True):
            write_safetensors(out / fname, shard, average, progress)
            weight_map.update({name: fname for name, _, _ in shard})
    average.release()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


@dataclass
class Job:
    """What is exported: the sources, their weights, and the base model they share."""

    sources: list
    weights: list[float]
    config: dict  # the base model's config.json
    family: str
    expected: dict
    average: Average
    tokenizer: object  # the base model's, for the checks

    @property
    def train_state(self) -> dict:
        return self.sources[0].train_state or {}

    @property
    def prompts(self) -> dict:
        return sentence_transformers_prompts(self.train_state.get("prompts") or {})

    @property
    def query_prompt(self) -> str:
        return self.prompts.get("query", "")

    @property
    def document_prompt(self) -> str:
        return self.prompts.get("document", "")

    @property
    def tokenizer_path(self) -> str:
        return self.sources[0].base_model

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.expected.values())


def prepare(paths: list[str], tag: str | None, weights: list[float] | None) -> Job:
    from transformers import AutoTokenizer

    from model import check_vocab_covers_tokenizer

    sources = [open_source(p, tag) for p in paths]
    weights = weights or [1.0] * len(sources)
    weights = [w / sum(weights) for w in weights]
    config = load_base_config(sources[0].base_model)
    family = model_family(config)
    for s in sources[1:]:
        a, b = architecture_fields(config), architecture_fields(load_base_config(s.base_model))
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise UserError(
                f"{s.label} was trained from a different base model than {sources[0].label} (config fields {diff})"
            )
        if (s.train_state or {}).get("prompts") != (sources[0].train_state or {}).get("prompts"):
            raise UserError(f"{s.label} was trained with other prompts than {sources[0].label}: not averaged")
    # No remote code: an exported source's config.json names a model_type transformers does not know,
    # and its tokenizer files need none (without the flag, AutoTokenizer would ask).
    tokenizer = AutoTokenizer.from_pretrained(sources[0].base_model, trust_remote_code=False)
    check_vocab_covers_tokenizer(len(tokenizer), config["vocab_size"], sources[0].base_model)
    expected = expected_tensors(config, family)
    average = Average(sources, weights, family, expected)
    return Job(sources, weights, config, family, expected, average, tokenizer)


# ----------------------------------------------------------------------------------------------
# Verification


def check_tensors(out: Path, job: Job, dtype: torch.dtype) -> None:
    """Every tensor of the export equals the checkpoint's (averaged) fp32 tensor after the cast."""
    export = ExportFolder(out)
    want = {name: (shape, dtype if d.is_floating_point else d) for name, (shape, d) in job.expected.items()}
    got = {name: (export.shapes[name], export.dtypes[name]) for name in export.shapes}
    if got != want:
        raise UserError(
            f"{out}: tensor names, shapes or dtypes differ from the base model's: {sorted(set(got) ^ set(want))[:5]}"
        )
    total = sum(math.prod(shape) * d.itemsize for shape, d in want.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking tensors") as progress:
        for name, (shape, d) in want.items():
            for start, end in row_chunks(shape):
                x = job.average.read(name, start, end).to(d)
                y = export.read(name, start, end).to(d)
                if not torch.equal(x, y):
                    raise UserError(f"{out}: tensor {name} differs from the checkpoint in elements [{start}, {end})")
                progress.update(x.nbytes)
    export.release()
    job.average.release()
    print(f"tensor check: all {len(want)} tensors equal the checkpoint's after the cast to {dtype}")


def reference_embeddings(job: Job, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe embeddings of the checkpoint's own model: BiEncoder on the fp32 (averaged) weights."""
    from transformers.initialization import no_init_weights

    from model import BiEncoder

    with no_init_weights(), torch.device(device):
        encoder = build_base_model(job.config, job.family)
    for name, t in encoder.state_dict().items():
        flat = t.view(-1)
        for start, end in row_chunks(t.shape):
            flat[start:end] = job.average.read(name, start, end)
    job.average.release()
    enc = BiEncoder(encoder, job.tokenizer)
    q = enc.encode(PROBE_QUERIES, prompt=job.query_prompt)
    d = enc.encode(PROBE_DOCUMENTS, prompt=job.document_prompt)
    return q, d


def check_embeddings(out: Path, job: Job, dtype: str, device: str) -> None:
    """sentence-transformers on the export embeds the probes as the checkpoint's model does."""
    import psutil

    need = job.num_params * 4 + 2 * 2**30  # the fp32 reference model, then the export (smaller)
    available = psutil.virtual_memory().available
    if device == "cpu" and need > available:
        print(
            f"WARNING: embedding check skipped: it needs about {need / 2**30:.0f} GiB of memory, "
            f"{available / 2**30:.0f} GiB are available. The tensor check passed; run "
            f"`python export_hf.py --verify-only {out}` on a bigger machine or with --device cuda."
        )
        return
    from sentence_transformers import SentenceTransformer

    ref_q, ref_d = reference_embeddings(job, device)
    gc.collect()
    st = SentenceTransformer(str(out), device=device, trust_remote_code=True)
    q = st.encode_query(PROBE_QUERIES, convert_to_tensor=True).float().cpu()
    d = st.encode_document(PROBE_DOCUMENTS, convert_to_tensor=True).float().cpu()
    del st
    err = torch.cat([(q - ref_q).norm(dim=-1), (d - ref_d).norm(dim=-1)]).max().item()
    tol = TOLERANCE[dtype]
    cos = 1 - err**2 / 2
    print(f"embedding check: max ||export - checkpoint|| = {err:.2e} (tolerance {tol:g}), cosine >= {cos:.6f}")
    if not err <= tol:
        raise UserError(
            f"{out}: sentence-transformers embeddings differ from the checkpoint's model by {err:.2e} > {tol:g}: "
            "the export is broken (attention, prompts, pooling or tokenizer)"
        )


# ----------------------------------------------------------------------------------------------
# Entry points


def export(cfg: ExportConfig) -> Path:
    paths = cfg.checkpoint or [cfg.run]
    job = prepare(paths, cfg.tag, cfg.weights)
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    elif len(job.sources) == 1 and isinstance(job.sources[0], ZeroCheckpoint):
        out = job.sources[0].dir.parent.parent / "export"  # <run>/checkpoints/<tag> -> <run>/export
    else:
        raise UserError("give --output-dir DIR when averaging checkpoints or re-exporting an export")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it, or choose another --output-dir")
    for s, w in zip(job.sources, job.weights, strict=True):
        print(f"source: {s.label} (step {s.step}, final loss {s.final_loss}, weight {w:.4g})")
    print(f"prompts: {json.dumps(job.prompts)[:300]}")
    if job.prompts and ("query" not in job.prompts or "document" not in job.prompts):
        print("note: the data subsets used different prompts, so encode_query / encode_document apply none by")
        print("default; pass prompt_name='<subset>-query' / '<subset>-document' (see the model card)")
    print(f"base model: {job.tokenizer_path} ({job.config['model_type']}, {job.num_params:,} parameters) -> {out}")

    try:
        # Written in <out>.tmp-<pid>, checked, then renamed (an existing folder, --overwrite, is swapped
        # only now that the new one is complete and checked); on any error the temp folder is removed.
        with atomic_dir(out) as tmp:
            architecture = base_class(job.config, job.family)
            write_model_files(tmp, job.config, job.family, architecture, job.tokenizer_path, cfg.dtype)
            max_bytes = parse_size(cfg.max_shard_size)
            weight_map = write_weights(tmp, job.average, job.expected, DTYPES[cfg.dtype], max_bytes)
            length = export_max_seq_length(
                job.train_state.get("max_len"), job.config["model_type"], job.config.get("max_position_embeddings")
            )
            write_sentence_transformers(tmp, job.config["hidden_size"], job.prompts, length)
            write_info_and_card(
                tmp,
                job.sources,
                job.weights,
                job.config,
                job.family,
                job.num_params,
                job.prompts,
                cfg.dtype,
                weight_map,
            )
            if cfg.verify:
                check_tensors(tmp, job, DTYPES[cfg.dtype])
                check_embeddings(tmp, job, cfg.dtype, resolve_device(cfg.device))
    except OSError as e:  # a full disk, a read-only folder: something the user fixes
        raise UserError(f"writing {out} failed ({e}); the partial folder was removed, {out} is unchanged") from e
    return out


def verify_only(cfg: ExportConfig) -> None:
    out = Path(cfg.verify_only)
    info_file = out / "export_info.json"
    if not info_file.is_file():
        raise UserError(f"{out} has no export_info.json: not a folder written by export_hf.py")
    info = json.loads(info_file.read_text())
    paths = cfg.checkpoint or [s["path"] for s in info["sources"]]
    weights = cfg.weights or (None if cfg.checkpoint else [s["weight"] for s in info["sources"]])
    job = prepare(paths, cfg.tag, weights)
    check_tensors(out, job, DTYPES[info["dtype"]])
    check_embeddings(out, job, info["dtype"], resolve_device(cfg.device))


def main(argv=None) -> None:
    """Errors a user can fix raise UserError; run_cli prints them without a traceback (exit status 2)."""
    cfg = parse_args(argv)
    print("export_hf.py", json.dumps(asdict(cfg)))
    try:
        if cfg.verify_only:
            verify_only(cfg)
            print(f"OK: {cfg.verify_only} matches its checkpoints")
        else:
            out = export(cfg)
            print(f"OK: wrote {out}")
    except OSError as e:  # an unreadable checkpoint or export file: the path is in the message
        raise UserError(str(e)) from e


if __name__ == "__main__":
    sys.exit(run_cli(main))
