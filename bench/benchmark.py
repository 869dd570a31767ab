"""Time each stage of the pipeline on real scans and write docs/benchmarks.md.

Usage::

    python bench/benchmark.py --scans_dir=../shared/data/tags_png_cropped --full_count=20

Part 1 times every stage on the three reference scans (median of
``--repeats`` runs each). Part 2 runs the whole per-scan pipeline, with
every output, on the first ``--full_count`` scans in name order, and
reports the median and worst time per scan and the peak memory (max RSS)
of the process. Part 3, with ``--all_scans``, runs the main command on the
whole folder plus ``--order --print_order`` in a subprocess and reports its
wall time.
"""

import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import area_anomaly  # noqa: E402
import scan_pipeline  # noqa: E402
import shape_anomaly  # noqa: E402
import use_model  # noqa: E402
from impurity_extract import extract_impurities  # noqa: E402
from spatial_anomaly import weighted_kth_nn  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("scans_dir", os.path.join(REPO_ROOT, "..", "shared", "data", "tags_png_cropped"), "Folder of real scans.")
flags.DEFINE_string("model_name", os.path.join(REPO_ROOT, "models", "shape_autoencoder.keras"), "Shape model file.")
flags.DEFINE_integer("repeats", 3, "Runs per stage and scan in part 1; the median is reported.")
flags.DEFINE_integer("full_count", 20, "Scans for the whole-pipeline timing of part 2.")
flags.DEFINE_boolean("all_scans", False, "Also run the main command on every scan of --scans_dir (part 3).")
flags.DEFINE_string("output", os.path.join(REPO_ROOT, "docs", "benchmarks.md"), "Markdown file to write.")

REFERENCE_SCANS = ["scan1tag-47", "scan2tag-34", "scan3tag-48"]

#: The main command's log line for a finished scan: "<name>: <n> impurities, <s> s".
SCAN_LINE = re.compile(r": \d+ impurities, ([0-9.]+) s$", re.MULTILINE)


def _median_time(function, repeats):
    times = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def time_stages(scans_dir, model, repeats):
    """Return rows (scan, significant impurities, seconds per stage) for the reference scans."""
    rows = []
    for name in REFERENCE_SCANS:
        path = os.path.join(scans_dir, f"{name}.png")
        extract_s, extraction = _median_time(lambda: extract_impurities(path, 30), repeats)
        boxes, areas, indices = extraction.boxes, extraction.areas, extraction.indices

        spatial_s, spatial = _median_time(lambda: weighted_kth_nn(boxes, areas, indices, [50])[50], repeats)
        circle_s, _ = _median_time(lambda: shape_anomaly.circle_scores(extraction.markers, areas, indices), repeats)

        def shape_stage():
            crop_ids, crops = shape_anomaly.impurity_crops(extraction.markers, boxes, indices)
            losses = use_model.reconstruction_losses(model, crops)
            return shape_anomaly.shape_scores(crop_ids, losses, extraction.n_impurities)

        shape_s, shape = _median_time(shape_stage, repeats)
        combined = shape_anomaly.combined_scores(spatial, shape)
        cluster_s, _ = _median_time(lambda: area_anomaly.market_clustering(boxes, areas, combined), repeats)
        reference_s, _ = _median_time(
            lambda: area_anomaly.market_clustering(boxes, areas, combined, reference=True), repeats
        )
        rows.append((name, len(indices), extract_s, spatial_s, circle_s, shape_s, cluster_s, reference_s))
    return rows


def time_full_pipeline(scan_paths, model):
    """Return per-scan seconds of the whole pipeline with every output."""
    times = []
    with tempfile.TemporaryDirectory() as output_dir:
        area_dir = os.path.join(output_dir, "area")
        config = scan_pipeline.PipelineConfig(
            min_threshold=30,
            logs_dir=output_dir,
            area_anomaly_dir=area_dir,
            clusters_log=os.path.join(area_dir, "clusters_scores.txt"),
            plots_dir=os.path.join(area_dir, "plots"),
        )
        for path in scan_paths:
            started = time.perf_counter()
            scan_pipeline.process_scan(path, config, model)
            times.append(time.perf_counter() - started)
    return times


