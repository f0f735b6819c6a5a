"""`make-sample DIR`: write the built-in sample (tiny random model, adapter, audio, manifest)."""

from __future__ import annotations

import logging

import click

from extractor.tools.sample import build_sample


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
def make_sample(directory: str) -> None:
    """Write a tiny random-weight Qwen2-Audio checkpoint, a LoRA adapter, generated audio and a
    manifest under DIRECTORY, and print the extract-embeddings command that embeds them.

    The vectors this sample gives are meaningless (random weights): it exists to run the real job
    end to end on any machine.
    """
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = build_sample(directory)
    click.echo(
        f"extract-embeddings --manifest {p['manifest']} --model {p['model']} --adapter {p['adapter']} "
        f"--id-column id --keep-columns source --output {directory}/out"
    )


if __name__ == "__main__":
    make_sample()
