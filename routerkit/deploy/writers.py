"""What ``routerkit predict`` writes: a mask and a routing overlay PNG per input, and one ``predictions.csv``.

`predict_files` routes image files one at a time with a `RoutedModel` and writes, into one folder:

- ``<stem>_mask.png``: the predicted class of every pixel, as the pixel values of the data set's
  masks (`routerkit.data.spec.FileFormat.mask_value`), 8-bit when the run's values fit, else 16-bit;
- ``<stem>_routing.png``: the input in grayscale with each unit tinted by the model that answered it
  (the colours of the run's routing figure, `routerkit.plots.model_colours`), small inputs enlarged
  (nearest neighbour), with a legend;
- ``predictions.csv``: one row per file read (size, windows, share of units per model, GFLOPs);
  classification runs write only this file, with the label, class name and model of each input.

Every file is written atomically (temporary file and rename); a file that cannot be read is
reported and skipped, the others are still written.

Example:
    >>> import routerkit  # doctest: +SKIP
    >>> model = routerkit.load("runs/battery")  # doctest: +SKIP
    >>> report = predict_files(model, ["scans/"], "runs/battery/predictions")  # doctest: +SKIP
    >>> report.csv, report.failed  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from routerkit._io import atomic_write_bytes
from routerkit.data.spec import DataSpec
from routerkit.deploy.inputs import IMAGE_SUFFIXES, read_file

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from routerkit.deploy.model import Prediction, RoutedModel

__all__ = [
    "CSV_NAME",
    "GFLOPS_COLUMN",
    "MAX_OVERLAY_SIDE",
    "MIN_OVERLAY_SIDE",
    "TINT_ALPHA",
    "PredictReport",
    "collect_inputs",
    "mask_pixels",
    "output_stems",
    "predict_files",
    "routing_overlay_pixels",
    "write_csv",
    "write_png",
]

#: Name of the table `predict_files` writes.
CSV_NAME = "predictions.csv"
#: Header of the GFLOPs column (every pass that ran, per input).
GFLOPS_COLUMN = "GFLOPs (fvcore: 1 multiply-add = 1 flop)"
#: Overlays of smaller inputs are enlarged (an integer factor, nearest neighbour) to at least this short side...
MIN_OVERLAY_SIDE = 256
#: ... unless that would make the long side exceed this.
MAX_OVERLAY_SIDE = 4096
#: Opacity of a unit's model colour over the grayscale input (as the run's routing figure).
TINT_ALPHA = 0.35

_GLOB_CHARS = "*?["
_SUFFIXES = ", ".join(IMAGE_SUFFIXES)


@dataclass
class PredictReport:
    """What `predict_files` did.

    Attributes:
        out_dir: The output folder.
        task: The run's task (``"segmentation"`` or ``"classification"``).
        model_names: Name of each model index.
        rows: One row of ``predictions.csv`` per file predicted (column -> value).
        failed: ``(file, why)`` of every file that could not be predicted (skipped).
        renamed: ``(file, stem)`` of the files whose stem another input has too, written as ``stem``.
        csv: The table written, or ``None`` when no file was predicted.
    """

    out_dir: Path
    task: str
    model_names: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    renamed: list[tuple[Path, str]] = field(default_factory=list)
    csv: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether every file was predicted."""
        return not self.failed


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _expand(item: str) -> list[Path]:
    """The files one command-line input stands for."""
    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_image(p))
        if not files:
            raise ValueError(
                f"Expected image files ({_SUFFIXES}) in folder {path} but it holds none (subfolders are not searched)."
            )
        return files
    if path.exists():
        return [path]
    if any(ch in item for ch in _GLOB_CHARS):
        matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
        files = [m for m in matches if _is_image(m)]
        if not files:
            found = f"only {len(matches)} other file(s) or folder(s)" if matches else "nothing"
            raise ValueError(f"Expected the glob {item!r} to match image files ({_SUFFIXES}) but it matched {found}.")
        return files
    raise ValueError(f"Expected an image file, a folder or a glob but {path} does not exist.")


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders and globs as the list of files they name, in order, each file once.

    A folder gives its image files (`IMAGE_SUFFIXES <routerkit.deploy.inputs.IMAGE_SUFFIXES>`,
    hidden files skipped, subfolders not searched), sorted by name. A glob (a path that does not
    exist and holds ``*``, ``?`` or ``[``; ``**`` searches subfolders) gives the image files it
    matches, sorted. A file is kept whatever its type (reading it reports an unsupported one). A
    file reached twice is kept at its first place.

    Args:
        inputs: Files, folders and globs.

    Returns:
        The files.

    Raises:
        ValueError: No inputs, a path that does not exist, a folder without image files or a glob
            that matches none; the message names it.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("Expected at least one input file, folder or glob but got none.")
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        for file in _expand(str(item)):
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                out.append(file)
    return out


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One distinct output stem per file: its own, suffixed ``_2``, ``_3``... where stems collide.

    Stems are compared case-insensitively (as some file systems compare names), so ``a/x.png``,
    ``b/x.png`` and ``c/X.tif`` become ``x``, ``x_2`` and ``X_3``. A suffix never takes the stem of
    another input.
    """
    taken = {p.stem.lower() for p in paths}
    used: set[str] = set()
    stems = []
    for path in paths:
        stem = path.stem
        if stem.lower() in used:
            k = 2
            while f"{stem}_{k}".lower() in used or f"{stem}_{k}".lower() in taken:
                k += 1
            stem = f"{stem}_{k}"
        used.add(stem.lower())
        stems.append(stem)
    return stems


def _mask_table(spec: DataSpec) -> np.ndarray:
    """``[K]`` pixel value of each class id, uint8 when every value fits in 8 bits, else uint16."""
    values = [spec.file_format.mask_value(k) for k in range(spec.num_classes)]
    return np.asarray(values, dtype=np.uint8 if max(values) <= 255 else np.uint16)


def mask_pixels(pred: Tensor, spec: DataSpec) -> np.ndarray:
    """Predicted class ids ``[H, W]`` as the pixel values of a mask file.

    Class ids go through the run's `FileFormat.mask_value <routerkit.data.spec.FileFormat.mask_value>`
    (e.g. 0 / 255 / 128 for the battery scans). The dtype is uint8 when every class's value fits in
    8 bits, else uint16: the same for every file of a run.

    Raises:
        ValueError: ``pred`` is not ``[H, W]`` or holds ids outside the run's classes.
    """
    ids = pred.detach().cpu().numpy()
    if ids.ndim != 2:
        raise ValueError(f"Expected a mask of class ids [H, W] but got shape {list(ids.shape)}.")
    if ids.size and (ids.min() < 0 or ids.max() >= spec.num_classes):
        raise ValueError(f"Expected class ids in 0..{spec.num_classes - 1} but got {int(ids.min())}..{int(ids.max())}.")
    return _mask_table(spec)[ids]


def _overlay_scale(height: int, width: int) -> int:
    """The integer enlargement of an overlay: short side at least `MIN_OVERLAY_SIDE`, long side at most `MAX_OVERLAY_SIDE`."""
    want = -(-MIN_OVERLAY_SIDE // min(height, width))
    return max(1, min(want, MAX_OVERLAY_SIDE // max(height, width)))


def routing_overlay_pixels(
    image: Tensor,
    routing_map: Tensor,
    unit_size: tuple[int, int],
    model_names: Sequence[str],
    legend: bool = True,
) -> np.ndarray:
    """The input in grayscale with each unit tinted by the model that answered it, as RGB ``[H', W', 3]`` uint8.

    Args:
        image: The input ``[C, H, W]`` (any scale: shown min-max normalised, channels averaged).
        routing_map: Model index of each unit ``[R, C]`` (units of ``unit_size`` pixels, row-major
            from the top left; the last row and column may be cut by the image's border).
        unit_size: ``(height, width)`` of a unit in pixels.
        model_names: Name of each model index (the legend; fixes the colours).
        legend: Add the legend below the image.

    Returns:
        The overlay, enlarged by an integer factor (nearest neighbour) so that its short side is
        at least `MIN_OVERLAY_SIDE` pixels, the legend below it.

    Raises:
        ValueError: Shapes that do not fit, or model indices outside ``model_names``.
    """
    from routerkit.plots import model_colours

    if image.dim() != 3 or routing_map.dim() != 2:
        raise ValueError(
            f"Expected an image [C, H, W] and a routing map [R, C] but got shapes {list(image.shape)} "
            f"and {list(routing_map.shape)}."
        )
    units = routing_map.detach().cpu().long().numpy()
    if units.size == 0 or units.min() < 0 or units.max() >= len(model_names):
        raise ValueError(f"Expected model indices in 0..{len(model_names) - 1} in the routing map.")
    gray = image.detach().cpu().float().mean(0).numpy()
    low, high = float(gray.min()), float(gray.max())
    gray = (gray - low) / max(high - low, 1e-8)
    height, width = gray.shape
    rows = np.minimum(np.arange(height) // unit_size[0], units.shape[0] - 1)
    cols = np.minimum(np.arange(width) // unit_size[1], units.shape[1] - 1)
    colours = np.asarray(model_colours(len(model_names)), dtype=np.float32)
    tint = colours[units[rows][:, cols]]  # [H, W, 3]
    rgb = (1.0 - TINT_ALPHA) * gray[..., None] + TINT_ALPHA * tint
    scale = _overlay_scale(height, width)
    pixels = np.round(255.0 * rgb).clip(0, 255).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
    return _with_legend(pixels, model_names, colours) if legend else pixels


def _with_legend(pixels: np.ndarray, names: Sequence[str], colours: np.ndarray) -> np.ndarray:
    """``pixels`` with a white strip below: a colour box and the name of each model, wrapped to the width."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width, pad, box = pixels.shape[1], 4, 10
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = max(box, *(int(probe.textbbox((0, 0), name, font=font)[3]) for name in names)) + pad
    places, x, y = [], pad, pad
    for name in names:
        entry = box + pad + int(probe.textlength(name, font=font)) + 3 * pad
        if x + entry > width and x > pad:
            x, y = pad, y + line
        places.append((x, y))
        x += entry
    strip = Image.new("RGB", (width, y + line + pad), "white")
    draw = ImageDraw.Draw(strip)
    for (x, y), name, colour in zip(places, names, colours, strict=True):
        red, green, blue = (int(v) for v in np.round(255 * colour))
        draw.rectangle((x, y, x + box, y + box), fill=(red, green, blue), outline="black")
        draw.text((x + box + pad, y), name, fill="black", font=font)
    return np.concatenate([pixels, np.asarray(strip, dtype=np.uint8)], axis=0)


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` as a PNG atomically (temporary file and rename).

    Args:
        path: The file.
        pixels: ``[H, W]`` uint8 (8-bit grayscale) or uint16 (16-bit grayscale), or ``[H, W, 3]`` uint8 (RGB).

    Returns:
        ``path``.

    Raises:
        ValueError: Another shape or dtype.
    """
    from PIL import Image

    if pixels.ndim == 2 and pixels.dtype in (np.uint8, np.uint16):
        image = Image.fromarray(np.ascontiguousarray(pixels))
    elif pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8:
        image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    else:
        raise ValueError(
            f"Expected [H, W] uint8 / uint16 or [H, W, 3] uint8 pixels for {path} but got {pixels.dtype} "
            f"of shape {list(pixels.shape)}."
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows (column -> value, the columns of the first row) as a CSV file atomically.

    Floats are written with 6 significant digits.

    Returns:
        ``path``.

    Raises:
        ValueError: No rows.
    """
    if not rows:
        raise ValueError(f"Expected at least one row to write to {path} but got none.")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format(v, ".6g") if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_bytes(Path(path), text.getvalue().encode("utf-8"))
    return Path(path)


def _outputs(stems: Sequence[str], out_dir: Path, spatial: bool) -> list[tuple[Path, ...]]:
    return [(out_dir / f"{s}_mask.png", out_dir / f"{s}_routing.png") if spatial else () for s in stems]


def _check_outputs(outputs: list[tuple[Path, ...]], table: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs that would replace an input, or (without ``overwrite``) an existing file."""
    targets = [p for files in outputs for p in files] + [table]
    sources = {p.resolve() for p in inputs}
    clash = [p for p in targets if p.resolve() in sources]
    if clash:
        raise ValueError(
            f"Expected outputs that do not replace an input but {clash[0]} is an input file; choose another output folder."
        )
    if overwrite:
        return
    existing = [p for p in targets if p.exists()]
    if existing:
        listed = ", ".join(p.name for p in existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise FileExistsError(
            f"Expected no earlier predictions in {existing[0].parent} but {len(existing)} of the files to write exist "
            f"({listed}); pass --overwrite (Python: overwrite=True) to replace them, or choose another output folder."
        )


def _one(value: Tensor | list[Tensor] | None) -> Tensor:
    """The first (only) input's entry of a `Prediction` field."""
    assert value is not None
    return value[0]


def _row(path: Path, out: Prediction, files: tuple[Path, ...]) -> dict[str, Any]:
    """The ``predictions.csv`` row of one file."""
    share = out.usage()[0]
    if not files:  # classification
        label = int(_one(out.pred))
        model = out.model_names[int(share.argmax())]
        return {
            "file": str(path),
            "label": label,
            "class": out.class_names[label],
            "model": model,
            GFLOPS_COLUMN: float(out.gflops[0]),
        }
    height, width = _one(out.pred).shape
    row: dict[str, Any] = {
        "file": str(path),
        "mask": files[0].name,
        "routing": files[1].name,
        "height": int(height),
        "width": int(width),
        "windows": out.windows[0],
    }
    row.update({f"share_{name}": float(share[k]) for k, name in enumerate(out.model_names)})
    row[GFLOPS_COLUMN] = float(out.gflops[0])
    return row


@contextlib.contextmanager
def _progress(console: Console | None, total: int) -> Iterator[tuple[Progress | None, Any]]:
    if console is None:
        yield None, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold blue]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as progress:
        yield progress, progress.add_task("", total=total)


def predict_files(
    model: RoutedModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    overwrite: bool = False,
    console: Console | None = None,
) -> PredictReport:
    """Route image files and write their masks, routing overlays and ``predictions.csv`` to ``out_dir``.

    Files are routed one at a time (``model.predict(path)``: a file's result does not depend on
    the others), so a file that cannot be read (corrupt, unsupported, other channels than the run)
    is recorded in ``failed`` and skipped while the others are written. Inputs of another size than
    the trained one are tiled (`RoutedModel.predict`); ``windows`` counts the windows each took.
    Every file is written atomically; ``predictions.csv`` last, with the files predicted (also when
    interrupted).

    Args:
        model: The routed model (`routerkit.load`).
        inputs: Image files, folders and globs (`collect_inputs`).
        out_dir: The output folder (created).
        batch_size: Windows routed together (a large file's windows are batched).
        overwrite: Replace the files of an earlier prediction; otherwise refuse before writing
            anything when one of the files to write exists.
        console: Show a progress bar over the files on this console.

    Returns:
        The `PredictReport`.

    Raises:
        ValueError: Bad inputs (`collect_inputs`), ``batch_size < 1``, or an output that would
            replace an input.
        FileExistsError: A file to write exists and ``overwrite`` is not set.
    """
    from rich.markup import escape

    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1 but got {batch_size}.")
    paths = collect_inputs(inputs)
    spec = model.spec
    folder = Path(out_dir)
    stems = output_stems(paths)
    outputs = _outputs(stems, folder, spec.spatial)
    table = folder / CSV_NAME
    _check_outputs(outputs, table, paths, overwrite)
    report = PredictReport(folder, spec.task, model.model_names)
    if spec.spatial:  # classification writes no file per input
        report.renamed = [(p, s) for p, s in zip(paths, stems, strict=True) if s != p.stem]
    grid = model.pipeline.partitioner.grid_shape
    unit = (spec.input_shape[-2] // grid[0], spec.input_shape[-1] // grid[1]) if spec.spatial else (1, 1)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _progress(console, len(paths)) as (bar, task):
            for path, files in zip(paths, outputs, strict=True):
                if bar is not None:
                    bar.update(task, description=escape(path.name))
                try:
                    out = model.predict(str(path), batch_size=batch_size)
                    if files:
                        image = read_file(path, spec)  # the pixels under the overlay (read as predict read them)
                except (ValueError, TypeError, OSError) as err:
                    report.failed.append((path, str(err)))
                else:
                    if files:
                        write_png(files[0], mask_pixels(_one(out.pred), spec))
                        write_png(files[1], routing_overlay_pixels(image, _one(out.routing_map), unit, out.model_names))
                    report.rows.append(_row(path, out, files))
                if bar is not None:
                    bar.advance(task)
            if bar is not None:
                bar.update(task, description=f"{len(report.rows)} predicted, {len(report.failed)} failed")
    finally:
        if report.rows:
            report.csv = write_csv(table, report.rows)
    return report
