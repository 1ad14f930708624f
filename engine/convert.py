"""Round trip between engine checkpoints and Hugging Face `LlamaForCausalLM` directories (safetensors only).

    python -m engine.convert hf-to-engine HF_DIR OUT_DIR
    python -m engine.convert engine-to-hf CKPT_DIR OUT_DIR

Both models use the same half-split RoPE convention, so every tensor is copied as is (q/k need no
permutation); only names and the config change. A converted engine checkpoint holds weights only and says so
with meta "source": "hf".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.models.llama import ModelConfig
from engine.training import checkpoint as ckpt

# The one name table, used in both directions: (Hugging Face name, engine name); {i} is the layer index.
LAYER_NAMES = [
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.w_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.w_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.w_down.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
]
GLOBAL_NAMES = [
    ("model.embed_tokens.weight", "embedding.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "head.weight"),  # absent when the embeddings are tied
]
VOCAB_ROWS = {"embedding.weight", "head.weight"}  # may carry tensor-parallel vocabulary padding
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older exports saved; recomputed from rope_theta
BYTE_TOKENS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}  # engine.data byte tokenizer


class ConvertError(ValueError):
    pass


def name_table(cfg: ModelConfig) -> list[tuple[str, str]]:
    """Every (HF name, engine name) pair of a model with this config."""
    names = [(hf.format(i=i), ours.format(i=i)) for i in range(cfg.num_layers) for hf, ours in LAYER_NAMES]
    names += GLOBAL_NAMES
    if cfg.tie_embeddings:
        names = [(hf, ours) for hf, ours in names if ours != "head.weight"]
    return names


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---- Hugging Face -> engine ---------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConvertError(f"{path} is missing; HF_DIR must be a Hugging Face model directory") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{path} is not valid JSON ({exc})") from None


def config_from_hf(hf: dict) -> ModelConfig:
    """Maps a LlamaConfig dict to ModelConfig; refuses the variants our model cannot represent."""
    if hf.get("model_type") != "llama":
        raise ConvertError(f"config.json: model_type is {hf.get('model_type')!r}; only 'llama' "
                           "(LlamaForCausalLM) checkpoints can be converted")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConvertError(f"config.json: {field} is true; the engine's LLaMA has no bias terms")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"config.json: hidden_act is {hf['hidden_act']!r}; the engine only implements "
                           "SwiGLU ('silu')")
    if hf.get("rope_scaling") is not None:
        raise ConvertError(f"config.json: rope_scaling is {hf['rope_scaling']!r}; the engine implements plain "
                           "RoPE only (rope_scaling must be null)")
    # transformers >= 5 keeps rope_theta (and the scaling type) in rope_parameters.
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConvertError(f"config.json: rope_parameters.rope_type is {rope['rope_type']!r}; the engine "
                           "implements plain RoPE only ('default')")
    try:
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        cfg = ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=hf["intermediate_size"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
            seq_length=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), dropout=0.0,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)))
    except KeyError as exc:
        raise ConvertError(f"config.json: required field {exc.args[0]!r} is missing") from None
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConvertError(f"config.json: head_dim {hf['head_dim']} differs from hidden_size / "
                           f"num_attention_heads = {hidden // heads}; the engine derives head_dim from them")
    errors = cfg.validate()
    if errors:
        raise ConvertError("config.json: unsupported model shape: "
                           + "; ".join(f"{field} {msg}" for field, msg in errors))
    return cfg


def _hf_files(hf_dir: str) -> list[str]:
    """The safetensors files of an HF directory, single-file or sharded."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        return sorted(set(_read_json(index)["weight_map"].values()))
    if os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        return ["model.safetensors"]
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in os.listdir(hf_dir)):
        raise ConvertError(f"{hf_dir} holds pytorch_model*.bin (pickle) weights only; re-save it with "
                           "save_pretrained(..., safe_serialization=True) to get model.safetensors")
    raise ConvertError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")


def _expected_shapes(cfg: ModelConfig) -> dict[str, list[int]]:
    from engine.models.llama import Llama

    with torch.device("meta"):
        return {name: list(p.shape) for name, p in Llama(cfg).named_parameters()}


