"""The `tinyldm` command line: every thing a person can do with tinyldm, as a verb.

A failure the user can fix (components.contracts.UserError) ends in one line on stderr and
exit code 1; a mistyped command line is Typer's usage error, exit code 2; Ctrl-C, 130.
Nothing imports this module: what the flows share with it lives in flows/env.py.
"""

from __future__ import annotations

import sys
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from typer.core import TyperGroup

from components.contracts import UserError
from components.overrides import profile_sets
from components.stages import ENTRIES
from flows.env import set_defaults

if TYPE_CHECKING:
    from components.config import Params

set_defaults()  # no telemetry, a patient temporary Prefect server (unless the user says so)

INTERRUPTED = "tinyldm: interrupted; finished stages are kept, run again to resume"
PARAMS_FILE = Path("params.yaml")
PIPELINE, LABELS, MODELS = "Pipeline", "Labels", "Models"  # the groups of verbs in --help

# The dvc.yaml stages, as choices; --help lists them in the argument's help, where Rich
# wraps them between words (the choices column would fold them mid-name).
Stage = Enum("stage", {name: name for name in ENTRIES}, type=str)

# The two options every verb takes.
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", show_default=False,
    help="Override a params key for this command: dotted key, YAML value, "
         "e.g. --set unet.steps=2000. Repeatable.")]
ParamsFile = Annotated[Path, typer.Option("--params", help="The params file to read.")]
Profiles = Annotated[list[str] | None, typer.Option(
    "--profile", metavar="NAME", show_default=False,
    help="Apply profiles/NAME.yaml (a named set of --set values, applied before --set), "
         "e.g. --profile text128. Repeatable.")]
ModelUri = Annotated[str | None, typer.Option(
    "--model", show_default=False,
    help="Model URI. Default: the champion, models:/<register.model_name>@champion.")]


class Verbs(TyperGroup):
    """Runs a verb; a failure the user can fix is one line on stderr, not a traceback."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except UserError as e:
            print(f"tinyldm: error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            raise typer.Exit(130) from None


app = typer.Typer(cls=Verbs, name="tinyldm", no_args_is_help=True, add_completion=False,
                  rich_markup_mode="rich", pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
labels_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(labels_app, name="labels", rich_help_panel=LABELS,
              help="Labels: export to and import from Label Studio, coverage stats.")


def _print_version(show: bool) -> None:
    if not show:
        return
    try:
        print(f"tinyldm {metadata.version('tinyldm')}")
    except metadata.PackageNotFoundError:
        print("tinyldm (not installed: pip install -e . in the repository)")
    raise typer.Exit()


@app.callback()
def _tinyldm(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    """Train a small latent text-to-image diffusion model on your own brand graphics, as a
    repeatable pipeline (DVC, Prefect, MLflow), then generate with it, compare, promote and
    serve its versions.

    Run it from the project folder (the one holding dvc.yaml and params.yaml).
    """


def _params(params_file: Path, overrides: list[str] | None) -> Params:
    from components.config import load_params

    return load_params(params_file, overrides or [])


def _params_recorded(params_file: Path, overrides: list[str] | None) -> Params:
    """Validated params, with --set values written to the file (DVC reads it) while this
    process holds the workspace, so no running pipeline has them changed under it."""
    from flows.pipeline import record_overrides, workspace_lock

    params = _params(params_file, overrides)  # validate before anything starts
    if overrides:
        cfg = params.retrain
        with workspace_lock("tinyldm --set", "wait", cfg.busy_timeout_s):
            record_overrides(overrides, str(params_file))
    return params


# ---------------------------------------------------------------- pipeline
@app.command(rich_help_panel=PIPELINE)
def run(
    force: Annotated[bool, typer.Option(
        "--force", help="Re-run every stage, also those that are up to date.")] = False,
    profile: Profiles = None,
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Run the whole pipeline: a Prefect flow over the dvc.yaml stages.

    Stages whose inputs did not change are skipped. --profile and --set values are
    written to the params file first, so that dvc.lock records what ran.
    """
    overrides = profile_sets(profile) + (overrides or [])
    params = _params(params_file, overrides)  # validated now, written once the run holds
    from flows.pipeline import run_pipeline  # the workspace (no other run changes under it)

    run_pipeline(force=force, on_busy=params.retrain.on_busy,
                 busy_timeout_s=params.retrain.busy_timeout_s, overrides=overrides)


