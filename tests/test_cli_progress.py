"""The command line's progress bars (tqdm on stderr) and --quiet."""

import io

from napari_tomoseg.cli import ProgressPrinter
from napari_tomoseg.progress import Progress


def test_progress_bars_show_each_stage_to_its_end_and_quiet_shows_nothing():
    stream = io.StringIO()
    show = ProgressPrinter(stream=stream)
    for step in range(4):
        show(Progress("train", step, 3, message=f"mini-batch {step}", metrics={"loss": 0.5}))
    show(Progress("apply", 0, 0, message="measuring"))  # no total yet
    show(Progress("apply", 2, 2, message="slices 0-9"))
    show(Progress("apply", 1, 2, message="next tomogram"))  # the stage starts again
    show.close()
    text = stream.getvalue()
    assert "train: 100%" in text and "3/3" in text and "loss=0.5" in text
    assert "apply: 100%" in text and "2/2" in text and "slices 0-9" in text
    assert "apply:  50%" in text and "1/2" in text and "next tomogram" in text
    quiet = io.StringIO()
    ProgressPrinter(stream=quiet, quiet=True)(Progress("train", 1, 3))
    assert quiet.getvalue() == ""
