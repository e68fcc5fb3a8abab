"""How long the viewer stops while the annotations are autosaved (docs/benchmarks.md).

    xvfb-run -a python benchmarks/autosave_pause.py [--shape 300 1024 1024] [--repeats 5]

Opens a napari viewer (it needs a display; Xvfb will do) with a tomogram of the given shape
(Z Y X), the Boxes widget, a painting of the same shape with a few painted slices and some
boxes, and autosaves it as the widget's timer does (``Autosaver.save_now``: gather in the
GUI thread, copy and write in a worker thread).  Meanwhile a 1 ms timer in the GUI thread
records how late each of its ticks comes: the longest gap is the longest time the viewer
could not redraw or answer the mouse.  The same is measured over an idle stretch of the
same length for comparison.  Each repeat changes the painting first, so each writes anew.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from _common import command_line, describe_machine, fmt, machine_info, markdown_table


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 1024, 1024))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds to let the viewer draw first"
    )
    return parser.parse_args(argv)


class TickRecorder:
    """A 1 ms timer in the GUI thread that records the gaps between its ticks."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self.last = time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(1)
        self.timer.timeout.connect(self.tick)

    def tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self.last)
        self.last = now

    def start(self) -> None:
        self.gaps = []
        self.last = time.perf_counter()
        self.timer.start()

    def stop(self) -> list[float]:
        self.timer.stop()
        return self.gaps


def run_until(app, done, timeout: float = 600.0) -> float:
    """Process GUI events until ``done()``; returns the seconds it took."""
    start = time.perf_counter()
    while not done():
        app.processEvents()
        time.sleep(0.0005)
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the autosave did not finish")
    return time.perf_counter() - start


def measure(
    shape: tuple[int, int, int], repeats: int, warmup: float = 3.0
) -> list[dict[str, float]]:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_tomoseg._widgets import BoxWidget

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    tomo = viewer.add_image(np.zeros(shape, np.uint8), name="tomogram")
    widget = BoxWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.tomogram.value = tomo
    widget.autosaver.timer.stop()  # the benchmark starts the autosaves itself
    for z in range(0, shape[0], max(1, shape[0] // 10)):
        widget.add_box((z, shape[1] // 2, shape[2] // 2), positive=True)
        widget.add_box((z, shape[1] // 4, shape[2] // 4), positive=False)
    paint = viewer.layers["painting"]
    warm_until = time.perf_counter() + warmup  # the first draws of the new layers
    run_until(app, lambda: time.perf_counter() > warm_until)
    recorder = TickRecorder()
    rows = []
    for repeat in range(repeats):
        side = min(64, shape[1] // 2, shape[2] // 2)  # a painted square on one more slice
        corner = [[(7 * repeat) % shape[0]], [shape[1] // 4], [shape[2] // 4]]
        paint.data_setitem(tuple(np.indices((1, side, side)).reshape(3, -1) + corner), 1)
        run_until(app, lambda: True)
        recorder.start()
        t0 = time.perf_counter()
        worker = widget.autosaver.save_now()
        gather = time.perf_counter() - t0
        assert worker is not None, "no autosave was due"
        seconds = gather + run_until(app, lambda: widget.autosaver.worker is None)
        busy = recorder.stop()
        recorder.start()
        until = t0 + 2 * seconds
        run_until(app, lambda until=until: time.perf_counter() > until)
        idle = recorder.stop()
        rows.append(
            {
                "gather_ms": 1000 * gather,
                "autosave_s": seconds,
                "max_gap_ms": 1000 * max(busy),
                "p99_gap_ms": 1000 * float(np.percentile(busy, 99)),
                "idle_max_gap_ms": 1000 * max(idle),
            }
        )
    viewer.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    shape = tuple(args.shape)
    os.environ["TOMOSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="tomoseg-autosave-bench-")
    info = machine_info()
    rows = measure(shape, args.repeats, args.warmup)
    print(describe_machine(info))
    print(f"# command: {command_line()}")
    print(
        f"# painting: {shape[0]} x {shape[1]} x {shape[2]} uint8 ({np.prod(shape) / 1e6:.0f} MB)"
    )
    table = [
        [
            i + 1,
            fmt(r["gather_ms"], 1),
            fmt(r["max_gap_ms"], 1),
            fmt(r["p99_gap_ms"], 1),
            fmt(r["idle_max_gap_ms"], 1),
            fmt(r["autosave_s"], 2),
        ]
        for i, r in enumerate(rows)
    ]
    headers = [
        "autosave",
        "GUI thread: gather (ms)",
        "longest GUI gap (ms)",
        "99th pct gap (ms)",
        "longest idle gap (ms)",
        "autosave done after (s)",
    ]
    print(markdown_table(headers, table))
    print(json.dumps({"machine": info, "shape": shape, "rows": rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
