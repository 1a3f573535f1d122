"""The `gigassl extract` batch job: end to end, bad inputs, resume, shards, read-only output."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.batch.slide_list import parse_shard, process_part, select_part
from extract.config import ExtractConfig
from extract.device import autocast
from extract.encoders.tile_encoder import TileTrunk, load_resnet18, prepare_batch
from extract.features.slide_file import SlideFeatures, is_complete
from extract.run import run_extraction
from extract.slides.formats import open_slide
from extract.slides.tiling import tile_grid
from fixtures.make_slides import FAST_EXTRACT as FAST
from fixtures.make_slides import synthetic_image, write_blank_slide, write_pyramidal_tiff, write_tissue_slide
from fixtures.processes import alive, descendants, describe, wait_until_gone
from gigassl.cli import main

SMALL_BANK = ["--bank", "--n-augmentations", "2", "--n-tiles-per-augmentation", "8"]


def extract(slides: Path, out: Path, *extra: str) -> int:
    return main(["extract", "--slides", str(slides), "--out", str(out), *FAST, *extra])


def summary_of(out: Path, name: str = "summary.json") -> dict:
    return json.loads((out / name).read_text())


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """Three small synthetic pyramidal TIFFs at different µm/px."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_tissue_slide(folder / "synthetic_a.tif", mpp=0.5, seed=1)
    write_tissue_slide(folder / "synthetic_b.tif", width=1024, height=768, mpp=0.25, seed=2)
    write_tissue_slide(folder / "synthetic_c.tif", width=1024, height=512, mpp=0.5, seed=3)
    return folder


@pytest.fixture()
def real_cohort(cohort: Path, slides_dir: Path) -> Path:
    """The synthetic cohort plus the real CMU-1-Small-Region."""
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", cohort)
    return cohort


def test_end_to_end_writes_valid_files(real_cohort: Path, tmp_path: Path, slides_dir: Path) -> None:
    out = tmp_path / "out"
    assert extract(real_cohort, out) == 0
    summary = summary_of(out)
    assert (summary["n_done"], summary["n_failed"], summary["exit_code"]) == (4, 0, 0)
    assert summary["tiles_per_second"] > 0
    for stem in ("CMU-1-Small-Region", "synthetic_a", "synthetic_b", "synthetic_c"):
        assert (out / "qc" / f"{stem}.png").stat().st_size > 0
        with SlideFeatures(out / "features" / f"{stem}.h5", require_plain=True) as slide:
            features, coords = slide.features(), slide.coords()
            assert features.shape == (len(coords), 256) and np.isfinite(features).all()
            assert slide.settings["tile_size_px"] == 64 and slide.settings["slides"] == str(real_cohort)
            assert slide.settings["encoder"] == "random" and "shard" not in slide.settings
            assert slide.grid_attrs["target_mpp"] == 2.0 and slide.grid_attrs["patch_size"] == 64
            assert slide.encoder_sha256 and not slide.has_bank
    with SlideFeatures(out / "features" / "CMU-1-Small-Region.h5") as slide:
        features, coords = slide.features(), slide.coords()
        assert slide.grid_attrs["level0_magnification"] == 20.0
        assert slide.tile_step_level0 == pytest.approx(64 * 2.0 / 0.499)
        with h5py.File(out / "features" / "CMU-1-Small-Region.h5") as handle:
            assert handle["features"].attrs["encoder"] == "random"
    # The stored features are the trunk's output on the tiles at those coords, in that order.
    model, _ = load_resnet18("random", seed=0)
    trunk = TileTrunk(model).eval().to(memory_format=torch.channels_last)
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        grid = tile_grid(reader, 2.0, 64, 0.5)
        tiles = torch.stack([torch.from_numpy(reader.read_tile(x, y, grid.size_level0, 64)) for x, y in coords[:32]])
    np.testing.assert_array_equal(coords, grid.coords)
    with torch.inference_mode(), autocast(torch.device("cpu")):
        expected = trunk(prepare_batch(tiles, torch.device("cpu"))).float().numpy()
    np.testing.assert_allclose(features[:32], expected, rtol=0, atol=1e-5)