@app.command(rich_help_panel=PIPELINE)
def retrain(overrides: Overrides = None, params_file: ParamsFile = PARAMS_FILE) -> None:
    """One retraining run now.

    Scrape; stop there if no image and no manual label changed; else run the pipeline,
    dvc push, and put dvc.lock in git as params `retrain` says.
    """
    _params(params_file, overrides)  # validated now, written once the run holds the workspace
    from flows.retrain import run_retrain

    run_retrain(overrides)


@app.command(rich_help_panel=PIPELINE)
def schedule(
    cron: Annotated[str, typer.Option(
        show_default=False, help='When to retrain, e.g. "0 3 * * 1": Mondays at 03:00.')],
    timezone: Annotated[str, typer.Option(
        help="IANA time zone of --cron, e.g. Europe/Paris.")] = "UTC",
    name: Annotated[str, typer.Option(help="Name of the Prefect deployment.")] = "retrain",
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Retrain on a cron schedule: serve the retraining flow as a Prefect deployment.

    Needs a Prefect server (PREFECT_API_URL). Ctrl-C stops serving; the schedule stays.
    """
    _params_recorded(params_file, overrides)
    from flows.retrain import serve_schedule

    serve_schedule(cron, timezone, name)


@app.command("stage", rich_help_panel=PIPELINE)
def stage_(
    name: Annotated[Stage, typer.Argument(
        metavar="NAME", show_choices=False, show_default=False,
        help=f"The dvc.yaml stage to run: {', '.join(ENTRIES)}.")],
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Run one stage of dvc.yaml in this process (what `dvc repro` calls)."""
    from flows import stage

    stage.run(name.value, params_file, overrides or [])


@app.command("params", rich_help_panel=PIPELINE)
def params_(profile: Profiles = None, overrides: Overrides = None,
            params_file: ParamsFile = PARAMS_FILE) -> None:
    """Print the validated parameters, --profile and --set values applied (the file is
    not changed)."""
    import yaml

    params = _params(params_file, profile_sets(profile) + (overrides or []))
    print(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False),
          end="")


