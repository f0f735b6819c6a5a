"""What is committed, read as the truth it is, and checked before anything is planned from it.

The data is the journal: a row is done when it sits in a committed part or failure record. Under
the shard's lock a run reads every one of them (their `id` column and footer) and plans from that:

- a file that is not whole Parquet (truncated, emptied) is moved aside to `_quarantine/`, never
  deleted, with a line naming it; its rows are planned again;
- a file that is not this output's (no id, another embedding width, another recipe in its
  metadata, ids that do not convert to the manifest's id type) is refused, exit 2, naming it;
- an id in two files is refused, exit 2, naming both: nothing is silently counted twice.

`--dry-run` reads the same way but moves nothing (repair=False).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from ..recipe import METADATA_KEY, Recipe
from .layout import OutputDir
from .storage import OutputError, PartRead, basename

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "_quarantine"


@dataclass(frozen=True)
class Committed:
    done: pa.Array  # ids of every committed part
    failed: pa.Array  # ids of every failure record
    paths: pl.DataFrame  # (id, path) as recorded, where files record it (failure records; parts of outputs with a path column)
    moved: list[str]  # files moved aside, as `folder/name`


def read_committed(out: OutputDir, id_type: pa.DataType, recipe: Recipe | None, *, repair: bool = True) -> Committed:
    """The ids (and recorded paths) of the output's committed parts and failure records, every
    file checked, each read once."""
    moved: list[str] = []
    done = _ids(out, out.storage.read_parts(out.part_files(), ["id", "path"]), id_type, recipe, ("id", "embedding"), repair, moved)
    failed = _ids(out, out.storage.read_parts(out.failure_files(), ["id", "path"]), id_type, recipe, ("id", "path", "error"), repair, moved)
    _refuse_duplicates(out, done + failed)
    paths = [pl.DataFrame({"id": pl.Series(ids), "path": pl.Series(read.table.column("path")).cast(pl.String)})
             for read, ids in done + failed if "path" in read.table.column_names and len(ids)]
    paths = pl.concat(paths) if paths else pl.DataFrame({"id": pl.Series([], dtype=pl.from_arrow(pa.array([], id_type)).dtype),
                                                          "path": pl.Series([], dtype=pl.String)})
    return Committed(_concat(done, id_type), _concat(failed, id_type), paths, moved)


def _concat(reads: list[tuple[PartRead, pa.Array]], id_type: pa.DataType) -> pa.Array:
    arrays = [ids for _, ids in reads]
    return pa.concat_arrays(arrays) if arrays else pa.array([], type=id_type)


def _ids(out: OutputDir, reads: list[PartRead], id_type: pa.DataType, recipe: Recipe | None, columns: tuple[str, ...], repair: bool,
         moved: list[str]) -> list[tuple[PartRead, pa.Array]]:
    good = []
    for read in reads:
        if read.gone:
            continue
        if read.error is not None:
            name = _relative(read.file)
            if repair:
                to = out.move_aside(name, QUARANTINE_DIR)
                logger.warning("%s is not whole Parquet (%s): moved aside to %s; its rows will be embedded again",
                               read.file, read.error, to)
            else:
                logger.warning("%s is not whole Parquet (%s): a run moves it aside and embeds its rows again", read.file, read.error)
            moved.append(name)
            continue
        _check_schema(out, read, recipe, columns)
        try:
            ids = pa.concat_arrays([c.cast(id_type) for c in read.table.column("id").chunks]) if read.table.num_rows else pa.array([], type=id_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise OutputError(f"{read.file}: its ids ({read.schema.field('id').type}) do not convert to the manifest's id type "
                              f"{id_type}: {e}") from e
        good.append((read, ids))
    return good


def _check_schema(out: OutputDir, read: PartRead, recipe: Recipe | None, columns: tuple[str, ...]) -> None:
    schema = read.schema
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise OutputError(f"{read.file} is not a file of this output: it lacks {missing} (it has {schema.names}); move it away")
    if "embedding" in columns:
        t = schema.field("embedding").type
        width = recipe.d_model if recipe is not None else None
        if not pa.types.is_fixed_size_list(t) or (width is not None and t.list_size != width):
            raise OutputError(f"{read.file} is not a part of this output: its embedding is {t}, this output's are "
                              f"{width}-wide vectors; move it away")
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if recipe is not None:
        try:
            theirs = Recipe.from_dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError):
            theirs = None
        diff = recipe.differences(theirs) if theirs is not None else ["no recipe in its metadata"]
        if diff:
            raise OutputError(f"{read.file} was not written with this output's recipe ({'; '.join(diff)}); move it away")


def _refuse_duplicates(out: OutputDir, reads: list[tuple[PartRead, pa.Array]]) -> None:
    if len(reads) < 2:
        return
    frame = pl.concat([pl.DataFrame({"id": pl.Series(ids).cast(pl.String), "file": i}) for i, (_, ids) in enumerate(reads) if len(ids)])
    twice = frame.group_by("id").agg(pl.col("file").unique().sort()).filter(pl.col("file").list.len() > 1)
    if len(twice):
        row = twice.row(0, named=True)
        a, b = (reads[i][0].file for i in row["file"][:2])
        raise OutputError(f"id {row['id']!r} is committed twice, in {a} and in {b} ({len(twice)} such id(s)): a file was copied or "
                          "planted; move the one that does not belong away, and rerun")


def _relative(file) -> str:
    """`folder/name` of a listed file (embeddings/..., failures/...)."""
    parts = str(file).replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else basename(file)