def test_python_api_and_dataloader_workers_agree(cohort: Path, tmp_path: Path) -> None:
    (cohort / "synthetic_c.tif").unlink()
    base = dict(
        slides=cohort,
        out=tmp_path / "w0",
        encoder="random",
        tile_size_px=64,
        target_mpp=2.0,
        bank=False,
        batch_size=16,
        num_workers=0,
    )
    assert run_extraction(ExtractConfig(**base)).exit_code == 0
    summary = run_extraction(ExtractConfig(**{**base, "out": tmp_path / "w2", "num_workers": 2}))
    assert len(summary.done) == 2
    for stem in ("synthetic_a", "synthetic_b"):
        with (
            SlideFeatures(tmp_path / "w0" / "features" / f"{stem}.h5") as a,
            SlideFeatures(tmp_path / "w2" / "features" / f"{stem}.h5") as b,
        ):
            np.testing.assert_array_equal(a.features(), b.features())
            np.testing.assert_array_equal(a.coords(), b.coords())


def test_features_are_streamed_in_batches(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.features.slide_file import SlideFileWriter

    sizes: list[int] = []
    original = SlideFileWriter.write_plain_rows

    def record(self, start, rows):
        sizes.append(len(rows))
        return original(self, start, rows)

    monkeypatch.setattr(SlideFileWriter, "write_plain_rows", record)
    (cohort / "synthetic_b.tif").unlink()
    (cohort / "synthetic_c.tif").unlink()
    assert extract(cohort, tmp_path / "out", "--batch-size", "8", "--target-mpp", "0.5") == 0
    assert len(sizes) > 3 and max(sizes) == 8 and sum(sizes) == 48


def test_bad_inputs_each_fail_on_one_line_and_others_run(
    tmp_path: Path, slides_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    write_tissue_slide(folder / "good.tif")
    shutil.copy(slides_dir / "openslide" / "unopenable.tiff", folder)
    shutil.copy(slides_dir / "openslide" / "unreadable.svs", folder)
    shutil.copy(slides_dir / "openslide" / "small.svs", folder)
    write_pyramidal_tiff(folder / "no_mpp.tif", synthetic_image(512, 384, [(64, 64, 448, 320)]), mpp=None)
    write_blank_slide(folder / "blank.tif")
    (folder / "notes.txt").write_text("not a slide\n")
    (folder / "fake.svs").write_text("not a slide either\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert extract(folder, out, "--target-mpp", "0.5") == 0
    summary = summary_of(out)
    by_name = {s["slide"]: s for s in summary["slides"]}
    assert by_name["good.tif"]["status"] == "done" and (out / "features" / "good.h5").is_file()
    expected_reasons = {
        "unopenable.tiff": "OpenSlide cannot open",
        "unreadable.svs": "cannot read",
        "small.svs": "smaller than one tile",
        "no_mpp.tif": "--mpp-csv",
        "blank.tif": "no tile has tissue",
        "fake.svs": "not a slide format",
    }
    for name, phrase in expected_reasons.items():
        assert by_name[name]["status"] == "failed", name
        assert phrase in by_name[name]["reason"] and name in by_name[name]["reason"]
        assert "\n" not in by_name[name]["reason"]
        assert not (out / "features" / f"{Path(name).stem}.h5").exists()
    assert by_name["notes.txt"]["status"] == "ignored"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(expected_reasons)
    assert all("\n" not in message for message in errors)
    assert summary["n_failed"] == 6 and summary["n_done"] == 1
    assert [p for p in (out / "features").iterdir() if not p.name.startswith(".")] == [out / "features" / "good.h5"]
    # --strict turns any failure into a non-zero exit, even when the good slide is skipped.
    assert extract(folder, out, "--target-mpp", "0.5", "--strict") == 1
    assert summary_of(out)["n_skipped"] == 1


def test_two_files_with_one_stem_do_not_overwrite_each_other(cohort: Path, tmp_path: Path) -> None:
    shutil.copy(cohort / "synthetic_a.tif", cohort / "synthetic_a.tiff")
    (cohort / "synthetic_b.tif").unlink()
    (cohort / "synthetic_c.tif").unlink()
    assert extract(cohort, tmp_path / "out") == 0
    by_name = {s["slide"]: s for s in summary_of(tmp_path / "out")["slides"]}
    assert by_name["synthetic_a.tif"]["status"] == "done"
    assert by_name["synthetic_a.tiff"]["status"] == "failed" and "same file stem" in by_name["synthetic_a.tiff"]["reason"]


def test_tile_read_error_in_a_worker_is_one_line(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.slides.reader import SlideReader, SlideReadError

    def broken(self, x0, y0, size_level0, out_px):
        raise SlideReadError(f"{self.path}: cannot read a tile at ({x0}, {y0}): boom")

    monkeypatch.setattr(SlideReader, "read_tile", broken)  # forked workers inherit it
    folder = _only(cohort, "synthetic_a.tif")
    assert extract(folder, tmp_path / "out", "--num-workers", "1") == 1
    reason = summary_of(tmp_path / "out")["slides"][0]["reason"]
    assert reason.endswith("synthetic_a.tif: cannot read a tile at (0, 0): boom")
    assert "\n" not in reason and "Traceback" not in reason
    assert not list((tmp_path / "out" / "features").iterdir())


@pytest.mark.parametrize("crash", [False, True])
def test_a_slide_failing_mid_cohort_leaves_the_others_intact(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: bool
) -> None:
    """The reading workers read ahead across slides: a slide in the middle whose tiles cannot be
    read (or whose reading kills a worker) fails alone, and the slides after it are extracted
    exactly as in a run without it."""
    from extract.slides.reader import SlideReader, SlideReadError

    reference = tmp_path / "reference"
    assert extract(cohort, reference, "--num-workers", "2") == 0
    original = SlideReader.read_tile

    def broken_for_b(self, x0, y0, size_level0, out_px):
        if self.path.name == "synthetic_b.tif":
            if crash:
                os._exit(11)  # as a segfault in the slide library would
            raise SlideReadError(f"{self.path}: cannot read a tile at ({x0}, {y0}): boom")
        return original(self, x0, y0, size_level0, out_px)

    monkeypatch.setattr(SlideReader, "read_tile", broken_for_b)  # forked workers inherit it
    out = tmp_path / "out"
    assert extract(cohort, out, "--num-workers", "2") == 0
    by_name = {s["slide"]: s for s in summary_of(out)["slides"]}
    assert by_name["synthetic_b.tif"]["status"] == "failed"
    assert "synthetic_b.tif" in by_name["synthetic_b.tif"]["reason"]
    assert ("kills the tile-reading worker" if crash else "boom") in by_name["synthetic_b.tif"]["reason"]
    assert not (out / "features" / "synthetic_b.h5").exists()
    for stem in ("synthetic_a", "synthetic_c"):
        assert by_name[f"{stem}.tif"]["status"] == "done"
        with (
            SlideFeatures(out / "features" / f"{stem}.h5", require_plain=True) as got,
            SlideFeatures(reference / "features" / f"{stem}.h5", require_plain=True) as expected,
        ):
            np.testing.assert_array_equal(got.coords(), expected.coords())
            np.testing.assert_array_equal(got.features(), expected.features())


def test_encoder_must_be_named(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["extract", "--slides", str(cohort), "--out", str(tmp_path / "out")]) == 2
    assert any("--encoder is required" in r.getMessage() and "'random'" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_a_real_slide_without_mpp_fails_naming_the_options(tmp_path: Path, shared_data: Path) -> None:
    """The TCGA frozen section (no µm/px, no objective power in its metadata) fails on one line
    naming the ways out, and --mpp-csv rescues it."""
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "TCGA-CR-7395-01A-01-TS1.svs").symlink_to(shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs")
    assert extract(folder, tmp_path / "o1", "--target-mpp", "8.0") == 1
    reason = summary_of(tmp_path / "o1")["slides"][0]["reason"]
    assert "--mpp-csv" in reason and "--default-mpp" in reason and "\n" not in reason
    (tmp_path / "mpp.csv").write_text("slide,mpp\nTCGA-CR-7395-01A-01-TS1.svs,3.0\n")
    assert extract(folder, tmp_path / "o2", "--target-mpp", "8.0", "--mpp-csv", str(tmp_path / "mpp.csv")) == 0


def test_exit_non_zero_when_every_slide_failed(tmp_path: Path, slides_dir: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides_dir / "openslide" / "unopenable.tiff", folder)
    write_blank_slide(folder / "blank.tif")
    assert extract(folder, tmp_path / "out") == 1
    assert summary_of(tmp_path / "out")["exit_code"] == 1


def test_mpp_csv_and_default_mpp_rescue_slides_without_metadata(tmp_path: Path, slides_dir: Path) -> None:
    from PIL import Image

    from fixtures.make_slides import synthetic_image

    folder = tmp_path / "slides"
    folder.mkdir()
    Image.fromarray(synthetic_image(512, 384, [(64, 64, 448, 320)])).save(folder / "micro.png")
    assert extract(folder, tmp_path / "o1") == 1  # no µm/px anywhere
    assert "--default-mpp" in summary_of(tmp_path / "o1")["slides"][0]["reason"]
    assert extract(folder, tmp_path / "o2", "--default-mpp", "0.5") == 0
    (tmp_path / "mpp.csv").write_text("slide,mpp\nmicro.png,1.0\n")
    assert extract(folder, tmp_path / "o3", "--default-mpp", "0.5", "--mpp-csv", str(tmp_path / "mpp.csv")) == 0
    with (
        SlideFeatures(tmp_path / "o2" / "features" / "micro.h5") as a,
        SlideFeatures(tmp_path / "o3" / "features" / "micro.h5") as b,
    ):
        assert a.grid_attrs["mpp"] == 0.5 and b.grid_attrs["mpp"] == 1.0
        assert a.tile_step_level0 == 256.0 and b.tile_step_level0 == 128.0


def test_skip_existing_and_overwrite(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert extract(cohort, out) == 0
    target = out / "features" / "synthetic_a.h5"
    stamp = target.stat().st_mtime_ns
    assert extract(cohort, out) == 0
    assert summary_of(out)["n_skipped"] == 3 and target.stat().st_mtime_ns == stamp
    assert extract(cohort, out, "--overwrite") == 0
    assert summary_of(out)["n_done"] == 3 and target.stat().st_mtime_ns != stamp
    # Asking for what the file lacks (here the bank) is not "complete": it is redone.
    assert not is_complete(target, require_bank=True)
    # Other settings on a complete file: skipped (as asked) but said, with the way out.
    assert extract(cohort, out, "--tissue-threshold", "0.6") == 0
    reason = summary_of(out)["slides"][0]["reason"]
    assert "other settings" in reason and "tissue_threshold 0.5 → 0.6" in reason and "--overwrite" in reason


def test_corrupt_and_truncated_outputs_are_redone(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert extract(cohort, out) == 0
    corrupt, truncated = out / "features" / "synthetic_a.h5", out / "features" / "synthetic_b.h5"
    corrupt.write_bytes(b"\x89HDF\r\n garbage")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert not is_complete(corrupt) and not is_complete(truncated)
    assert extract(cohort, out) == 0
    by_name = {s["slide"]: s["status"] for s in summary_of(out)["slides"]}
    assert by_name == {"synthetic_a.tif": "done", "synthetic_b.tif": "done", "synthetic_c.tif": "skipped"}
    assert is_complete(corrupt, require_plain=True) and is_complete(truncated, require_plain=True)


@pytest.mark.slow
def test_sigkill_mid_slide_leaves_nothing_complete_nor_running_and_rerun_redoes_it(tmp_path: Path, slides_dir: Path) -> None:
    """SIGKILL (a SLURM time limit) runs no cleanup: the planner and the reading workers must
    still end with the job, and neither a features file nor a QC image may look finished."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", folder)
    out = tmp_path / "out"
    # ~700 tiles of 32 px: long enough to be killed inside the slide, quick to redo.
    args = [
        "--slides",
        str(folder),
        "--out",
        str(out),
        "--encoder",
        "random",
        "--tile-size-px",
        "32",
        "--target-mpp",
        "1.0",
        "--no-bank",
        "--num-workers",
        "2",
        "--batch-size",
        "16",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "gigassl.cli", "extract", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    features_dir = out / "features"
    deadline = time.monotonic() + 60
    job: list[int] = []
    try:
        while time.monotonic() < deadline and not list(features_dir.glob("*.partial")):
            assert process.poll() is None, "extraction ended before it could be killed"
            time.sleep(0.01)
        partials = list(features_dir.glob("*.partial"))
        assert partials, "no temporary file appeared within 60 s"
        time.sleep(0.1)  # the writer is open: the slide's tiles are being encoded
        job = descendants(process.pid)
        assert len(job) >= 3, f"expected the planner and two reading workers, found {[describe(p) for p in job]}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        left = wait_until_gone(job, timeout_s=10.0)
        assert not left, "processes of the killed job still run:\n" + "\n".join(describe(p) for p in left)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in job:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    final = features_dir / "CMU-1-Small-Region.h5"
    assert not final.exists() and not is_complete(final)
    assert not (out / "qc" / "CMU-1-Small-Region.png").exists()  # planned, never finished
    assert list(features_dir.glob("*.partial"))  # the killed run's leftovers are still there
    assert main(["extract", *args]) == 0
    assert summary_of(out)["n_done"] == 1
    assert is_complete(final, require_plain=True) and not list(features_dir.glob("*.partial"))
    assert (out / "qc" / "CMU-1-Small-Region.png").is_file() and not list((out / "qc").glob("*.partial"))


@pytest.mark.slow
def test_two_shards_equal_one_process(cohort: Path, tmp_path: Path) -> None:
    assert extract(cohort, tmp_path / "one", *SMALL_BANK) == 0
    assert extract(cohort, tmp_path / "two", *SMALL_BANK, "--shard", "0/2") == 0
    assert extract(cohort, tmp_path / "two", *SMALL_BANK, "--shard", "1/2") == 0
    first, second = summary_of(tmp_path / "two", "summary-shard0.json"), summary_of(tmp_path / "two", "summary-shard1.json")
    assert [s["slide"] for s in first["slides"]] == ["synthetic_a.tif", "synthetic_c.tif"]
    assert [s["slide"] for s in second["slides"]] == ["synthetic_b.tif"]
    for stem in ("synthetic_a", "synthetic_b", "synthetic_c"):
        with (
            SlideFeatures(tmp_path / "one" / "features" / f"{stem}.h5") as a,
            SlideFeatures(tmp_path / "two" / "features" / f"{stem}.h5") as b,
        ):
            np.testing.assert_array_equal(a.features(), b.features())
            np.testing.assert_array_equal(a.coords(), b.coords())
            assert a.grid_attrs == b.grid_attrs and a.settings == b.settings
            for index in range(2):
                for array_a, array_b in zip(a.augmentation(index), b.augmentation(index)):
                    np.testing.assert_array_equal(array_a, array_b)


def test_shard_and_rank_split(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_part("1/3") == (3, 6)
    items = [Path(f"s{i}") for i in range(7)]
    parts = [select_part(items, p, 3) for p in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(items) and parts[1] == [Path("s1"), Path("s4")]


def test_torchrun_ranks_split_the_slides(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert extract(cohort, tmp_path / "out") == 0
    assert summary_of(tmp_path / "out", "summary-shard0.json")["n_done"] == 2
    assert summary_of(tmp_path / "out", "summary-shard1.json")["n_done"] == 1
    assert len(list((tmp_path / "out" / "features").glob("*.h5"))) == 3


def test_read_only_output_folder_is_a_clear_error(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    # root ignores permission bits; the immutable flag stops root too.
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode == 0
    try:
        assert os.geteuid() != 0 or immutable, "cannot make a read-only folder for root here"
        with caplog.at_level(logging.ERROR):
            assert extract(cohort, out) == 2
        assert any("not writable" in r.getMessage() and str(out) in r.getMessage() for r in caplog.records)
        assert not (out / "features").exists()
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        out.chmod(0o755)


def _only(cohort: Path, keep: str) -> Path:
    for path in cohort.iterdir():
        if path.name != keep:
            path.unlink()
    return cohort


def test_plain_features_and_bank_in_one_file(cohort: Path, tmp_path: Path) -> None:
    folder = _only(cohort, "synthetic_a.tif")
    bank = ["--bank", "--n-augmentations", "3", "--n-tiles-per-augmentation", "16", "--target-mpp", "0.5"]
    assert extract(folder, tmp_path / "a", *bank) == 0
    target = tmp_path / "a" / "features" / "synthetic_a.h5"
    assert is_complete(target, require_plain=True, require_bank=True)
    with SlideFeatures(target) as slide:
        assert (slide.n_plain_tiles, slide.n_augmentations, slide.bank_size) == (48, 3, 16)
        plain = {tuple(c) for c in slide.coords().tolist()}
        attrs = slide.bank_attrs
        assert attrs["seed"] == 0 and not attrs["sampled_with_replacement"]
        for index in range(3):
            features, coords = slide.augmentation(index)
            assert features.shape == (16, 256) and np.isfinite(features).all()
            assert {tuple(c) for c in coords.tolist()} <= plain
            assert len({tuple(c) for c in coords.tolist()}) == 16  # without replacement
        first = slide.augmentation(0)
    assert summary_of(tmp_path / "a")["slides"][0]["n_bank_tiles"] == 48
    # Same seed → identical arrays; another seed → another bank.
    assert extract(folder, tmp_path / "b", *bank) == 0
    with SlideFeatures(tmp_path / "b" / "features" / "synthetic_a.h5") as slide:
        np.testing.assert_array_equal(slide.augmentation(0)[0], first[0])
        np.testing.assert_array_equal(slide.augmentation(0)[1], first[1])
    assert extract(folder, tmp_path / "c", *bank, "--seed", "1") == 0
    with SlideFeatures(tmp_path / "c" / "features" / "synthetic_a.h5") as slide:
        assert not np.array_equal(slide.augmentation(0)[1], first[1])


@pytest.mark.parametrize("mpp, n_tissue_tiles", [("0.5", 48), ("2.0", 4)])
def test_bank_of_a_slide_with_fewer_tissue_tiles_than_k(cohort: Path, tmp_path: Path, mpp: str, n_tissue_tiles: int) -> None:
    folder = _only(cohort, "synthetic_a.tif")
    assert (
        extract(
            folder, tmp_path / "out", "--bank", "--n-augmentations", "2", "--n-tiles-per-augmentation", "64", "--target-mpp", mpp
        )
        == 0
    )
    with SlideFeatures(tmp_path / "out" / "features" / "synthetic_a.h5", require_bank=True) as slide:
        assert slide.n_plain_tiles == n_tissue_tiles and slide.bank_size == 64
        assert slide.bank_attrs["sampled_with_replacement"]
        plain = {tuple(c) for c in slide.coords().tolist()}
        features, coords = slide.augmentation(1)
        assert {tuple(c) for c in coords.tolist()} <= plain and np.isfinite(features).all()


def test_bank_only_then_plain_requested_is_redone(cohort: Path, tmp_path: Path) -> None:
    folder = _only(cohort, "synthetic_a.tif")
    out = tmp_path / "out"
    assert extract(folder, out, *SMALL_BANK, "--no-plain") == 0
    target = out / "features" / "synthetic_a.h5"
    assert is_complete(target, require_bank=True) and not is_complete(target, require_plain=True)
    assert extract(folder, out, *SMALL_BANK, "--no-plain") == 0
    assert summary_of(out)["n_skipped"] == 1
    assert extract(folder, out, *SMALL_BANK) == 0  # plain features now asked for
    assert summary_of(out)["n_done"] == 1 and is_complete(target, require_plain=True, require_bank=True)


def test_bank_reuses_the_plain_pass_tiles(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.slides.reader import SlideReader

    folder = _only(cohort, "synthetic_a.tif")
    reads = {"n": 0}
    original = SlideReader.read_tile

    def counting(self, *args, **kwargs):
        reads["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SlideReader, "read_tile", counting)
    bank = ["--bank", "--n-augmentations", "2", "--n-tiles-per-augmentation", "16", "--target-mpp", "0.5"]
    assert extract(folder, tmp_path / "once", *bank) == 0
    assert reads["n"] == 48  # the plain pass's reads only (num_workers 0: counted in this process)
    assert extract(folder, tmp_path / "bank_only", *bank, "--no-plain") == 0
    with (
        SlideFeatures(tmp_path / "once" / "features" / "synthetic_a.h5") as a,
        SlideFeatures(tmp_path / "bank_only" / "features" / "synthetic_a.h5") as b,
    ):
        for index in range(2):
            np.testing.assert_array_equal(a.augmentation(index)[0], b.augmentation(index)[0])
        assert b.tile_step_level0 == a.tile_step_level0  # the bank carries the grid without plain features


# ----------------------------------------------------------------------------- issue 13: reliability


def test_absurd_resolutions_fail_in_seconds_with_bounded_memory(tmp_path: Path, slides_dir: Path) -> None:
    """boxes.tiff (a 72-dpi tag, 352.8 µm/px) and a 1000-px PNG at --default-mpp 500 were planned
    as hundreds of thousands of tiles; a real slide like them took a node down. Both now fail on
    one line before any tile is planned, and the job goes on."""
    from PIL import Image

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides_dir / "openslide" / "boxes.tiff", folder)
    Image.new("RGB", (1000, 1000), (200, 110, 170)).save(folder / "photo.png")
    write_tissue_slide(folder / "good.tif", seed=1)
    out = tmp_path / "out"
    code = (
        "import resource, sys; from gigassl.cli import main; code = main(sys.argv[1:]); "
        "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print('PEAK_KB', hwm, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code, "extract", "--slides", str(folder), "--out", str(out), *FAST, "--default-mpp", "500"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 60 and result.returncode == 0, result.stderr[-2000:]
    main_kb, children_kb = map(int, result.stdout.split("PEAK_KB")[1].split())
    # the job's own peak is VmHWM: ru_maxrss(SELF) after fork + exec keeps the forking pytest's peak
    assert main_kb < 1_500_000 and children_kb < 500_000  # the job, and its planner and workers
    by_name = {s["slide"]: s for s in summary_of(out)["slides"]}
    assert by_name["good.tif"]["status"] == "done"
    assert "352.778 µm/px from the TIFF resolution tag" in by_name["boxes.tiff"]["reason"]
    assert "500 µm/px from --default-mpp" in by_name["photo.png"]["reason"]
    assert sorted(p.name for p in (out / "features").iterdir() if not p.name.startswith(".")) == ["good.h5"]


def test_damaged_output_is_redone_and_the_log_says_why(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from test_features_file import flip_bytes

    out = tmp_path / "out"
    assert extract(cohort, out) == 0
    flipped, truncated = out / "features" / "synthetic_a.h5", out / "features" / "synthetic_b.h5"
    flip_bytes(flipped, "features")  # the file still opens, every attribute says complete
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with caplog.at_level(logging.INFO, logger="extract"):
        assert extract(cohort, out) == 0
    by_name = {s["slide"]: s["status"] for s in summary_of(out)["slides"]}
    assert by_name == {"synthetic_a.tif": "done", "synthetic_b.tif": "done", "synthetic_c.tif": "skipped"}
    redone = [r.getMessage() for r in caplog.records if r.getMessage().startswith("redoing")]
    assert any("synthetic_a.h5" in m and "damaged file (dataset 'features' fails its checksum)" in m for m in redone), redone
    assert any("synthetic_b.h5" in m and "not a readable HDF5 file" in m for m in redone), redone
    assert is_complete(flipped, require_plain=True, verify=True)


def test_stale_partials_of_ended_jobs_are_removed_and_running_ones_kept(cohort: Path, tmp_path: Path) -> None:
    from extract.partial_files import FOREIGN_STALE_S, temporary_path

    out = tmp_path / "out"
    assert extract(cohort, out) == 0  # every slide complete: the next run skips them all
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        features, qc = out / "features", out / "qc"
        dead = temporary_path(features / "synthetic_a.h5", pid=int(ended.stdout))
        dead_qc = temporary_path(qc / "synthetic_b.png", pid=int(ended.stdout))
        live = temporary_path(features / "synthetic_c.h5", pid=running.pid)  # another shard, still writing
        foreign = features / "synthetic_a.h5.othernode-123.partial"  # another node: only its age tells
        old_foreign = features / "synthetic_b.h5.othernode-456.partial"
        for path in (dead, dead_qc, live, foreign, old_foreign):
            path.write_bytes(b"partial")
        os.utime(old_foreign, (time.time() - FOREIGN_STALE_S - 60,) * 2)
        assert extract(cohort, out) == 0 and summary_of(out)["n_skipped"] == 3
        assert not dead.exists() and not dead_qc.exists() and not old_foreign.exists()
        assert live.exists() and foreign.exists()
    finally:
        running.kill()
        running.wait()


def test_stale_partials_of_a_slide_whose_name_is_a_glob_pattern(tmp_path: Path) -> None:
    from extract.partial_files import remove_stale_partials, temporary_path

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = temporary_path(tmp_path / "s[1].h5", pid=int(ended.stdout))
    other = temporary_path(tmp_path / "s1.h5", pid=int(ended.stdout))  # what "s[1].h5.*" would match
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    assert remove_stale_partials(tmp_path, "s[1].h5.") == [mine]
    assert other.exists()


def test_a_failed_slide_leaves_no_qc_image(tmp_path: Path, slides_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.slides.reader import SlideReader, SlideReadError

    folder = tmp_path / "slides"
    folder.mkdir()
    write_tissue_slide(folder / "a.tif", seed=1)
    write_tissue_slide(folder / "b.tif", seed=2)
    original = SlideReader.read_tile

    def broken_for_b(self, *args):
        if self.path.name == "b.tif":
            raise SlideReadError(f"{self.path}: boom")
        return original(self, *args)

    monkeypatch.setattr(SlideReader, "read_tile", broken_for_b)
    out = tmp_path / "out"
    assert extract(folder, out) == 0
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.png"]  # b was planned, then failed


def test_a_run_whose_every_attempt_failed_exits_1_even_with_skipped_slides(
    cohort: Path, tmp_path: Path, slides_dir: Path
) -> None:
    out = tmp_path / "out"
    assert extract(cohort, out) == 0
    shutil.copy(slides_dir / "openslide" / "unopenable.tiff", cohort)
    assert extract(cohort, out) == 1  # three skipped, the only slide tried failed
    assert summary_of(out)["exit_code"] == 1 and summary_of(out)["n_skipped"] == 3


def test_logs_get_plain_progress_lines_not_bars(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """stderr is a file here (as on a cluster): no carriage returns or cursor escapes."""
    with caplog.at_level(logging.INFO, logger="extract"):
        assert extract(cohort, tmp_path / "out", "--progress-interval-s", "0") == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err and "\x1b[" not in captured.out + captured.err
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("synthetic_a: ") and " tiles (" in line and "tiles/s, ETA" in line for line in lines)
    assert any(line.startswith("slides: 3/3 slides (100 %)") for line in lines)


def test_counts_are_singular_for_one_slide(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    write_tissue_slide(folder / "one.tif", seed=1)
    with caplog.at_level(logging.INFO, logger="extract"):
        assert extract(folder, tmp_path / "out") == 0
    assert any(r.getMessage().startswith("extract: 1 slide for part 1/1") for r in caplog.records)
    from extract.batch.summary import ExtractionSummary, SlideOutcome

    assert ExtractionSummary([SlideOutcome("one.tif", "done")]).format().startswith("extract: 1 slide: 1 done")


def test_help_shows_the_default_of_boolean_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: --plain)" in text and "(default: --no-overwrite)" in text and "(default: --qc)" in text


@pytest.mark.slow
def test_jobs_sharing_a_folder_extract_every_slide_once_even_when_one_is_killed(tmp_path: Path) -> None:
    """Three jobs on one output folder: one is killed mid-slide (a preempted array task), two
    run at once. Every slide is extracted exactly once, and the progress record says so."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for index in range(6):
        write_tissue_slide(folder / f"s{index}.tif", seed=index)
    out = tmp_path / "out"
    args = ["extract", "--slides", str(folder), "--out", str(out), *FAST]
    # The first job hangs in the encoder of its first slide, holding the claims it has planned ahead.
    hang = (
        "import sys, time, extract.run as run; "
        "run.encode_batch = lambda *a, **k: time.sleep(3600); "
        "from gigassl.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    killed = subprocess.Popen([sys.executable, "-c", hang, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((out / "features").glob("*.partial")):
            assert killed.poll() is None, "the first job ended before it could be killed"
            time.sleep(0.05)
        held = sorted(p.name for p in (out / "claims").glob("*.claim"))
        assert held and list((out / "features").glob("*.partial"))
    finally:
        killed.kill()
        killed.wait()
    jobs = [subprocess.Popen([sys.executable, "-m", "gigassl.cli", *args], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for job in jobs:
        _, stderr = job.communicate(timeout=240)
        assert job.returncode == 0, stderr[-2000:]
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines() if line.strip()]
    done = sorted(r["slide"] for r in records if r["status"] == "done")
    assert done == [f"s{index}.tif" for index in range(6)]  # each exactly once
    assert all(r["status"] == "done" and r["pid"] != killed.pid for r in records)
    assert not list((out / "claims").glob("*.claim*")) and not list((out / "features").glob("*.partial"))
    assert all(is_complete(out / "features" / f"s{index}.h5", require_plain=True, verify=True) for index in range(6))
    assert summary_of(out)["folder"] == {"n_done": 6, "n_failed": 0}


def test_a_restart_reads_only_outputs_changed_since_recorded(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import extract.features.manifest as manifest_module

    read: list[str] = []
    original = manifest_module.verify_checksums
    monkeypatch.setattr(
        manifest_module, "verify_checksums", lambda file, path: (read.append(Path(path).name), original(file, path))
    )
    out = tmp_path / "out"
    assert extract(cohort, out) == 0 and read == []  # written complete: recorded without a read
    assert extract(cohort, out) == 0 and summary_of(out)["n_skipped"] == 3 and read == []
    changed = out / "features" / "synthetic_b.h5"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 1_000_000))
    assert extract(cohort, out) == 0 and read == ["synthetic_b.h5"]
    assert extract(cohort, out, "--verify-all") == 0 and sorted(read[1:]) == [
        "synthetic_a.h5",
        "synthetic_b.h5",
        "synthetic_c.h5",
    ]
