"""A look at an output directory after a run: what was computed, what failed, what came out.

`summarize(dir)` reads the recipe, the committed parts and the failure records (grouped by their
`error_kind`) and returns plain numbers; `render(summary)` turns them into the few lines an
operator reads after a nightly run; `plot(dir, png)` draws durations, failures by kind and a 2-D
PCA of a sample of the embeddings.

Only the columns a figure needs are read, one record batch at a time, so a frame-level output
(`frames` is ~750x the size of `embedding`) costs no more to inspect than a pooled one, and
memory stays bounded however many rows the output holds. Nothing here writes into the directory
or takes its lock: inspecting a run in progress is safe and shows what is committed so far.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..output.layout import FAILURES_DIR, LAYOUT_VERSION, RUN_FILE, SHARDS_DIR, SUCCESS_FILE, OutputDir
from ..output.storage import TMP_DIR, OutputError
from ..recipe import METADATA_KEY, Recipe

logger = logging.getLogger(__name__)

BATCH_ROWS = 4096  # rows per record batch read: 4096 x 1280 float32 is 21 MB
EXAMPLE_IDS = 5  # ids listed for each kind of bad vector
ERROR_EXAMPLE_CHARS = 110  # an error message is cut to this in the text output
TOP_CATEGORIES = 9  # categories with their own colour in the PCA; the rest are "other"
PLOT_SEED = 0  # the PCA sample is the same on every call
FIGURE_SIZE_IN = (16.0, 4.8)
FIGURE_DPI = 100  # 1600 x 480 pixels
WINDOW_SECONDS = 30  # drawn on the duration histogram: audio past it takes another encoder window
PLOT_EXTRA = "pip install 'qwen2-audio-embeddings[plot]'"  # --plot's matplotlib is an extra (issue 12)


class InspectError(Exception):
    """The directory is not an output of the job, or the request does not fit it (exit 2)."""


@dataclass(frozen=True)
class _Layout:
    root: Path
    parts: list[Path]
    failures: list[Path]


def _layout(directory: str | Path) -> _Layout:
    root = Path(directory)
    if not root.exists():
        raise InspectError(f"{root} does not exist")
    if not root.is_dir():
        raise InspectError(f"{root} is not a directory")
    out = OutputDir(root)
    try:
        version = out.layout_version()
    except OutputError as e:
        raise InspectError(str(e)) from e
    if version not in (None, LAYOUT_VERSION):
        raise InspectError(out.layout_refusal(version))
    parts, failures = out.part_files(), out.failure_files()
    if not (root / RUN_FILE).exists() and not parts and not failures:
        what = "is empty" if not any(root.iterdir()) else f"holds no {RUN_FILE}, embeddings/part-*.parquet or {FAILURES_DIR}/"
        raise InspectError(f"{root} {what}: not an output directory of extract-embeddings")
    return _Layout(root, parts, failures)


def _read_run_file(root: Path) -> tuple[dict | None, str | None]:
    path = root / RUN_FILE
    if not path.exists():
        return None, None
    try:
        payload = json.loads(path.read_text())
        return dict(payload["recipe"]), payload.get("created")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InspectError(f"cannot read {path}: {e}") from e


def _read_layout(root: Path) -> int | None:
    try:
        return json.loads((root / RUN_FILE).read_text()).get("num_shards")
    except (OSError, ValueError, AttributeError):
        return None


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise InspectError(f"cannot read {path}: {e}") from e


def _file_recipe(path: Path) -> dict | None:
    raw = (_read_schema(path).metadata or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError as e:
        raise InspectError(f"{path}: unreadable recipe in the Parquet metadata: {e}") from e


def _same_recipe(a: dict, b: dict) -> bool:
    """As the job compares them on resume: package_version and unknown keys do not count."""
    try:
        return not Recipe.from_dict(a).differences(Recipe.from_dict(b))
    except TypeError:  # a field missing: some other writer's recipe
        return a == b


def _check_part_schema(path: Path, needed: list[str]) -> pa.Schema:
    schema = _read_schema(path)
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise InspectError(f"{path} lacks column(s) {missing} (it has {schema.names}): not a part written by extract-embeddings")
    return schema


def _batches(path: Path, columns: list[str]):
    """Record batches of only `columns`; a damaged file becomes an InspectError naming it."""
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise InspectError(f"cannot read {path}: {e}") from e


def _vectors(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(valid (n,) bool, vectors (valid rows, d) float32) of a fixed_size_list column chunk.

    float16 is widened first: squares of fp16 values overflow at 256 and would make norms Inf.
    """
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    d = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)  # null slots are dropped
    return valid, flat.astype(np.float32, copy=False).reshape(-1, d)


