"""Export a nanoseek / Hugging Face DeepSeek directory to GGUF for llama.cpp (architecture deepseek2).

    nanoseek export --model runs/demo/final --format gguf --out demo.gguf
    nanoseek export --model runs/demo/final --format gguf --out demo-q8.gguf --dtype q8_0

The directory needs config.json, the safetensors weights and tokenizer.json (plus tokenizer_config.json
for special tokens and the chat template). MTP modules are left out: llama.cpp does not run them.
Then: `llama-cli -m demo.gguf` or `llama_cpp.Llama(model_path="demo.gguf")`.
"""

from __future__ import annotations

import argparse

import torch

from nanoseek.common import pick_device

try:        # the gguf package is the `export` extra (make test installs it, make demo does not)
    from nanoseek.export.gguf import FILE_TYPES, export_gguf
except ModuleNotFoundError as e:
    if e.name != "gguf":
        raise
    FILE_TYPES, export_gguf = None, None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    p.add_argument("--dtype", default="f32", choices=sorted(FILE_TYPES or ("f32", "f16", "bf16", "q8_0")),
                   help="storage type of the weight matrices (norms and the router stay f32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file (never the model's own files)")
    p.add_argument("--device", default="cpu", help="conversion runs on the CPU; accepted for uniformity")
    args = p.parse_args(argv)

    # --- checks
    if export_gguf is None:
        raise SystemExit("nanoseek export: needs the gguf package: .venv/bin/pip install -e '.[export]'")
    if pick_device(args.device).type != "cpu":
        print(f"note: --device {args.device} ignored, the conversion runs on the CPU")

    # --- export
    try:
        with torch.no_grad():   # scoped: tests call main() in-process and must get grad mode back
            export_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.force)
    except (ValueError, OSError) as e:
        raise SystemExit(f"nanoseek export: {e}") from None
