"""The `tinyldm` command: every thing a person can do, as a verb. Wiring only."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

# Embedded defaults: no telemetry, a patient temporary Prefect server.
for _k, _v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
               "TOKENIZERS_PARALLELISM": "false",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
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
STAGE_ERRORS = Path(".cache") / "stage-errors"  # <stage>.txt: the last failed run's one line


def venv_on_path() -> None:
    """Child commands (dvc's `tinyldm stage`, mlflow's uvicorn) must find this environment's
    scripts, also when the venv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _params(args):
    from components.config import load_params

    return load_params(args.params, args.set)


def cmd_stage(args) -> int:
    from components.contracts import write_metrics

    if args.name not in STAGE_FUNCS:
        raise UserError(f"unknown stage {args.name!r}; stages: {', '.join(STAGES)}")
    params = _params(args)
    section = getattr(params, args.name, None)
    if getattr(section, "processes", 1) > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args, section.processes)
    module, func = STAGE_FUNCS[args.name].split(":")
    from flows.fanout import stage_kwargs  # per-image stages: the task runner of params.scale

    stage = getattr(importlib.import_module(module), func)
    metrics = stage(params, **stage_kwargs(args.name, params))
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    write_metrics(args.name, metrics)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in metrics.items() if not isinstance(v, dict | list))
    print(f"{args.name}: {shown}")
    return 0


def _torchrun(args, processes: int) -> int:
    """The same stage in `processes` data-parallel processes on this machine (torchrun,
    standalone rendezvous); each runs this command again, with WORLD_SIZE set."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", "-m", "flows.cli", "stage", args.name,
           "--params", str(args.params)] + [f"--set={x}" for x in args.set or []]
    print(f"{args.name}: {processes} data-parallel processes (torchrun)")
    return subprocess.call(cmd)


def _params_recorded(args):
    """Validated params, with --set values written to the file first (DVC reads it)."""
    from components.config import write_overrides

    params = _params(args)  # validate before anything starts
    if args.set:
        write_overrides(args.params, args.set)
        print(f"{args.params}: set {', '.join(args.set)} (recorded so dvc.lock matches)")
    return params


def cmd_run(args) -> int:
    params = _params_recorded(args)
    from flows.pipeline import run_pipeline

    run_pipeline(force=args.force, on_busy=params.retrain.on_busy,
                 busy_timeout_s=params.retrain.busy_timeout_s)
    return 0


def cmd_retrain(args) -> int:
    _params_recorded(args)
    from flows.retrain import run_retrain

    run_retrain()
    return 0


def cmd_schedule(args) -> int:
    _params_recorded(args)
    from flows.retrain import serve_schedule

    serve_schedule(args.cron, args.timezone, args.name)
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


def cmd_models(args) -> int:
    from components.registry import list_models

    rows = list_models(_params(args))
    if not rows:
        print("no versions registered yet; run `tinyldm run`")
        return 0
    cols = list(rows[0])

    def cell(v) -> str:
        return "-" if v is None or v == "" else f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [cols] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_promote(args) -> int:
    from components.registry import promote

    r = promote(_params(args), args.version, force=args.force, reason=args.reason)
    before = f"v{r['previous']}" if r["previous"] else "none"
    print(f"champion: v{r['version']} (was {before}; {r['how']}: {r['reason']})")
    return 0


def cmd_rollback(args) -> int:
    from components.registry import rollback

    r = rollback(_params(args), reason=args.reason)
    print(f"champion: v{r['version']} (rolled back from v{r['from']})")
    return 0


def cmd_serve(args) -> int:
    from components.registry import serve_command

    uri, cmd = serve_command(args.model, _params(args), args.host, args.port)
    venv_on_path()
    print(f"serving {uri} on http://{args.host}:{args.port}/invocations "
          "(Ctrl-C stops)", flush=True)
    os.execvp(cmd[0], cmd)  # the server takes this PID: stopping it stops the server


def cmd_labels(args) -> int:
    from components import labels

    params = _params(args)
    if args.action == "export":
        config, tasks, n = labels.export(params, Path(args.out), args.image_url)
        print(f"wrote {config} (labelling config) and {tasks} ({n} tasks with the current "
              "labels as predictions); README 'Labelling in Label Studio' says what next")
    elif args.action == "import":
        if not args.file:
            raise UserError("labels import: name the Label Studio export, e.g. "
                            "tinyldm labels import ~/Downloads/project-1.json")
        dest, n, problems = labels.import_labels(params, Path(args.file))
        for line in problems:
            print(f"labels import: {line}")
        print(f"wrote {dest}: {n} annotated image(s); `tinyldm run` merges them (manual "
              "labels win over auto labels)")
    else:
        print(labels.stats(params))
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

    rt = sub.add_parser("retrain", parents=[common], help="one retraining run now: scrape; "
                        "stop if no image or manual label changed; else the DAG, dvc push, "
                        "dvc.lock to git as params `retrain` says")
    rt.set_defaults(func=cmd_retrain)

    sc = sub.add_parser("schedule", parents=[common], help="serve the retraining flow on a "
                        "cron schedule (needs a Prefect server: PREFECT_API_URL)")
    sc.add_argument("--cron", required=True, help='e.g. "0 3 * * 1": Mondays at 03:00')
    sc.add_argument("--timezone", default="UTC", help="IANA name, e.g. Europe/Paris")
    sc.add_argument("--name", default="retrain", help="deployment name")
    sc.set_defaults(func=cmd_schedule)

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

    m = sub.add_parser("models", parents=[common], help="registered versions: aliases, gate "
                       "decision, key metrics, data version")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("promote", parents=[common], help="make VERSION the champion if it "
                        "passes the gate against the current one (or --force)")
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true", help="skip the gate (needs --reason)")
    pr.add_argument("--reason", default=None, help="why; recorded with who did it")
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", parents=[common], help="champion back to the version "
                        "it replaced")
    rb.add_argument("--reason", default=None)
    rb.set_defaults(func=cmd_rollback)

    sv = sub.add_parser("serve", parents=[common], help="serve a model over HTTP (POST "
                        "/invocations -> PNG as base64), via `mlflow models serve`")
    sv.add_argument("--model", default=None,
                    help="model URI (default models:/<register.model_name>@champion)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=5001)
    sv.set_defaults(func=cmd_serve)

    lb = sub.add_parser("labels", parents=[common], help="labels: export to / import from "
                        "Label Studio, coverage stats")
    lb.add_argument("action", choices=["export", "import", "stats"])
    lb.add_argument("file", nargs="?", help="import: a Label Studio JSON export")
    lb.add_argument("--out", default="data/labels", help="export: folder to write to")
    lb.add_argument("--image-url", default="/data/local-files/?d=",
                    help="export: prefix of each image's URL in the tasks (default: Label "
                         "Studio's local-files serving, document root = this folder)")
    lb.set_defaults(func=cmd_labels)

    pp = sub.add_parser("params", parents=[common], help="print the validated parameters")
    pp.set_defaults(func=cmd_params)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a failed stage leaves its one line for the flow that ran it (run_stage reads it)
    error_file = None
    if args.verb == "stage" and args.name in STAGE_FUNCS:
        error_file = STAGE_ERRORS / f"{args.name}.txt"
        with contextlib.suppress(OSError):
            error_file.unlink(missing_ok=True)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tinyldm: error: {e}", file=sys.stderr)
        if error_file:
            with contextlib.suppress(OSError):  # the line above is printed either way
                error_file.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(f"{e}\n")
        return 2
    except KeyboardInterrupt:
        print("tinyldm: interrupted; finished stages are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
