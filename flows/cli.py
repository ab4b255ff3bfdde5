"""The `tinyldm` command: every thing a person can do, as a verb. Wiring only."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Embedded defaults: no telemetry, a patient temporary Prefect server.
for _k, _v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from components.contracts import STAGES, UserError  # noqa: E402

# stage name -> "module:function"; each function takes Params and returns a metrics dict
STAGE_FUNCS = {
    "scrape": "components.scrape:scrape",
    "ocr": "components.ocr:ocr",
    "validate": "components.validate:validate",
    "labels": "components.labels:labels",
    "vae": "components.vae:vae",
    "latents": "components.latents:latents",
    "unet": "components.unet:unet",
    "evaluate": "components.evaluate:evaluate",
    "register": "components.registry:register",
}
assert list(STAGE_FUNCS) == STAGES


def _params(args):
    from components.config import load_params

    return load_params(args.params, args.set)


def cmd_stage(args) -> int:
    from components.contracts import write_metrics

    if args.name not in STAGE_FUNCS:
        raise UserError(f"unknown stage {args.name!r}; stages: {', '.join(STAGES)}")
    params = _params(args)
    module, func = STAGE_FUNCS[args.name].split(":")
    metrics = getattr(importlib.import_module(module), func)(params)
    write_metrics(args.name, metrics)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in metrics.items() if not isinstance(v, dict | list))
    print(f"{args.name}: {shown}")
    return 0


def cmd_run(args) -> int:
    from components.config import write_overrides

    _params(args)  # validate before anything starts
    if args.set:
        write_overrides(args.params, args.set)
        print(f"{args.params}: set {', '.join(args.set)} (recorded so dvc.lock matches)")
    from flows.pipeline import run_pipeline

    run_pipeline(force=args.force)
    return 0


def cmd_generate(args) -> int:
    from components.registry import generate_png, resolve_model_uri

    params = _params(args)
    uri = resolve_model_uri(args.model, params)
    png = generate_png(uri, args.prompt, seed=args.seed, steps=args.steps,
                       guidance=args.guidance, width=args.width, height=args.height)
    from components.contracts import atomic_path

    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png)
    print(f"wrote {out} ({args.width}x{args.height}) from {uri}")
    return 0


def cmd_params(args) -> int:
    import yaml

    print(yaml.safe_dump(_params(args).model_dump(mode="json", by_alias=True),
                         sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyldm", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (dotted; YAML value); repeatable")
    common.add_argument("--params", default="params.yaml", help="params file")
    sub = p.add_subparsers(dest="verb", required=True)

    r = sub.add_parser("run", parents=[common], help="run the whole pipeline (Prefect flow "
                       "over the dvc.yaml DAG); --set values are written to params.yaml")
    r.add_argument("--force", action="store_true", help="re-run every stage")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", parents=[common], help="run one stage (what dvc.yaml calls)")
    s.add_argument("name", help=", ".join(STAGES))
    s.set_defaults(func=cmd_stage)

    g = sub.add_parser("generate", parents=[common], help="generate an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("--out", required=True, help="PNG file to write")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: params)")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--width", type=int, default=256)
    g.add_argument("--height", type=int, default=256)
    g.add_argument("--model", default=None,
                   help="model URI (default models:/<register.model_name>@champion)")
    g.set_defaults(func=cmd_generate)

    pp = sub.add_parser("params", parents=[common], help="print the validated parameters")
    pp.set_defaults(func=cmd_params)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tinyldm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinyldm: interrupted; finished stages are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