def hf_to_engine(hf_dir: str, out_dir: str) -> str:
    """Converts a Hugging Face LLaMA directory into an engine checkpoint at out_dir/step_00000000; returns it.
    Each HF shard becomes one file of the step directory, so memory holds one shard at a time."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir} is not a directory")
    cfg = config_from_hf(_read_json(os.path.join(hf_dir, "config.json")))
    files = [os.path.join(hf_dir, f) for f in _hf_files(hf_dir)]
    if ckpt.list_checkpoints(out_dir):
        raise ConvertError(f"{out_dir} already holds checkpoints; choose an empty output directory")
    to_ours = dict(name_table(cfg))
    skip = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied exports still save it
    shapes = _expected_shapes(cfg)

    # Check names and shapes from the headers before writing anything.
    seen = set()
    for path in files:
        if not os.path.isfile(path):
            raise ConvertError(f"{path} is missing (named by model.safetensors.index.json)")
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if key.endswith(IGNORED_HF_SUFFIXES) or key in skip:
                    continue
                if key not in to_ours:
                    raise ConvertError(f"{path}: tensor {key!r} has no counterpart in the engine's LLaMA "
                                       "(unsupported architecture variant)")
                shape = f.get_slice(key).get_shape()
                if list(shape) != shapes[to_ours[key]]:
                    raise ConvertError(f"{path}: {key} has shape {list(shape)}, but config.json implies "
                                       f"{shapes[to_ours[key]]}")
                seen.add(key)
    missing = sorted(set(to_ours) - seen)
    if missing:
        raise ConvertError(f"{hf_dir}: tensors missing from the checkpoint: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    tmp = ckpt.prepare_tmp_dir(out_dir, 0)
    written = {}
    for n, path in enumerate(files):
        with safe_open(path, "pt") as f:
            tensors = {f"model/{to_ours[key]}": f.get_tensor(key) for key in f.keys() if key in seen}
        name, digest = ckpt.write_rank_file(tmp, n, tensors, {})
        written[name] = digest
        _log(f"[{n + 1}/{len(files)}] {os.path.basename(path)}: {len(tensors)} tensors")
    meta = {"source": "hf", "model_config": dataclasses.asdict(cfg),
            "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero": 0, "world": 1},
            # weights only: no trainer state, optimizer, scaler, RNG or run config
            "state": None, "config": None, "optimizer": None, "scaler": None}
    step_dir = ckpt.finalize(out_dir, 0, meta, written, None)
    _log(f"wrote {step_dir}")
    return step_dir


# ---- engine -> Hugging Face ---------------------------------------------------------------------------------

def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    tokens = BYTE_TOKENS if cfg.vocab_size == 259 else dict.fromkeys(BYTE_TOKENS)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_length, "rms_norm_eps": cfg.norm_eps,
        # both spellings: transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name, **tokens,
    }


def engine_to_hf(ckpt_dir: str, out_dir: str) -> str:
    """Exports any engine checkpoint (a save dir with `latest`, or a step dir), whatever layout saved it, as a
    Hugging Face LlamaForCausalLM directory (config.json + model.safetensors); returns out_dir."""
    if not os.path.isdir(ckpt_dir):
        raise ConvertError(f"{ckpt_dir} is not a directory")
    step_dir = ckpt.resolve(ckpt_dir)
    if step_dir is None:
        raise ConvertError(f"{ckpt_dir}: no engine checkpoint here (neither meta.json nor a 'latest' file)")
    reader = ckpt.CheckpointReader(step_dir)
    cfg = ModelConfig(**reader.meta["model_config"])
    table = name_table(cfg)
    tensors = {}
    for n, (hf, ours) in enumerate(table, 1):
        t = reader.read(f"model/{ours}")
        if ours in VOCAB_ROWS:
            t = t[:cfg.vocab_size]  # drop tensor-parallel vocabulary padding
        tensors[hf] = t.contiguous()
        if n % 50 == 0 or n == len(table):
            _log(f"read {n}/{len(table)} tensors")
    os.makedirs(out_dir, exist_ok=True)
    dtype = tensors["model.embed_tokens.weight"].dtype
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config_to_hf(cfg, dtype), fh, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _log(f"wrote {out_dir}/model.safetensors and config.json from {step_dir}")
    return out_dir


# ---- command line -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-engine", help="Hugging Face LlamaForCausalLM directory -> engine checkpoint")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and model*.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="engine checkpoint directory to create (step_00000000)")
    p = sub.add_parser("engine-to-hf", help="engine checkpoint -> Hugging Face LlamaForCausalLM directory")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a --save directory (uses `latest`) or a step_* dir")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for config.json and model.safetensors")
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-engine":
            hf_to_engine(args.hf_dir, args.out_dir)
        else:
            engine_to_hf(args.ckpt_dir, args.out_dir)
    except (ConvertError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