# ---------------------------------------------------------------- labels
@labels_app.command("export")
def labels_export(
    out: Annotated[Path, typer.Option(help="Folder to write the config and tasks to.")]
    = Path("data/labels"),
    image_url: Annotated[str, typer.Option(
        help="Prefix of each image's URL in the tasks. The default is Label Studio's "
             "local-files serving, with this folder as document root.")]
    = "/data/local-files/?d=",
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Write a Label Studio labelling config and tasks, current labels as predictions."""
    from components.labelling.labelstudio import export

    config, tasks, n = export(_params(params_file, overrides), out, image_url)
    print(f"wrote {config} (labelling config) and {tasks} ({n} tasks with the current "
          "labels as predictions); README 'Labelling in Label Studio' says what next")


@labels_app.command("import")
def labels_import(
    file: Annotated[Path, typer.Argument(
        show_default=False, help="A Label Studio JSON export, e.g. project-1.json.")],
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Import a Label Studio export as manual labels (they win over auto labels)."""
    from components.labelling.labelstudio import import_labels

    dest, n, problems = import_labels(_params(params_file, overrides), file)
    for line in problems:
        print(f"labels import: {line}")
    print(f"wrote {dest}: {n} annotated image(s); `tinyldm run` merges them (manual "
          "labels win over auto labels)")


@labels_app.command("stats")
def labels_stats(overrides: Overrides = None, params_file: ParamsFile = PARAMS_FILE) -> None:
    """Coverage of every label field by source, caption lengths, split sizes."""
    from components.labelling.labels import stats

    print(stats(_params(params_file, overrides)))


# ---------------------------------------------------------------- models
@app.command(rich_help_panel=MODELS)
def generate(
    prompt: Annotated[str, typer.Argument(show_default=False, help="What to draw.")],
    out: Annotated[Path, typer.Option(show_default=False, help="PNG file to write.")],
    seed: Annotated[int, typer.Option(help="Same seed, same prompt: same image.")] = 0,
    steps: Annotated[int | None, typer.Option(
        show_default=False, help="Sampler steps. Default: params.")] = None,
    guidance: Annotated[float | None, typer.Option(
        show_default=False, help="Classifier-free guidance scale. Default: params.")] = None,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 256,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 256,
    text_box: Annotated[str, typer.Option(
        help="Where the quoted text goes: x,y,w,h in units of the image side, e.g. "
             "0.1,0.4,0.8,0.2. Default: planned from the prompt's layout.")] = "",
    typeset: Annotated[bool, typer.Option(
        help="Draw the quoted text crisply over the output, in the brand font and the "
             "model's ink colour (exact words; the model's letters are replaced).")] = False,
    model: ModelUri = None,
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Generate an image from a prompt with a registered model (the champion by default)."""
    from components.contracts import atomic_path
    from components.ship.serving import generate_png, resolve_model_uri

    uri = resolve_model_uri(model, _params(params_file, overrides))
    png = generate_png(uri, prompt, seed=seed, steps=steps, guidance=guidance, width=width,
                       height=height, text_box=text_box, typeset=typeset)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png)
    print(f"wrote {out} ({width}x{height}) from {uri}")


def _cell(v: object) -> str:
    return "-" if v is None or v == "" else f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command(rich_help_panel=MODELS)
def models(overrides: Overrides = None, params_file: ParamsFile = PARAMS_FILE) -> None:
    """Registered versions, newest first: aliases, gate decision, key metrics, data."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from components.ship.registry import list_models

    rows = list_models(_params(params_file, overrides))
    if not rows:
        print("no versions registered yet; run `tinyldm run`")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in rows[0]:
        numeric = any(isinstance(r[col], int | float) for r in rows)
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        table.add_row(*(_cell(v) for v in r.values()))
    console = Console(highlight=False)  # plain text when not a terminal
    # Every row on one line, however wide (a narrow terminal wraps it): Rich would squeeze
    # the columns to the console width and cut the values.
    wide = console.options.update_width(10_000)
    console.width = max(console.width, console.measure(table, options=wide).maximum)
    console.print(table)


@app.command(rich_help_panel=MODELS)
def promote(
    version: Annotated[str, typer.Argument(show_default=False,
                                           help="The version to promote, e.g. 3.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Skip the gate (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(
        show_default=False, help="Why; recorded with who did it.")] = None,
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Make VERSION the champion if it passes the gate against the current one."""
    from components.ship.registry import promote as promote_version

    r = promote_version(_params(params_file, overrides), version, force=force, reason=reason)
    before = f"v{r['previous']}" if r["previous"] else "none"
    print(f"champion: v{r['version']} (was {before}; {r['how']}: {r['reason']})")


@app.command(rich_help_panel=MODELS)
def rollback(
    reason: Annotated[str | None, typer.Option(
        show_default=False, help="Why; recorded with who did it.")] = None,
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> None:
    """Make the champion the version it replaced."""
    from components.ship.registry import rollback as roll_back

    r = roll_back(_params(params_file, overrides), reason=reason)
    print(f"champion: v{r['version']} (rolled back from v{r['from']})")


@app.command(rich_help_panel=MODELS)
def serve(
    model: ModelUri = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
    overrides: Overrides = None,
    params_file: ParamsFile = PARAMS_FILE,
) -> NoReturn:
    """Serve a model over HTTP (MLflow's scoring server, in this process).

    POST /invocations with a prompt; the answer is the PNG, base64-encoded. Ctrl-C or
    SIGTERM stops it, cancelling a request in flight.
    """
    import contextlib
    import os
    import signal

    import uvicorn

    from components.ship.serving import serve_app

    uri, asgi = serve_app(model, _params(params_file, overrides), host, port)
    server = uvicorn.Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    # our handlers, not uvicorn's (it re-raises the signal after shutting down, so nothing
    # after run() would happen): stop accepting, close, then leave below
    server.capture_signals = contextlib.nullcontext
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    print(f"serving {uri} on http://{host}:{port}/invocations (Ctrl-C stops)", flush=True)
    server.run()
    print("tinyldm serve: stopped", flush=True)
    os._exit(0)  # a request still sampling in a worker thread is dropped, not waited for


def main(argv: list[str] | None = None) -> int:
    """The `tinyldm` command (argv: the arguments after it); returns the exit code."""
    try:
        app(args=argv, prog_name="tinyldm")
    except SystemExit as e:  # Typer ends every command with one, the code in it
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return 0


if __name__ == "__main__":  # python -m flows.cli, as torchrun starts each process
    sys.exit(main())
