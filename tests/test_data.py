import dataclasses
import logging

import h5py
import numpy as np
import pytest
import torch

from extract.features.bank_chunks import BankChunkReader
from extract.features.slide_file import FeatureFileError, SlideFeatures, SlideFileWriter
from gigassl.sparse.maps import MAP_MARGIN, merge_duplicates
from gigassl.synthetic.cohort import GRID_ATTRS, random_encoder_info, write_synthetic_cohort
from gigassl.training.data import (
    EpochBatchSampler,
    SlideViewDataset,
    collate_slide_views,
    global_batch_size,
    scan_features_folder,
)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    write_synthetic_cohort(folder, n_slides=6, n_tiles=20, n_augmentations=3, bank_size=8, seed=1)
    return folder


def _write_plain_only(path):
    with SlideFileWriter(path, slide_id=path.stem, source="x", settings={}, encoder=random_encoder_info()) as writer:
        writer.create_plain(np.zeros((4, 2), dtype=np.int64), GRID_ATTRS)
        writer.write_plain_rows(0, np.ones((4, 256), dtype=np.float32))


def test_scan_lists_slides_and_encoder(cohort_dir):
    cohort = scan_features_folder(cohort_dir, 5)
    assert cohort.slide_ids == [f"slide_{i:03d}" for i in range(6)]
    assert {(s.n_augmentations, s.bank_size, s.tile_step_level0) for s in cohort.slides} == {(3, 8, 448.0)}
    assert cohort.encoder.name == "random" and cohort.encoder.sha256 == random_encoder_info().sha256


