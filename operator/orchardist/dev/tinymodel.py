"""A tiny random Llama checkpoint built offline, so real engines can be started in tests and demos.

The directory looks like any Hugging Face safetensors checkpoint (config.json, tokenizer.json with a
chat template, model.safetensors under HF tensor names), so mlx_lm.server and vLLM load it unchanged.
Its answers are noise: it exists to exercise loading, serving and memory accounting, not quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 64
VOCAB = 1024
MAX_POSITIONS = 2048
SPECIAL = ("<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
# Stdlib modules whose source trains the tokenizer: plain English and code, present in every CPython.
_CORPUS_MODULES = ("textwrap", "string", "json.decoder", "argparse", "fractions", "difflib")


def _corpus() -> list[str]:
    import importlib.util

    texts: list[str] = []
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            texts.extend(Path(spec.origin).read_text(encoding="utf-8").splitlines())
    return texts


def _tokenizer(dest: Path) -> int:
    """Train a byte-level BPE on stdlib text; write tokenizer files; return the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(dest / "tokenizer.json"))
    bos, eos, pad = SPECIAL
    _write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(dest / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos, "pad_token": pad})
    return int(tok.get_vocab_size())


def _weights(vocab: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def dense(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    ones = np.ones(HIDDEN, dtype=np.float32)
    tensors: dict[str, Any] = {"model.embed_tokens.weight": dense(vocab, HIDDEN), "model.norm.weight": ones}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": dense(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": dense(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": dense(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": dense(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": dense(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": dense(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": dense(HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": ones.copy(),
            p + "post_attention_layernorm.weight": ones.copy(),
        }
    return tensors


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def build(dest: Path, *, seed: int = 0) -> Path:
    """Write the tiny checkpoint into ``dest`` (created if needed) and return ``dest``."""
    from safetensors.numpy import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(dest)
    bos, eos, pad = range(3)  # the special tokens are trained first, so they hold ids 0..2
    save_file(_weights(vocab, seed), str(dest / "model.safetensors"), metadata={"format": "pt"})
    _write_json(
        dest / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "vocab_size": vocab,
            "max_position_embeddings": MAX_POSITIONS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        },
    )
    _write_json(
        dest / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    )
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m orchardist.dev.tinymodel DEST", file=sys.stderr)
        return 2
    print(build(Path(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