def time_main_command(scans_dir):
    """Run the main command on every scan plus --order --print_order.

    Returns
    -------
    elapsed_s : float
        Wall time in seconds.
    peak_mb : float
        Max RSS of the command's process in MB.
    scan_times : list of float
        Seconds per scan, from the command's log line for each scan.
    """
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable,
            os.path.join(REPO_ROOT, "anomaly_detection.py"),
            f"--input_scans={scans_dir}/*.png",
            "--min_threshold=30",
            f"--logs_dir={output_dir}",
            f"--area_anomaly_dir={output_dir}/area",
            "--order",
            "--print_order",
        ]
        started = time.perf_counter()
        completed = subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - started
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    scan_times = [float(match) for match in SCAN_LINE.findall(completed.stderr)]
    return elapsed, child_peak_mb, scan_times


def peak_memory_mb():
    """Return the max RSS of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def render(stage_rows, full_times, full_count, peak_mb, all_scans, model_name):
    lines = [
        "# Benchmarks",
        "",
        f"Measured with `python bench/benchmark.py` on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
        f"model `{os.path.relpath(model_name, REPO_ROOT)}`, on {time.strftime('%Y-%m-%d')}. "
        "Times are wall-clock seconds.",
        "",
        "## Stages on the reference scans (threshold 30, median of repeated runs)",
        "",
        "| scan | significant impurities | read + extract | spatial k=50 | circle ratio "
        "| crops + inference + loss | market clustering | reference clustering |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, count, *seconds in stage_rows:
        lines.append(f"| {name} | {count} | " + " | ".join(f"{value:.3f}" for value in seconds) + " |")

    medians = [statistics.median(row[i] for row in stage_rows) for i in range(2, 8)]
    lines.append("| **median** | | " + " | ".join(f"**{value:.3f}**" for value in medians) + " |")
    lines += [
        "",
        "Targets: extraction at most 1 s, spatial at most 0.2 s, crops + inference + loss at most 2 s, "
        "market clustering at most 1 s per scan.",
        "",
        f"## Whole pipeline, {full_count} scans",
        "",
        "Every stage and every per-scan output (table, score plots, area plot, clusters log entry), "
        f"the first {full_count} scans in name order, default flags and threshold 30.",
        "",
        "| median s per scan | worst s per scan | peak memory (max RSS) |",
        "|---|---|---|",
        f"| {statistics.median(full_times):.2f} | {max(full_times):.2f} | {peak_mb:.0f} MB |",
        "",
        "Targets: median at most 4 s per scan, peak memory under 3 GB. The first scans in name order "
        "are specimen 1 scans, which have more impurities than the data set's median scan, so the "
        "per-scan median over every scan is in the next table when `--all_scans` is given.",
    ]
    if all_scans is not None:
        elapsed_s, child_peak_mb, scan_times = all_scans
        lines += [
            "",
            f"## Main command on every scan ({len(scan_times)} scans)",
            "",
            "`anomaly_detection.py` on all scans of the folder, then `--order --print_order`, in a "
            "new process, so the time includes loading TensorFlow and the model.",
            "",
            "| total | median s per scan | worst s per scan | peak memory (max RSS) |",
            "|---|---|---|---|",
            f"| {elapsed_s / 60:.1f} min | {statistics.median(scan_times):.2f} | {max(scan_times):.2f} "
            f"| {child_peak_mb:.0f} MB |",
            "",
            "Targets: under 20 minutes for the 219 published scans, under 3 GB.",
        ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    model = use_model.load_model(FLAGS.model_name)
    stage_rows = time_stages(FLAGS.scans_dir, model, FLAGS.repeats)

    scan_paths = sorted(
        os.path.join(FLAGS.scans_dir, name) for name in os.listdir(FLAGS.scans_dir) if name.endswith(".png")
    )[: FLAGS.full_count]
    full_times = time_full_pipeline(scan_paths, model)
    peak_mb = peak_memory_mb()

    all_scans = time_main_command(FLAGS.scans_dir) if FLAGS.all_scans else None

    report = render(stage_rows, full_times, len(scan_paths), peak_mb, all_scans, FLAGS.model_name)
    with open(FLAGS.output, "w", encoding="utf-8") as handle:
        handle.write(report)
    print(report)


if __name__ == "__main__":
    app.run(main)