def test_empty_or_missing_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no"):
        scan_features_folder(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_features_folder(tmp_path / "nope", 5)


def test_files_without_bank_are_listed_or_skipped(tmp_path, caplog):
    write_synthetic_cohort(tmp_path, n_slides=3, n_tiles=10, n_augmentations=2, bank_size=6)
    _write_plain_only(tmp_path / "plain_a.h5")
    _write_plain_only(tmp_path / "plain_b.h5")
    with pytest.raises(FeatureFileError) as error:
        scan_features_folder(tmp_path, 5)
    message = str(error.value)
    assert "2 of 5 files" in message and "plain_a.h5" in message and "plain_b.h5" in message
    assert "--skip-bad-files" in message
    with caplog.at_level(logging.WARNING, logger="gigassl.training.data"):
        cohort = scan_features_folder(tmp_path, 5, skip_bad_files=True)
    assert len(cohort.slides) == 3 and [p.name for p, _ in cohort.skipped] == ["plain_a.h5", "plain_b.h5"]
    assert "plain_a.h5" in caplog.text


def test_nan_features_are_refused_naming_the_file(tmp_path):
    paths = write_synthetic_cohort(tmp_path, n_slides=3, n_tiles=10, n_augmentations=2, bank_size=6)
    with h5py.File(paths[1], "a") as handle:
        handle["aug_features"][1, 7, 2] = np.inf  # stored (A, 256, K)
    for skip in (False, True):  # a corrupt bank is never silently skipped
        with pytest.raises(FeatureFileError, match=r"slide_001\.h5.*NaN or inf in augmentation 1"):
            scan_features_folder(tmp_path, 5, skip_bad_files=skip)
    # without the up-front scan, reading that augmentation refuses it all the same
    cohort = scan_features_folder(tmp_path, 5, check_finite=False)
    dataset = SlideViewDataset(cohort, 5)
    with pytest.raises(FeatureFileError, match=r"slide_001\.h5"):
        for epoch in range(20):
            dataset[(epoch, 1)]


def test_fewer_tiles_than_t_sample_with_replacement(tmp_path, caplog):
    write_synthetic_cohort(tmp_path, n_slides=2, n_tiles=3, n_augmentations=2, bank_size=3)
    with caplog.at_level(logging.WARNING, logger="gigassl.training.data"):
        cohort = scan_features_folder(tmp_path, 5)
    assert "fewer than T = 5" in caplog.text and "slide_000 (K=3)" in caplog.text
    index, view1, _view2 = SlideViewDataset(cohort, 5)[(0, 0)]
    assert index == 0 and view1[0].shape == (5, 256) and view1[1].shape == (5, 2)


def test_views_are_reproducible_and_come_from_one_augmentation(cohort_dir):
    cohort = scan_features_folder(cohort_dir, 5)
    dataset = SlideViewDataset(cohort, 5, seed=3)
    again = SlideViewDataset(cohort, 5, seed=3)
    _, a1, a2 = dataset[(2, 4)]
    _, b1, b2 = again[(2, 4)]
    for x, y in ((a1, b1), (a2, b2)):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    _, c1, _ = dataset[(3, 4)]
    assert not np.array_equal(a1[0], c1[0])
    with SlideFeatures(cohort.slides[4].path) as slide:
        banks = [slide.augmentation(a)[0] for a in range(slide.n_augmentations)]
    for features, cells in (a1, a2):
        assert features.shape == (5, 256) and cells.dtype == np.int64 and cells.min() == 0
        rows_in = [
            np.isin(features.view([("", features.dtype)] * 256), bank.view([("", bank.dtype)] * 256)).all() for bank in banks
        ]
        assert any(rows_in), "a view mixes tiles of several augmentations"
        # T distinct rows of the augmentation (K = 8 ≥ T: no replacement)
        assert len(np.unique(features, axis=0)) == 5


def test_view_reads_only_the_chosen_augmentation(cohort_dir, monkeypatch):
    cohort = scan_features_folder(cohort_dir, 5)
    assert all(entry.chunks is not None for entry in cohort.slides)  # the writer's layout: direct reads
    dataset = SlideViewDataset(cohort, 5)
    reads = []
    original = BankChunkReader.read
    monkeypatch.setattr(
        BankChunkReader, "read", lambda self, chunks, a, rows=None: reads.append(a) or original(self, chunks, a, rows)
    )
    monkeypatch.setattr(SlideFeatures, "augmentation", lambda *args: pytest.fail("read through h5py"))
    monkeypatch.setattr(SlideFeatures, "features", lambda self: pytest.fail("plain features read"))
    dataset[(0, 0)]
    assert len(reads) == 2


def test_views_are_the_same_without_the_chunk_index(cohort_dir):
    """A bank stored in another layout (no chunk index) is read through h5py: same views."""
    cohort = scan_features_folder(cohort_dir, 5)
    direct = SlideViewDataset(cohort, 5, seed=3)
    fallback_cohort = dataclasses.replace(cohort, slides=tuple(dataclasses.replace(s, chunks=None) for s in cohort.slides))
    fallback = SlideViewDataset(fallback_cohort, 5, seed=3)
    for key in [(1, 0), (1, 5), (2, 3)]:
        for x, y in zip(direct[key][1:], fallback[key][1:]):
            np.testing.assert_array_equal(x[0], y[0])
            np.testing.assert_array_equal(x[1], y[1])
    direct.close()
    fallback.close()


def test_sampler_runs_through_several_epochs_in_one_pass():
    sampler = EpochBatchSampler(10, 4, seed=0)
    per_epoch = []
    for epoch in (2, 3, 4):
        sampler.set_epoch(epoch)
        per_epoch += list(sampler)
    sampler.set_epoch(2, 4)
    assert len(sampler) == 6 and sampler.steps_per_epoch == 2
    assert list(sampler) == per_epoch
    with pytest.raises(ValueError, match="before"):
        sampler.set_epoch(4, 3)


def test_sampler_splits_global_batches_among_ranks():
    single = EpochBatchSampler(10, 4, seed=0)
    single.set_epoch(3)
    batches = list(single)
    assert len(batches) == len(single) == 2  # the incomplete last batch is dropped
    shares = []
    for rank in range(2):
        sampler = EpochBatchSampler(10, 4, seed=0, rank=rank, world_size=2)
        sampler.set_epoch(3)
        shares.append(list(sampler))
    for step, batch in enumerate(batches):
        assert shares[0][step] + shares[1][step] == batch
        assert all(epoch == 3 for epoch, _ in batch)
    single.set_epoch(4)
    assert list(single) != batches
    assert global_batch_size(256, 10, 4) == 8 and global_batch_size(6, 10, 1) == 6
    with pytest.raises(ValueError, match="at least 2 slides"):
        global_batch_size(256, 1, 1)


def test_collate_puts_first_views_then_second_views(cohort_dir):
    cohort = scan_features_folder(cohort_dir, 5)
    dataset = SlideViewDataset(cohort, 5)
    items = [dataset[(0, i)] for i in (5, 2, 0)]
    batch = collate_slide_views(items)
    assert batch.n_slides == 3 and batch.sparse.batch_size == 6
    assert batch.slide_indices.tolist() == [5, 2, 0]
    maps = batch.sparse.indices[:, 0]
    assert set(maps.tolist()) == set(range(6))
    # map 4 is the second view of slide 2: its sites hold that view's tiles, duplicates averaged
    features, cells = items[1][2]
    unique, means = merge_duplicates(cells, features)
    sites = batch.sparse.indices[maps == 4]
    assert len(sites) == len(unique)
    expected = {(int(x) + MAP_MARGIN, int(y) + MAP_MARGIN): row for (x, y), row in zip(unique, means)}
    for (_, y, x), row in zip(sites.tolist(), batch.sparse.features[maps == 4].numpy()):
        np.testing.assert_allclose(row, expected[(x, y)], rtol=1e-6)


def test_workers_give_the_same_batches(cohort_dir):
    cohort = scan_features_folder(cohort_dir, 5)
    batches = {}
    for workers in (0, 2):
        sampler = EpochBatchSampler(len(cohort.slides), 4, seed=0)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(
            SlideViewDataset(cohort, 5), batch_sampler=sampler, collate_fn=collate_slide_views, num_workers=workers
        )
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2]):
        torch.testing.assert_close(a.sparse.features, b.sparse.features, rtol=0, atol=0)
        torch.testing.assert_close(a.sparse.indices, b.sparse.indices, rtol=0, atol=0)


