"""`inspect-embeddings DIR`: what a run wrote, in a few lines; `--plot` draws it.

Exit codes: 0 printed (whatever the output holds), 2 DIR is not a readable output of
extract-embeddings or a flag does not fit it, 1 anything unexpected.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from extractor.tools.inspect import InspectError, check_plot_request, plot, render, summarize

logger = logging.getLogger("inspect-embeddings")

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE = 0, 1, 2


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("directory", type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw a PNG here: durations, failures by type, PCA (needs the [plot] extra).")
@click.option("--color-by", help="Column of the output (a kept manifest column, or duration_s) colouring the PCA.")
@click.option("--sample", type=click.IntRange(min=2), default=2000, show_default=True, help="Embeddings drawn at random for the PCA.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of text.")
def inspect_embeddings(directory: str, plot_path: str | None, color_by: str | None, sample: int, as_json: bool) -> None:
    """Summarize an output directory of extract-embeddings: the recipe, rows, failures by kind
    (their error_kind), durations, embedding norms and any NaN/Inf or all-zero vectors. Reads only
    the small columns (never `frames`), so it is quick on frame-level outputs too. An output of an
    older layout is refused (exit 2) with the command that moves it."""
    logging.basicConfig(level="WARNING", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if color_by and not plot_path:
        raise click.UsageError("--color-by colours the plot: give --plot FILE.png too")
    try:
        if plot_path:
            check_plot_request(directory, plot_path, color_by)
        summary = summarize(directory)
        click.echo(json.dumps(summary, indent=2, default=str) if as_json else render(summary))
        if plot_path:
            written = plot(directory, plot_path, color_by=color_by, sample=sample)
            if not as_json:
                click.echo(f"{'plot':<8}  {written}")
    except InspectError as e:
        click.echo(f"inspect-embeddings: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception:
        logger.exception("unexpected error while reading %s", directory)
        sys.exit(EXIT_UNEXPECTED)


def main() -> None:
    inspect_embeddings()


if __name__ == "__main__":
    main()
