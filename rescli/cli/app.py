"""The `rescli` program: the Typer app with every command, and ``main``, its entry point.

stdout carries results only (a table for people, or json/jsonl/csv/tsv for programs); progress, logs and
warnings go to stderr. Exit status: 0 ok, 1 failure (or some inputs failed), 2 usage error, 130 interrupted,
141 output pipe closed (rescli.cli.entry).

Where things are: rescli.cli.commands (one module per pipeline step, holding its commands), rescli.cli.options
(the options commands share), rescli.cli.console (stdout, stderr and the progress line), rescli.cli.tables and
rescli.cli.predict_output (how results look).
"""

from typing import Annotated

import typer

import rescli.cli.console as console
from rescli import __version__
from rescli.cli.commands import bench as bench_commands
from rescli.cli.commands import data, evaluation, experiments, inference, insight, train
from rescli.cli.entry import run

app = typer.Typer(
    name="rescli",
    help="Fine-tune ImageNet ResNets on a folder of images; evaluate, predict and export from the command line.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    epilog="""
Examples:

    rescli finetune ./images                          # train; writes runs/run1/best.pt
    rescli predict ./new_photos --format jsonl | jq -r '.label'
    rescli export runs/run1 --to onnx -o model.onnx
    rescli info model.onnx
    rescli --install-completion                       # tab completion in your shell

Run `rescli COMMAND --help` for each command's options and examples.
""",
)

# In the order `rescli --help` lists them: the pipeline's order.
app.command("finetune", epilog=train.FINETUNE_EPILOG)(train.finetune)
app.command("lr-find", epilog=train.LR_FIND_EPILOG)(train.lr_find)
app.command("dataset", epilog=data.DATASET_EPILOG)(data.dataset)
app.command("evaluate", epilog=evaluation.EVALUATE_EPILOG)(evaluation.evaluate)
app.command("report", epilog=evaluation.REPORT_EPILOG)(evaluation.report)
app.command("predict", epilog=inference.PREDICT_EPILOG)(inference.predict)
app.command("degradation", epilog=experiments.DEGRADATION_EPILOG)(experiments.degradation)
app.command("export", epilog=inference.EXPORT_EPILOG)(inference.export)
app.command("info", epilog=inference.INFO_EPILOG)(inference.info)
app.command("bench", epilog=bench_commands.BENCH_EPILOG)(bench_commands.bench)
# What the model sees, which images look alike, which labels are wrong (rescli.cli.commands.insight).
app.command("explain", epilog=insight.EXPLAIN_EPILOG)(insight.explain)
app.command("embed", epilog=insight.EMBED_EPILOG)(insight.embed)
app.command("similar", epilog=insight.SIMILAR_EPILOG)(insight.similar)
app.command("label-issues", epilog=insight.LABEL_ISSUES_EPILOG)(insight.label_issues)


def _version(value: bool) -> None:
    if value:
        console.out.print(f"rescli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """rescli: transfer learning for image folders."""


def main() -> None:
    """Run the command on sys.argv and exit with its status."""
    run(app)