def test_bank_only_files_carry_their_grid_and_old_ones_are_named(tmp_path):
    folder = tmp_path / "bank_only"
    paths = write_synthetic_cohort(folder, n_slides=3, n_tiles=10, n_augmentations=2, bank_size=4, plain=False)
    cohort = scan_features_folder(folder, 3)  # was a KeyError: 'patch_size_level0'
    assert [s.tile_step_level0 for s in cohort.slides] == [448.0] * 3
    with h5py.File(paths[1], "a") as handle:  # as written by `extract --no-plain` before the fix
        for key in list(handle["aug_coords"].attrs):
            del handle["aug_coords"].attrs[key]
    with pytest.raises(FeatureFileError, match=r"slide_001\.h5: no tile size in level-0 pixels .* re-extract it"):
        scan_features_folder(folder, 3)


def test_mixed_tile_grids_are_refused_unless_allowed(tmp_path, caplog):
    write_synthetic_cohort(tmp_path, n_slides=3, n_tiles=10, n_augmentations=1, bank_size=4)
    other = write_synthetic_cohort(
        tmp_path / "other",
        n_slides=4,
        n_tiles=10,
        n_augmentations=1,
        bank_size=4,
        grid_attrs=dict(patch_size=256, target_mpp=1.0),
    )
    other[3].rename(tmp_path / "slide_900.h5")
    with pytest.raises(
        FeatureFileError,
        match=r"2 different tile grids \(224 px at 0\.5 µm/px: 3 files \(e\.g\. "
        r"slide_000\.h5\); 256 px at 1\.0 µm/px: 1 file \(e\.g\. "
        r"slide_900\.h5\)\).*--allow-mixed-grids",
    ):
        scan_features_folder(tmp_path, 3)
    with caplog.at_level(logging.WARNING):
        cohort = scan_features_folder(tmp_path, 3, allow_mixed_grids=True)
    assert "training on 2 different tile grids" in caplog.text
    assert cohort.grids() == [dict(tile_size_px=224, mpp=0.5, n_slides=3), dict(tile_size_px=256, mpp=1.0, n_slides=1)]


def test_a_folder_of_trident_files_says_train_needs_the_bank_of_gigassl_extract(tmp_path):
    from test_plain_features import write_trident_file

    for name in ("TCGA-A", "TCGA-B"):
        write_trident_file(tmp_path / f"{name}.h5", width=32)
    with pytest.raises(FeatureFileError) as error:
        scan_features_folder(tmp_path, 5)
    message = str(error.value)
    assert "2 of 2 files" in message and "TCGA-A.h5" in message
    assert "`gigassl extract --bank`" in message and "same tile encoder" in message


def test_the_cohort_encoder_carries_the_banks_architecture_and_width(tmp_path):
    from extract.encoders.tile_encoder import EncoderInfo

    encoder = EncoderInfo("fm.pt2", "ab" * 32, "export", "some-vit", 20, "torch.export")
    write_synthetic_cohort(tmp_path, n_slides=2, n_tiles=10, n_augmentations=2, bank_size=6, encoder=encoder)
    found = scan_features_folder(tmp_path, 5).encoder
    assert (found.name, found.sha256, found.source, found.arch, found.width) == ("fm.pt2", "ab" * 32, "export", "some-vit", 20)
