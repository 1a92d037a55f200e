"""Peak memory of `routerkit train` on Cityscapes-layout data at 512 x 1024, for two data set sizes.

Issue 15's check: with splits read lazily (``data.params.lazy: true``) and the replay tables and
distillation targets memory-mapped on disk (``run.cache_memory_gb``), peak resident memory must
not grow with the number of images. This script writes the synthetic Cityscapes fixture
(`cityscapes_plugin.fixture`, 3 train and 3 val cities) at 512 x 1024 for each ``--sizes`` (images
per city), trains `examples/cityscapes.yaml` on it with a small UNet zoo (the SegFormers of the
example would take hours on a CPU at this resolution) and one epoch per stage, once lazily with
spilling and once in memory (``--eager`` to include it), each in a fresh process, and samples the
process's ``/proc/<pid>/status`` every 20 ms:

- **peak RSS** (``VmHWM``): every resident page, including the pages of the memory-mapped tables
  that the kernel keeps in the page cache while it has memory to spare (reclaimable);
- **peak anonymous** (``RssAnon``): heap and tensors, the memory that cannot be paged back to a file;
- **peak file-backed** (``RssFile + RssShmem``): mapped files (libraries, the spilled tables).

Usage:
    python benchmarks/train_memory.py [--sizes 4 16] [--cache-gb 0.25] [--eager] [--workers 0] [--keep DIR]
        [--height 512] [--width 1024]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "cityscapes.yaml"


def _status(pid: int) -> dict[str, int]:
    """The kB fields of ``/proc/<pid>/status`` (empty once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0])
    except OSError:
        pass
    return out


def _run(cmd: list[str], cwd: Path) -> tuple[dict[str, float], float, str]:
    """Run ``cmd``, sampling its memory; peak MiB of VmHWM / RssAnon / file-backed, seconds and the output tail."""
    peaks = {"hwm": 0.0, "anon": 0.0, "file": 0.0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    while proc.poll() is None:
        s = _status(proc.pid)
        if s:
            peaks["hwm"] = max(peaks["hwm"], s.get("VmHWM", 0) / 1024)
            peaks["anon"] = max(peaks["anon"], s.get("RssAnon", 0) / 1024)
            peaks["file"] = max(peaks["file"], (s.get("RssFile", 0) + s.get("RssShmem", 0)) / 1024)
        time.sleep(0.02)
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    tail = "".join(lines[-25:])
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return peaks, seconds, tail


def _overrides(root: Path, images: int, lazy: bool, cache_gb: float, workers: int, size: tuple[int, int]) -> list[str]:
    items = [
        f"data.params.root={root}",
        f"data.params.height={size[0]}",
        f"data.params.width={size[1]}",
        f"data.params.num_train={images}",
        "data.params.num_val=2",
        f"data.params.num_test={min(4, images)}",
        f"data.params.lazy={str(lazy).lower()}",
        f"data.params.num_workers={workers}",
        "partitioner.params={rows: 2, cols: 4}",
        # a small UNet zoo: f_0 with a shared-trunk MC state, two costlier UNets on 256 x 256 patches
        "zoo.models.1={name: f1_unet, model: unet, params: {base_channels: 4, depth: 3}}",
        "zoo.models.2={name: f2_unet, model: unet, params: {base_channels: 8, depth: 3}}",
        "zoo.models.0.params={base_channels: 2, depth: 3, dropout: 0.1, dropout_at: head}",
        "training.pretrain_large={epochs: 1, lr: 0.001, batch_size: 2}",
        "training.pretrain_base={epochs: 1, lr: 0.01, batch_size: 2, beta: 0.01, teacher_batch: 2}",
        "training.policy={epochs: 1, lr: 0.005, batch_size: 2, cache_batch: 2}",
        "training.finetune={epochs: 1, lr: 0.0005, batch_size: 2, large_lr: 0.0002, large_on: routed}",
        "evaluation.batch_size=2",
        "evaluation.baselines=[single]",
        "run.checkpoint_every=1",
    ]
    if lazy:
        items.append(f"run.cache_memory_gb={cache_gb}")
    return [a for item in items for a in ("-s", item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="images per city (3 train cities)")
    parser.add_argument("--cache-gb", type=float, default=0.25, help="run.cache_memory_gb of the lazy runs")
    parser.add_argument("--eager", action="store_true", help="also train with the splits in memory (no spilling)")
    parser.add_argument("--workers", type=int, default=0, help="data.params.num_workers of the lazy runs")
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the fixtures and runs in")
    parser.add_argument("--height", type=int, default=512, help="image height (the check: 512)")
    parser.add_argument("--width", type=int, default=1024, help="image width (the check: 1024)")
    args = parser.parse_args()
    if min(args.sizes) < 2:
        parser.error("--sizes: at least 2 images per city (3 train cities, 2 images carved out for validation)")
    sys.path.insert(0, str(ROOT / "examples"))
    from cityscapes_plugin.fixture import make_fixture

    work = args.keep or Path(tempfile.mkdtemp(prefix="routerkit-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for per_city in args.sizes:
            root = make_fixture(work / f"fixture{per_city}", images_per_city=per_city, height=args.height, width=args.width)
            train_images = 3 * per_city - 2  # 3 train cities, 2 carved out for validation
            for lazy in [True, False] if args.eager else [True]:
                run = work / f"run{per_city}{'lazy' if lazy else 'eager'}"
                cmd = [sys.executable, "-m", "routerkit", "train", str(CONFIG), "--run-dir", str(run), "--overwrite"]
                cmd += _overrides(root, train_images, lazy, args.cache_gb, args.workers, (args.height, args.width))
                peaks, seconds, _ = _run(cmd, work)
                rows.append((train_images, lazy, peaks, seconds))
                shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    from _machine import machine_line

    print(machine_line())
    print(
        f"data: Cityscapes-layout fixture at {args.height} x {args.width}, 19 classes; lazy runs: data.params.lazy=true, "
        f"num_workers {args.workers}, run.cache_memory_gb {args.cache_gb}; one epoch per stage, "
        "every batch 2 inputs (training, replay cache, teacher logits, evaluation)\n"
    )
    print("| train images | splits | peak RSS MiB (VmHWM) | peak anonymous MiB | peak file-backed MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for images, lazy, peaks, seconds in rows:
        kind = "lazy + spilled tables" if lazy else "in memory"
        print(f"| {images} | {kind} | {peaks['hwm']:.0f} | {peaks['anon']:.0f} | {peaks['file']:.0f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
