"""Move an output of an older layout into today's: `python -m extractor.tools.migrate DIR`.

    1 (0.1):  DIR/part-*.parquet, DIR/_failures/, DIR/_run.json (the recipe), DIR/_SUCCESS*, DIR/_lock-*
    2 (0.2):  DIR/embeddings/, DIR/failures/, DIR/_run.json (and the shard layout), DIR/_SUCCESS, DIR/_shards/
    3 (now):  DIR/embeddings/, DIR/_failures/, DIR/_run.json (and whether parts carry `path`), DIR/_SUCCESS, DIR/_shards/

Parts and failure files move by renames within the directory, never replacing a file. So that a
folder reads as one schema, two kinds of file are rewritten, each through a temporary and a
rename (a reader sees the old file or the new one, whole): parts whose columns are not of today's
canonical types (0.1 kept the manifest's own, `string` beside `large_string`, `int32` beside
`int64`), and failure files from before `error_kind`, which is taken from their `error`
("Kind: message"). Parts keep their columns: `_run.json` records whether they carry `path`, and
the job's next parts follow it. Shard markers go (0.2's `_SUCCESS` stays): the next run, with
nothing to embed, writes them again, and an empty failure part for a shard without failures.

Migration holds every shard's lock, as a run holds its own: it is refused while a run holds one,
and a run that starts meanwhile is refused. `_run.json` is rewritten last, so an interrupted
migration is finished by running it again (the job refuses the output until then). An output
already in today's layout is refused, untouched. Local directories only.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

import pyarrow as pa
import pyarrow.parquet as pq

from ..manifest.types import canonical_type
from ..options import Shard
from ..output.layout import EMBEDDINGS_DIR, FAILURES_DIR, LAYOUT_VERSION, PART_RE, RUN_FILE, SHARDS_DIR, SUCCESS_FILE, V2_FAILURES_DIR, OutputDir
from ..output.locks import LockHeld, RunLock
from ..output.storage import OutputError, write_atomic
from .inspect import error_type

_OLD_MARKER = re.compile(r"^_SUCCESS-(\d{5})-of-(\d{5})$")


class MigrateError(Exception):
    pass


def migrate(root: Path, num_shards: int | None = None) -> dict:
    """Move the output at `root` into layout LAYOUT_VERSION (see the module's doc); MigrateError
    if it cannot be, with nothing moved. Returns what was done, as counts."""
    root = Path(root)
    try:
        version = OutputDir(root).layout_version()
    except OutputError as e:
        raise MigrateError(str(e)) from e
    if version is None or not (root / RUN_FILE).is_file():
        raise MigrateError(f"{root} has no {RUN_FILE}: not an output of extract-embeddings")
    if version == LAYOUT_VERSION:
        raise MigrateError(f"{root} is already in today's layout ({LAYOUT_VERSION}): nothing to move")
    if version > LAYOUT_VERSION:
        raise MigrateError(f"{root} is in layout {version}, written by a newer version of this job: this one cannot move it")
    run = json.loads((root / RUN_FILE).read_text())
    num_shards = _num_shards(root, run, version, num_shards)
    with _holding_every_lock(root, num_shards):
        if version == 1:
            moved = _move_files(sorted(p for p in root.glob("part-*.parquet") if PART_RE.match(p.name)), root / EMBEDDINGS_DIR)
            failures = 0  # 0.1 kept them in _failures/ already
            for p in [*root.glob("_SUCCESS-*-of-*"), root / SUCCESS_FILE]:
                p.unlink(missing_ok=True)  # 0.1's markers name no manifest
        else:
            moved, failures = 0, _move_folder(root / V2_FAILURES_DIR, root / FAILURES_DIR)
        for p in (root / SHARDS_DIR).glob("*.done"):
            p.unlink()  # a cache of "nothing to do": the next run plans from the parts and writes them again
        parts = sorted((root / EMBEDDINGS_DIR).glob("part-*.parquet"))
        failure_files = sorted((root / FAILURES_DIR).glob("part-*.parquet"))
        rewritten = sum(_normalise(p, failures=False) for p in parts) + sum(_normalise(p, failures=True) for p in failure_files)
        run.update(num_shards=num_shards, layout_version=LAYOUT_VERSION, path_column=_parts_have_path(parts))
        write_atomic(root / RUN_FILE, json.dumps(run, indent=2, sort_keys=True).encode())  # last: the job accepts it from here on
    return {"from_layout": version, "parts": moved, "failure_files": failures, "num_shards": num_shards, "rewritten": rewritten,
            "path_column": run["path_column"]}


def _num_shards(root: Path, run: dict, version: int, given: int | None) -> int:
    """0.2 recorded the shard layout; 0.1 named it in its markers' names, if anywhere."""
    if version >= 2:
        if given is not None and given != run["num_shards"]:
            raise MigrateError(f"{root / RUN_FILE} says {run['num_shards']} shard(s), not --num-shards {given}")
        return run["num_shards"]
    counts = {int(m.group(2)) for p in root.glob("_SUCCESS-*-of-*") if (m := _OLD_MARKER.match(p.name))}
    if given is not None:
        return given
    if len(counts) > 1:
        raise MigrateError(f"the old markers name several shard counts {sorted(counts)}: give --num-shards")
    return counts.pop() if counts else 1


@contextmanager
def _holding_every_lock(root: Path, num_shards: int):
    """Every shard's lock as a run takes it (and 0.1's `_lock-*`, which go on release)."""
    (root / SHARDS_DIR).mkdir(exist_ok=True)
    paths = sorted(root.glob("_lock-*")) + [root / SHARDS_DIR / f"{Shard(i, num_shards).tag}.lock" for i in range(num_shards)]
    with ExitStack() as stack:
        for path in paths:
            try:
                stack.enter_context(RunLock(path))
            except LockHeld as e:
                raise MigrateError(f"{e}; nothing was moved") from None
        yield


def _move_files(files: list[Path], folder: Path) -> int:
    folder.mkdir(exist_ok=True)
    for p in files:
        if (folder / p.name).exists():  # os.rename would replace it
            raise MigrateError(f"both {p} and {folder / p.name} exist: move one of them away, then run this again")
        os.rename(p, folder / p.name)
    return len(files)


def _move_folder(old: Path, new: Path) -> int:
    """0.2's failures/ becomes _failures/: one rename, or file by file if both are there."""
    if not old.is_dir():
        return 0  # moved by an interrupted run of this tool
    n = len(list(old.glob("part-*.parquet")))
    if not new.exists():
        os.rename(old, new)
        return n
    _move_files(sorted(old.glob("part-*.parquet")), new)
    try:
        os.rmdir(old)
    except OSError as e:
        raise MigrateError(f"{old} holds files that are not failure parts ({e.strerror}): move them away, then run this again") from e
    return n


def _normalise(path: Path, *, failures: bool) -> bool:
    """Rewrite a file whose columns are not of the canonical types, or a failure file without
    `error_kind`; True if it was."""
    schema = pq.read_schema(path)
    wanted = pa.schema([f.with_type(canonical_type(f.type)) if f.name not in ("embedding", "frames") else f for f in schema],
                       metadata=schema.metadata)
    add_kind = failures and "error_kind" not in schema.names
    if wanted.equals(schema, check_metadata=False) and not add_kind:
        return False
    table = pq.read_table(path).cast(wanted)
    if add_kind:
        kinds = [error_type(e) for e in table.column("error").to_pylist()]
        table = table.add_column(table.schema.get_field_index("error") + 1, "error_kind", pa.array(kinds, type=pa.large_string()))
    tmp = path.with_name(f".{path.name}.migrate.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # a reader sees the old file or the new one, whole
    return True


def _parts_have_path(parts: list[Path]) -> bool:
    """Whether the output's parts carry `path` (none before layout 3); an output without parts
    takes it, as a new one does."""
    has = {"path" in pq.read_schema(p).names for p in parts}
    if len(has) > 1:
        raise MigrateError(f"some parts under {parts[0].parent} have a path column and some do not: not an output this job wrote")
    return has.pop() if has else True


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--num-shards", type=click.IntRange(min=1), help="The shard layout of a 0.1 output, if its markers do not say it.")
def main(directory: str, num_shards: int | None) -> None:
    """Move an output of an older layout into today's (see the module's doc)."""
    try:
        done = migrate(Path(directory), num_shards)
    except MigrateError as e:
        click.echo(f"migrate: {e}", err=True)
        sys.exit(2)
    click.echo(f"layout {done['from_layout']} → {LAYOUT_VERSION}: moved {done['parts']} part(s) into {EMBEDDINGS_DIR}/ and "
               f"{done['failure_files']} failure file(s) into {FAILURES_DIR}/, {done['rewritten']} rewritten to canonical types (or to add error_kind); "
               f"layout: {done['num_shards']} shard(s), parts {'with' if done['path_column'] else 'without'} a path column")


if __name__ == "__main__":
    main()
