import os
from pathlib import Path

import numpy as np
import pytest

import extract.batch.slide_plan as slide_plan
from extract.batch.slide_plan import PlanSettings, SlidePlanner
from extract.slides.formats import open_slide
from extract.slides.reader import SlideReadError
from extract.slides.tiling import NoTissueError, tile_grid
from fixtures.make_slides import write_blank_slide, write_tissue_slide

SETTINGS = dict(target_mpp=1.0, tile_size_px=32, tissue_threshold=0.5)


@pytest.fixture()
def slides(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "slides"
    folder.mkdir()
    return [
        write_tissue_slide(folder / "a.tif", seed=1),
        write_blank_slide(folder / "blank.tif"),
        write_tissue_slide(folder / "c.tif", width=1024, mpp=0.25, seed=3),
        write_tissue_slide(folder / "d.tif", seed=4),
    ]


def test_plans_match_the_grid_and_errors_stay_with_their_slide(slides, tmp_path):
    qc = tmp_path / "qc"
    qc.mkdir()
    planner = SlidePlanner(slides, {"d": 0.4}, PlanSettings(**SETTINGS, qc_dir=qc), ahead=2)
    for path in slides:
        if path.name == "blank.tif":
            with pytest.raises(NoTissueError, match="blank.tif"):
                planner.plan(path)
            continue
        grid = planner.plan(path)
        with open_slide(path, 0.4 if path.stem == "d" else None) as reader:
            expected = tile_grid(reader, 1.0, 32, 0.5)
        np.testing.assert_array_equal(grid.coords, expected.coords)
        assert grid.level0_mpp == expected.level0_mpp and grid.size_level0 == expected.size_level0 and grid.tissue is None
        assert not (qc / f"{path.stem}.png").exists()  # published only when the slide's features are complete
        planner.publish_qc(path)
        assert (qc / f"{path.stem}.png").stat().st_size > 0
        planner.forget(path)
    planner.close()
    assert not list(qc.glob("*.partial"))


def test_qc_image_of_a_slide_never_finished_is_not_left(slides, tmp_path):
    qc = tmp_path / "qc"
    qc.mkdir()
    planner = SlidePlanner(slides, {}, PlanSettings(**SETTINGS, qc_dir=qc), ahead=3)
    planner.plan(slides[0])
    assert len(list(qc.glob("a.png.*.partial"))) == 1
    planner.forget(slides[0])  # its slide failed
    planner.plan(slides[2])  # c and d were planned ahead
    planner.close()  # the job ends (or is interrupted) before they are finished
    assert not list(qc.iterdir())


def test_a_slide_that_kills_the_planner_fails_alone(slides, monkeypatch):
    original = slide_plan.tile_grid

    def crashing(reader, *args):
        if reader.path.name == "c.tif":
            os._exit(3)  # as a segfault in a slide library would end the process
        return original(reader, *args)

    monkeypatch.setattr(slide_plan, "tile_grid", crashing)  # the forked planner inherits it
    planner = SlidePlanner(slides, {}, PlanSettings(**SETTINGS), ahead=3)
    assert len(planner.plan(slides[0]).coords) > 0
    with pytest.raises(SlideReadError, match="c.tif: reading the slide crashed the process"):
        for path in slides[1:3]:
            try:
                planner.plan(path)
            except NoTissueError:
                pass
    assert len(planner.plan(slides[3]).coords) > 0  # planned again by a new process
    planner.close()
