"""``residtap`` on the command line: ``verify`` and ``env`` here; ``extract`` adds itself (extract.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import traceback

import torch

from .arch import UnsupportedStreamError, max_positions
from .backend import BackendUnavailableError
from .capture import CaptureError
from .selection import DTYPES, resolve_device, resolve_dtype

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a process a closed pipe ended
EXIT_UNEXPECTED = 3  # 0 done (verify: exact), 1 verify: not exact, 2 bad arguments or model


def _load_model(name: str | None, dtype, device: str, seed: int):
    from .models import load_pretrained_as, random_gpt2

    if name is None:
        return random_gpt2("gpt2-small", seed=seed, dtype=dtype, device=device), "gpt2-small (random init)"
    if name.startswith("random:"):
        raise ValueError(f"--model {name!r}: verify does not take extract's random: specs; omit --model for "
                         "the built-in random GPT-2-small (--seed sets its weights), or save a model with "
                         "save_pretrained and pass its directory")
    model = load_pretrained_as(name, "--model", "; omit --model for the built-in random GPT-2-small.",
                               dtype=dtype)
    return model.to(device).eval(), name


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """--blocks / --final-norm: for a model whose type residtap's FAMILIES table lacks."""
    p.add_argument("--blocks", default=None,
                   help="the decoder blocks' module path in the model, e.g. model.layers (default: residtap's "
                        "table for the model type)")
    p.add_argument("--final-norm", default=None,
                   help="the final norm's module path, e.g. model.norm, or none (default: the table's)")


def layout_kwargs(args) -> dict:
    """blocks= / final_norm= for the Python call: only those given (--final-norm none: no final norm)."""
    kw = {}
    if args.blocks is not None:
        kw["blocks"] = args.blocks
    if args.final_norm is not None:
        kw["final_norm"] = None if args.final_norm.lower() == "none" else args.final_norm
    return kw


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def cmd_verify(args) -> int:
    from .models import check_seed, random_input_ids
    from .verify import to_json, verify

    check_seed(args.seed, "--seed")
    dtype = resolve_dtype(args.dtype, "--dtype") or torch.float32
    model, label = _load_model(args.model, dtype, resolve_device(args.device, "--device"), args.seed)
    max_pos = max_positions(model)
    if max_pos is not None and args.seq > max_pos:
        raise ValueError(f"--seq: expected at most {max_pos} (the model's positions), got {args.seq}")
    ids = random_input_ids(model, args.batch, args.seq, seed=args.seed)
    report = verify(model, ids, backend=args.backend, **layout_kwargs(args))
    if args.json:
        print(to_json({**report.to_dict(), "model": label}))
    else:
        print(str(report).replace(report.model, label, 1))
    return 0 if report.ok else 1


def env_report() -> dict:
    import transformers

    from . import __version__
    from ._build import load_extension
    from .backend import decide, requested_backend

    info = load_extension()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())]
                         if torch.cuda.is_available() else [])
    try:
        requested = requested_backend(None)  # RESIDTAP_BACKEND, else "auto"
    except ValueError as e:
        requested = f"invalid: {e}"

    def backend_on(device: str) -> str:  # what a capture there would run (backend.decide)
        if requested.startswith("invalid"):
            return requested
        name, why = decide(requested, torch.device(device))
        if name == "compiled":
            return "compiled"
        if name == "unavailable":
            return f"error: {why}"
        return "reference (RESIDTAP_BACKEND=reference)" if why == "requested" else f"reference ({why})"

    return {
        "residtap": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "extension_loaded": info.loaded,
        "extension_error": info.error,
        "extension_devices": (["cpu"] + (["cuda"] if info.with_cuda else [])) if info.loaded else [],
        "cuda_archs_built": list(info.cuda_archs),
        "cuda_left_out_because": info.cuda_skipped_because,
        "build_dir": info.build_dir,
        "backend_requested": requested,
        "backend_by_device": {d: backend_on(d) for d in devices},
    }


def cmd_env(args) -> int:
    rep = env_report()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        width = max(map(len, rep))
        for k, v in rep.items():
            print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="residtap", description="Exact residual-stream capture for HF models.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="hook outputs vs hidden_states, layer by layer, and the final norm "
                                      "re-applied to them")
    v.add_argument("--model", default=None,
                   help="HF name or local path, loaded offline (default: GPT-2-small with seeded random "
                        "weights, no download; extract's random:SIZE specs are not taken here)")
    v.add_argument("--dtype", default="float32", choices=sorted(DTYPES), metavar="DTYPE",
                   help="float32 (default), bfloat16 or float16")
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where available, else cpu")
    v.add_argument("--batch", type=_positive_int, default=2, help="rows of token ids (default 2)")
    v.add_argument("--seq", type=_positive_int, default=32, help="tokens per row (default 32)")
    v.add_argument("--seed", type=int, default=0, help="seed of the token ids and the random model (default 0)")
    v.add_argument("--backend", default=None, choices=["auto", "compiled", "reference"],
                   help="default: auto (the compiled op where it runs, else the reference; RESIDTAP_BACKEND)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    add_layout_args(v)
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("env", help="versions, the compiled extension, and which backend runs where")
    e.add_argument("--json", action="store_true", help="print the facts as JSON")
    e.set_defaults(func=cmd_env)

    from .extract import register_cli  # noqa: F401  (importing the module adds "extract" below)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


# Other modules add subcommands here (each a function taking the subparsers object).
_EXTRA_COMMANDS: list = []


def say(line: str) -> None:
    """``line`` on stderr in one write. print() writes the text and then its newline, and stderr, not a
    terminal, passes each write straight on: under torchrun another rank's line then lands between the
    two ("... resume.residtap extract: rank 0: ..."). One write of a line, shorter than a pipe's atomic
    size, comes out whole."""
    sys.stderr.write(line + "\n")


def _ctrl_c_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that ``e`` was raised from or while handling, if any: a Ctrl-C that a
    library turned into an error of its own (a Ctrl-C during one of transformers' lazy imports comes
    out as its ModuleNotFoundError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# Options whose values may start with a minus sign: argparse takes "-3,-1" or "-4:" for an option
# and says "expected one argument"; such a value is joined to its option ("--layers=-3,-1").
_SIGNED_VALUES = ("--layers", "--positions")
_SIGNED = re.compile(r"-\d[\d,:-]*|-:[\d:-]*")


def _join_signed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for tok in argv:
        if out and out[-1] in _SIGNED_VALUES and _SIGNED.fullmatch(tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_join_signed_values(argv))
    try:
        return args.func(args)
    # bad arguments (a backend this machine lacks among them), a model residtap cannot tap: one
    # clear line
    except (ValueError, UnsupportedStreamError, BackendUnavailableError, CaptureError) as e:
        say(f"residtap {args.command}: error: {e}")
        return 2
    except BrokenPipeError:
        # The reader of stdout went away (`residtap env --json | head`): stop quietly, as a process
        # SIGPIPE ends would, with nothing left to flush into the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 — anything else is unexpected: its traceback, and a status of
        # its own, so that verify's 1 ("not exact") always means what it says
        ctrl_c = _ctrl_c_behind(e)
        if ctrl_c is not None:
            raise ctrl_c  # Python's way out of a Ctrl-C (its traceback, the death by SIGINT), not status 3
        traceback.print_exc()
        say(f"residtap {args.command}: unexpected error (above); exit status {EXIT_UNEXPECTED}")
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