_DTYPE_NAMES = {pa.float32(): "float32", pa.float16(): "float16", pa.float64(): "float64"}  # arrow says "float", "halffloat"


def _quantiles(values: np.ndarray) -> dict:
    return {
        "count": int(len(values)),
        "min": float(values.min()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def error_type(error: str | None) -> str:
    """"DecodeError: cannot decode ..." -> "DecodeError": the kind of a failure record written
    before records had an `error_kind` column (every `error` is written "Kind: message")."""
    if not error:
        return "(no message)"
    kind, sep, _ = error.partition(":")
    return kind.strip() if sep and kind.strip() else "(unlabelled)"


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def summarize(directory: str | Path) -> dict:
    """Plain, JSON-serialisable numbers about an output directory. Raises InspectError."""
    lay = _layout(directory)
    recipe, created = _read_run_file(lay.root)
    mismatched = []
    for f in lay.parts + lay.failures:
        r = _file_recipe(f)
        if recipe is None and r is not None:
            recipe = r  # no _run.json (copied parts?): the parts carry the recipe too
        if r is not None and not _same_recipe(r, recipe):
            mismatched.append(str(f.relative_to(lay.root)))

    markers = sorted((lay.root / SHARDS_DIR).glob("*.done"))
    # A lock file exists only while a run holds it, or after a run that died (its next run takes it over).
    locks = {p.name: p.read_text(errors="replace").strip() for p in sorted((lay.root / SHARDS_DIR).glob("*.lock"))}
    layout = _read_layout(lay.root)
    summary: dict = {
        "directory": str(lay.root),
        "complete": (lay.root / SUCCESS_FILE).exists(),
        "shard_markers": len(markers),
        "shards": layout,
        "locks_held": {k: v for k, v in locks.items() if v},
        "tmp_files": len(list((lay.root / TMP_DIR).glob("*"))) if (lay.root / TMP_DIR).is_dir() else 0,
        "recipe": recipe,
        "created": created,
        "recipe_mismatch": mismatched,
        "part_files": len(lay.parts),
        "failure_files": len(lay.failures),
    }
    summary.update(_summarize_parts(lay.parts))
    summary.update(_summarize_failures(lay.failures))
    total = summary["rows"] + summary["failed"]
    summary["failure_rate"] = summary["failed"] / total if total else 0.0
    return summary


def _summarize_parts(parts: list[Path]) -> dict:
    durations: list[np.ndarray] = []
    norms: list[np.ndarray] = []
    nonfinite: list = []
    zero: list = []
    n_nonfinite = n_zero = n_null = 0
    schema = None
    for f in parts:
        schema = _check_part_schema(f, ["id", "embedding", "duration_s"])
        for batch in _batches(f, ["id", "embedding", "duration_s"]):
            durations.append(batch.column("duration_s").to_numpy(zero_copy_only=False))
            valid, x = _vectors(batch.column("embedding"))
            ids = batch.column("id")
            n_null += int((~valid).sum())
            finite = np.isfinite(x).all(axis=1)
            zeros = finite & (x == 0).all(axis=1)
            norms.append(np.linalg.norm(x[finite].astype(np.float64), axis=1))
            valid_rows = np.flatnonzero(valid)
            for mask, ids_out in ((~finite, nonfinite), (zeros, zero)):
                hits = valid_rows[mask]
                if len(ids_out) < EXAMPLE_IDS and len(hits):
                    ids_out.extend(ids.take(pa.array(hits[: EXAMPLE_IDS - len(ids_out)])).to_pylist())
            n_nonfinite += int((~finite).sum())
            n_zero += int(zeros.sum())
    dur = np.concatenate(durations) if durations else np.zeros(0)
    nrm = np.concatenate(norms) if norms else np.zeros(0)
    out: dict = {
        "rows": int(len(dur)),
        "columns": list(schema.names) if schema is not None else [],
        "embedding_dtype": None,
        "d_model": None,
        "frames": schema is not None and "frames" in schema.names,
        "duration": None,
        "norm": None,
        "null_embeddings": n_null,
        "nonfinite": {"count": n_nonfinite, "ids": nonfinite},
        "zero": {"count": n_zero, "ids": zero},
    }
    if schema is not None:
        emb = schema.field("embedding").type
        out["embedding_dtype"] = _DTYPE_NAMES.get(emb.value_type, str(emb.value_type))
        out["d_model"] = emb.list_size
    if len(dur):
        out["duration"] = {**_quantiles(dur), "total_hours": float(dur.sum() / 3600)}
    if len(nrm):
        out["norm"] = {**_quantiles(nrm), "mean": float(nrm.mean())}
    return out


def _summarize_failures(failures: list[Path]) -> dict:
    counts: Counter = Counter()
    examples: dict[str, tuple] = {}
    for f in failures:
        has_kind = "error_kind" in _read_schema(f).names
        for batch in _batches(f, ["id", "error"] + (["error_kind"] if has_kind else [])):
            errors = batch.column("error").to_pylist()
            kinds = batch.column("error_kind").to_pylist() if has_kind else [error_type(e) for e in errors]
            for rid, err, kind in zip(batch.column("id").to_pylist(), errors, kinds):
                kind = kind or "(no kind)"
                counts[kind] += 1
                examples.setdefault(kind, (rid, err))
    return {
        "failed": sum(counts.values()),
        "failures_by_type": [
            {"type": kind, "count": n, "example_id": examples[kind][0], "example_error": examples[kind][1]}
            for kind, n in counts.most_common()
        ],
    }


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _secs(x: float) -> str:
    if x < 60:
        return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"
    if x < 3600:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def _num(x: float) -> str:
    return f"{x:.4g}"


def _cut(text: str, n: int = ERROR_EXAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


_RECIPE_SHOWN = {
    "model_fingerprint", "adapter_fingerprint", "d_model", "dtype", "padding_mask", "pooling",
    "output_dtype", "windowing", "recipe_version", "package_version",
}


def render(s: dict) -> str:
    """The summary as aligned `label  value` lines, for a terminal or a log."""
    lines: list[tuple[str, str]] = []
    status = "complete (_SUCCESS)" if s["complete"] else "INCOMPLETE (no _SUCCESS)"
    if s["shards"] and s["shards"] > 1:
        status += f", {s['shard_markers']}/{s['shards']} shards done"
    lines.append(("output", f"{s['directory']}  {status}"))
    for name, holder in s["locks_held"].items():
        lines.append(("", f"{name} held: {_cut(holder, 90)} (a live run, or one that was killed)"))

    r = s["recipe"]
    if r is None:
        lines.append(("recipe", "none found (no _run.json and no recipe in the parts' metadata)"))
    else:
        fp = lambda v: v[:12] if v else "none"  # noqa: E731
        lines.append(("recipe", (
            f"model {fp(r.get('model_fingerprint'))}  adapter {fp(r.get('adapter_fingerprint'))}  "
            f"d_model {r.get('d_model')}  compute {r.get('dtype')}  mask {'on' if r.get('padding_mask') else 'OFF'}"
        )))
        lines.append(("", (
            f"pooling {r.get('pooling')}  output {r.get('output_dtype')}  {r.get('windowing')}  "
            f"recipe v{r.get('recipe_version')}  package {r.get('package_version') or '?'}"
            + (f"  created {s['created']}" if s.get("created") else "")
        )))
        # Fields added to the recipe later are shown too: every one of them changes the numbers.
        rest = [f"{k} {v}" for k, v in sorted(r.items()) if k not in _RECIPE_SHOWN]
        if rest:
            lines.append(("", "  ".join(rest)))
    if s["recipe_mismatch"]:
        lines.append(("", f"WARNING: {len(s['recipe_mismatch'])} file(s) carry another recipe, e.g. {s['recipe_mismatch'][0]}"))

    total = s["rows"] + s["failed"]
    rows = f"{s['rows']:,} embedded, {s['failed']:,} failed ({100 * s['failure_rate']:.2f}%) of {total:,}"
    rows += f"  [{s['part_files']} part(s), {s['failure_files']} failure file(s)"
    if s["embedding_dtype"]:
        rows += f", {s['embedding_dtype']}[{s['d_model']}]" + (" + frames" if s["frames"] else "")
    rows += "]"
    lines.append(("rows", rows))
    if s["tmp_files"]:
        lines.append(("", f"{s['tmp_files']} file(s) in {TMP_DIR}/: a run in progress, or left by a killed one"))

    if not s["failures_by_type"]:
        lines.append(("failures", "none"))
    else:
        width = max(len(f["type"]) for f in s["failures_by_type"])
        count_w = max(len(f"{f['count']:,}") for f in s["failures_by_type"])
        for i, f in enumerate(s["failures_by_type"]):
            message = (f["example_error"] or "").partition(":")[2] or f["example_error"] or ""
            lines.append(("failures" if i == 0 else "", f"{f['count']:>{count_w},}  {f['type']:<{width}}  e.g. {_cut(message)}"))

    d = s["duration"]
    if d is None:
        lines.append(("duration", "no embedded rows"))
    else:
        lines.append(("duration", (
            f"{d['total_hours']:.3f} h in {d['count']:,} rows   min {_secs(d['min'])}  p50 {_secs(d['p50'])}  "
            f"p90 {_secs(d['p90'])}  max {_secs(d['max'])}"
        )))
    n = s["norm"]
    if n is not None:
        lines.append(("norm", f"min {_num(n['min'])}  p50 {_num(n['p50'])}  p90 {_num(n['p90'])}  max {_num(n['max'])}  mean {_num(n['mean'])}"))

    if s["rows"]:
        bad = []
        for key, label in (("nonfinite", "NaN/Inf"), ("zero", "all-zero")):
            k = s[key]
            bad.append(f"{k['count']:,} {label}" + (f" (e.g. {', '.join(map(str, k['ids']))})" if k["ids"] else ""))
        if s["null_embeddings"]:
            bad.append(f"{s['null_embeddings']:,} null")
        flag = "ok" if not (s["nonfinite"]["count"] or s["zero"]["count"] or s["null_embeddings"]) else "CHECK"
        lines.append(("vectors", f"{flag}: " + ", ".join(bad)))

    label_w = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{label_w}}  {value}".rstrip() for label, value in lines)


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def _sample(parts: list[Path], color_by: str | None, sample: int) -> tuple[np.ndarray, pa.Array | None]:
    """(embeddings (n, d) float64, colour values or None) of up to `sample` rows, drawn uniformly."""
    total = sum(pq.read_metadata(f).num_rows for f in parts)
    if not total or sample <= 0:
        return np.zeros((0, 0)), None
    chosen = np.sort(np.random.default_rng(PLOT_SEED).choice(total, size=min(sample, total), replace=False))
    columns = ["embedding"] + ([color_by] if color_by else [])
    xs, colors = [], []
    offset = 0
    for f in parts:
        for batch in _batches(f, columns):
            lo, hi = np.searchsorted(chosen, [offset, offset + batch.num_rows])
            offset += batch.num_rows
            if lo == hi:
                continue
            picked = batch.take(pa.array(chosen[lo:hi] - (offset - batch.num_rows)))
            valid, x = _vectors(picked.column("embedding"))
            finite = np.isfinite(x).all(axis=1)
            xs.append(x[finite].astype(np.float64))
            if color_by:
                colors.append(picked.column(color_by).filter(pa.array(valid)).filter(pa.array(finite)))
    x = np.concatenate(xs) if xs else np.zeros((0, 0))
    return x, (pa.concat_arrays([c.cast(colors[0].type) for c in colors]) if colors else None)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) projections on the two main axes and their fractions of the variance (numpy SVD)."""
    centred = x - x.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    var = sv**2
    explained = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    proj = centred @ vt[:2].T
    if proj.shape[1] < 2:  # d_model 1, or a single component
        proj = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1])))
        explained = np.pad(explained, (0, 2 - len(explained)))
    return proj, explained


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _empty_panel(ax, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _matplotlib_canvas():
    """matplotlib's (Figure, FigureCanvasAgg, MaxNLocator), or InspectError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise InspectError(f"--plot needs matplotlib ({e}): {PLOT_EXTRA}") from e
    return Figure, FigureCanvasAgg, MaxNLocator


def check_plot_request(directory: str | Path, png_path: str | Path, color_by: str | None) -> _Layout:
    """Raise InspectError if `plot` cannot do this (so a CLI can refuse before printing anything)."""
    _matplotlib_canvas()
    lay = _layout(directory)
    png_path = Path(png_path)
    if not png_path.parent.is_dir():
        raise InspectError(f"cannot write {png_path}: {png_path.parent} is not a directory")
    if color_by is not None:
        if color_by in ("embedding", "frames"):
            raise InspectError(f"cannot colour by {color_by!r}: it is a vector column")
        for f in lay.parts:
            names = _read_schema(f).names
            if color_by not in names:
                usable = [c for c in names if c not in ("embedding", "frames")]
                raise InspectError(f"cannot colour by {color_by!r}: not a column of the output (it has {usable})")
    return lay


def plot(directory: str | Path, png_path: str | Path, color_by: str | None = None, sample: int = 2000) -> Path:
    """Draw a PNG: duration histogram, failures by type, 2-D PCA of `sample` embeddings.

    color_by names a column of the parts (a kept manifest column, or duration_s): categorical
    values get a legend of the TOP_CATEGORIES most frequent, numeric ones a colorbar.
    Uses matplotlib's Agg canvas directly (no pyplot), so no display and no global backend switch.
    """
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib_canvas()
    lay = check_plot_request(directory, png_path, color_by)
    png_path = Path(png_path)
    durations = []
    for f in lay.parts:
        _check_part_schema(f, ["embedding", "duration_s"])
        durations.extend(b.column("duration_s").to_numpy(zero_copy_only=False) for b in _batches(f, ["duration_s"]))
    dur = np.concatenate(durations) if durations else np.zeros(0)
    fails = _summarize_failures(lay.failures)
    x, colors = _sample(lay.parts, color_by, sample)

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_dur, ax_fail, ax_pca = fig.subplots(1, 3, width_ratios=[1.0, 1.0, 1.25])
    fig.suptitle(f"{lay.root}  —  {len(dur):,} embedded, {fails['failed']:,} failed", fontsize=11)

    if len(dur):
        ax_dur.hist(dur, bins=min(60, max(10, int(np.sqrt(len(dur))))), color="tab:blue", edgecolor="white")
        for k in range(1, int(dur.max() // WINDOW_SECONDS) + 1):
            if k > 8:
                break
            ax_dur.axvline(k * WINDOW_SECONDS, color="0.6", linestyle=":", linewidth=1)
        ax_dur.set_title(f"duration ({dur.sum() / 3600:.2f} h; dotted: {WINDOW_SECONDS} s windows)")
        ax_dur.set_xlabel("seconds")
        ax_dur.set_ylabel("rows")
        ax_dur.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _empty_panel(ax_dur, "duration", "no embedded rows")

    if fails["failures_by_type"]:
        by = fails["failures_by_type"][:12][::-1]  # largest on top
        ax_fail.barh([f["type"] for f in by], [f["count"] for f in by], color="firebrick", height=0.6)
        ax_fail.set_ylim(-0.5 - max(0, 3 - len(by)) / 2, len(by) - 0.5 + max(0, 3 - len(by)) / 2)  # few bars stay slim
        ax_fail.xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, f in enumerate(by):
            ax_fail.text(f["count"], i, f" {f['count']:,}", va="center", fontsize=9)
        ax_fail.set_title(f"failures by type ({fails['failed']:,})")
        ax_fail.set_xlabel("rows")
        ax_fail.margins(x=0.15)
    else:
        _empty_panel(ax_fail, "failures by type", "no failures")

    if len(x) >= 2:
        proj, explained = pca_2d(x)
        _scatter(fig, ax_pca, proj, colors, color_by)
        ax_pca.set_title(f"PCA of {len(x):,} sampled embeddings" + (f", coloured by {color_by}" if color_by else ""))
        ax_pca.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
        ax_pca.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    else:
        _empty_panel(ax_pca, "PCA of embeddings", "fewer than 2 finite embeddings")

    fig.savefig(png_path)
    logger.info("wrote %s", png_path)
    return png_path


def _scatter(fig, ax, proj: np.ndarray, colors: pa.Array | None, color_by: str | None) -> None:
    size = 12 if len(proj) > 500 else 24
    if colors is None:
        ax.scatter(proj[:, 0], proj[:, 1], s=size, alpha=0.7, color="tab:blue", linewidths=0)
        return
    if _is_numeric(colors.type):
        values = np.asarray(colors.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        known = ~np.isnan(values)
        if (~known).any():
            ax.scatter(proj[~known, 0], proj[~known, 1], s=size, color="0.75", linewidths=0, label="(null)")
            ax.legend(loc="best", fontsize=8)
        sc = ax.scatter(proj[known, 0], proj[known, 1], c=values[known], s=size, cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, label=color_by)
        return
    labels = ["(null)" if v is None else str(v) for v in colors.to_pylist()]
    top = [v for v, _ in Counter(labels).most_common(TOP_CATEGORIES)]
    palette = [f"C{i}" for i in range(10)]
    rest = np.array([lab not in top for lab in labels])
    if rest.any():
        ax.scatter(proj[rest, 0], proj[rest, 1], s=size, color="0.75", linewidths=0, label=f"other ({int(rest.sum())})")
    arr = np.array(labels, dtype=object)
    for i, cat in enumerate(top):
        m = arr == cat
        ax.scatter(proj[m, 0], proj[m, 1], s=size, alpha=0.8, color=palette[i % 10], linewidths=0, label=f"{_cut(cat, 24)} ({int(m.sum())})")
    ax.legend(loc="best", fontsize=8, title=color_by, title_fontsize=8, markerscale=1.5)
