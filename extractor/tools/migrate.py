"""Move an output written by version 0.1 into today's layout: `python -m extractor.tools.migrate DIR`.

    0.1:  DIR/part-*.parquet, DIR/_failures/part-*.parquet, DIR/_run.json (recipe), DIR/_SUCCESS*, DIR/_lock-*
    now:  DIR/embeddings/part-*.parquet, DIR/failures/part-*.parquet, DIR/_run.json (recipe and
          shard layout), DIR/_SUCCESS and DIR/_shards/ (markers that name a manifest)

Every step is a rename within the directory, except for parts whose columns are not of today's
canonical types (0.1 kept the manifest's own: `string` beside `large_string`, `int32` beside
`int64`): those are rewritten, cast, through a temporary file and a rename, so that every reader
sees one schema. A migration that is interrupted is finished by running it again (the job refuses
the output until it is). The
shard layout is the `--num-shards` of the old markers' names, or the one given. Local
directories only; a run must not be writing to the output meanwhile (its locks are checked).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import click

import pyarrow as pa
import pyarrow.parquet as pq

from ..manifest.types import canonical_type
from ..output.layout import EMBEDDINGS_DIR, FAILURES_DIR, LAYOUT_VERSION, PART_RE, RUN_FILE
from ..output.locks import flock_holder
from ..output.storage import write_atomic

_OLD_MARKER = re.compile(r"^_SUCCESS-(\d{5})-of-(\d{5})$")


class MigrateError(Exception):
    pass


def migrate(root: Path, num_shards: int | None = None) -> dict:
    root = Path(root)
    run_file = root / RUN_FILE
    if not run_file.exists():
        raise MigrateError(f"{root} has no {RUN_FILE}: not an output of extract-embeddings")
    run = json.loads(run_file.read_text())
    held = [p.name for p in root.glob("_lock-*") if flock_holder(p) is not None]
    if held:
        raise MigrateError(f"a run holds {held[0]}: wait until it is done (or stopped) before moving the output")
    counts = {int(m.group(2)) for p in root.glob("_SUCCESS-*-of-*") if (m := _OLD_MARKER.match(p.name))}
    if num_shards is None:
        if len(counts) > 1:
            raise MigrateError(f"the old markers name several shard counts {sorted(counts)}: give --num-shards")
        num_shards = counts.pop() if counts else run.get("num_shards", 1)
    (root / EMBEDDINGS_DIR).mkdir(exist_ok=True)
    (root / FAILURES_DIR).mkdir(exist_ok=True)
    moved = failures = 0
    for p in sorted(root.glob("part-*.parquet")):
        if PART_RE.match(p.name):
            os.rename(p, root / EMBEDDINGS_DIR / p.name)
            moved += 1
    old_failures = root / "_failures"
    if old_failures.is_dir():
        for p in sorted(old_failures.glob("part-*.parquet")):
            os.rename(p, root / FAILURES_DIR / p.name)
            failures += 1
        os.rmdir(old_failures)
    for p in [*root.glob("_SUCCESS-*-of-*"), root / "_SUCCESS", *root.glob("_lock-*")]:
        p.unlink(missing_ok=True)  # old markers name no manifest; old locks are not held (checked)
    rewritten = sum(_canonicalise(p) for folder in (EMBEDDINGS_DIR, FAILURES_DIR) for p in sorted((root / folder).glob("part-*.parquet")))
    run.update(num_shards=num_shards, layout_version=LAYOUT_VERSION)
    write_atomic(run_file, json.dumps(run, indent=2, sort_keys=True).encode())  # last: the job accepts it from here on
    return {"parts": moved, "failure_files": failures, "num_shards": num_shards, "rewritten": rewritten}


def _canonicalise(path: Path) -> bool:
    """Rewrite a part whose id or kept columns are not of the canonical types; True if it was."""
    schema = pq.read_schema(path)
    wanted = pa.schema([f.with_type(canonical_type(f.type)) if f.name not in ("embedding", "frames") else f for f in schema],
                       metadata=schema.metadata)
    if wanted.equals(schema, check_metadata=False):
        return False
    table = pq.read_table(path).cast(wanted)
    tmp = path.with_name(f".{path.name}.migrate.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # a reader sees the old part or the new one, whole
    return True


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--num-shards", type=click.IntRange(min=1), help="The shard layout, if the old markers do not say it.")
def main(directory: str, num_shards: int | None) -> None:
    """Move an output of version 0.1 into today's layout (see the module's doc)."""
    try:
        done = migrate(Path(directory), num_shards)
    except MigrateError as e:
        click.echo(f"migrate: {e}", err=True)
        sys.exit(2)
    click.echo(f"moved {done['parts']} part(s) into {EMBEDDINGS_DIR}/ and {done['failure_files']} failure file(s) into "
               f"{FAILURES_DIR}/, {done['rewritten']} rewritten to canonical types; layout: {done['num_shards']} shard(s)")


if __name__ == "__main__":
    main()
