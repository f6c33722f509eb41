"""Serve a model over the OpenAI API (chat + completions, SSE streaming) with a chat page at /.

    nanoseek serve --model runs/demo/final                      # http://127.0.0.1:8000
    nanoseek serve --model DIR --port 8080 --api-key sk-local --max-batch 64 --speculative

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "final", "messages": [{"role": "user", "content": "2+2?"}]}'

Any OpenAI client works: base_url="http://127.0.0.1:8000/v1", model = the directory's name (or
--name). The <think> part comes back in `reasoning_content`, as from DeepSeek's API. It binds
127.0.0.1 unless told otherwise; give --api-key before binding anything public.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from nanoseek.common import pick_device, pick_dtype


def check_bind(host: str, port: int) -> None:
    """The address can be bound now (as uvicorn will, with SO_REUSEADDR), before the model loads: a port in
    use or a host that does not resolve is one line, not uvicorn's log lines after a banner."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise SystemExit(f"nanoseek serve: --host {host!r} does not resolve ({e})") from None
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise SystemExit(f"nanoseek serve: cannot listen on {host}:{port} ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--name", default=None, help="model id clients ask for (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (continuous batch)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (greedy and seeded requests: the same outputs as without it; "
                        "unseeded sampling: the same distribution)")
    p.add_argument("--device", default=None, help="cuda if present, else cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)

    # --- checks (before anything heavy is imported or loaded)
    model_dir = Path(args.model)
    for need in ("config.json", "tokenizer.json"):
        if not (model_dir / need).is_file():
            raise SystemExit(f"nanoseek serve: {model_dir / need} not found; --model must be a model directory "
                             "with config.json, safetensors weights and tokenizer.json")
    if args.max_batch < 1:
        raise SystemExit(f"nanoseek serve: --max-batch must be >= 1, got {args.max_batch}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise SystemExit(f"nanoseek serve: --max-seq-len must be >= 2, got {args.max_seq_len}")
    if not 0 < args.port < 65536:
        raise SystemExit(f"nanoseek serve: --port must be in 1..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise SystemExit("nanoseek serve: --api-key is empty, which would serve without authentication; give a key "
                         "or leave the flag out")
    if not args.host.strip():
        raise SystemExit("nanoseek serve: --host is empty (it would bind every address); give one, e.g. 127.0.0.1")
    check_bind(args.host, args.port)

    import uvicorn

    from nanoseek.infer.engine import Engine
    from nanoseek.model import Transformer
    from nanoseek.serve.app import create_app
    from nanoseek.tokenizer import Tokenizer

    # --- load
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device).eval()  # engine: inference_mode
        tokenizer = Tokenizer.from_dir(model_dir)
    except (FileNotFoundError, ValueError) as e:      # CheckpointError is a ValueError
        raise SystemExit(f"nanoseek serve: cannot load a model from {model_dir}: {e}") from None
    limit = model.config.max_position_embeddings
    if args.max_seq_len is not None and args.max_seq_len > limit:
        raise SystemExit(f"nanoseek serve: --max-seq-len {args.max_seq_len} is beyond the model's "
                         f"max_position_embeddings ({limit}), positions it was never built for")
    name = args.name or model_dir.resolve().name

    # --- engine
    try:
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                        speculative=args.speculative)
    except ValueError as e:
        raise SystemExit(f"nanoseek serve: {e}") from None
    engine.start()

    # --- serve
    app = create_app(engine, tokenizer, name, api_key=args.api_key)
    print(f"nanoseek serve: {name} on {device} ({dtype}), context {engine.max_seq_len}, batch {args.max_batch}"
          f"{', MTP speculation' if args.speculative else ''}; chat page at http://{args.host}:{args.port}/")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
