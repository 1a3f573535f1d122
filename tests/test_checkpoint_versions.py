"""Stage 2's checkpoints are read only as this version writes them: an older format version, an
unsealed file, or a sparse head missing a field is refused in one line that says to train again
(no fallbacks for checkpoints written before an option existed). MoCo's are in test_moco."""

from __future__ import annotations

import pytest
import torch

from extract.checkpoints.sealed import CheckpointIntegrityError, save_atomic
from extract.errors import UserError
from gigassl.model import HeadSpec
from gigassl.training.checkpoint import CHECKPOINT_VERSION, load_checkpoint, load_model, set_rng_state
from test_embed import write_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "model.pt", head=HeadSpec.generic(256, input_projection_dim=64))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_checkpoint_as_written_loads(checkpoint):
    model, payload = load_model(checkpoint)
    assert payload["format_version"] == CHECKPOINT_VERSION == 2
    assert model.head == HeadSpec.generic(256, input_projection_dim=64)


def test_an_older_format_version_is_refused_in_one_line(checkpoint, tmp_path):
    payload = load_checkpoint(checkpoint)
    payload["format_version"] = 1  # resealed: only the version differs
    save_atomic(payload, tmp_path / "old.pt")
    for read in (load_checkpoint, load_model):
        with pytest.raises(UserError, match=r"old\.pt: checkpoint format version 1 .*train the slide encoder again") as refused:
            read(tmp_path / "old.pt")
        _one_line(refused)


def test_an_unsealed_checkpoint_is_refused_in_one_line(checkpoint, tmp_path):
    payload = load_checkpoint(checkpoint)
    payload.pop("content_sha256")  # as versions before the seal wrote it, or another tool would
    torch.save(payload, tmp_path / "unsealed.pt")
    with pytest.raises(CheckpointIntegrityError, match=r"unsealed\.pt: no content hash.*train again") as refused:
        load_model(tmp_path / "unsealed.pt")
    _one_line(refused)


@pytest.mark.parametrize("field", ["input_projection_dim", "source"])
def test_a_sparse_head_missing_a_field_is_refused_not_defaulted(checkpoint, tmp_path, field):
    payload = load_checkpoint(checkpoint)
    del payload["architecture"][field]  # no ResNet18 default for what the checkpoint does not say
    save_atomic(payload, tmp_path / "partial.pt")
    with pytest.raises(
        UserError, match=rf"partial\.pt: sparse head fields \['{field}'\] missing; train the slide encoder again"
    ) as refused:
        load_model(tmp_path / "partial.pt")
    _one_line(refused)


def test_a_sparse_head_that_is_not_a_mapping_is_refused(checkpoint, tmp_path):
    payload = load_checkpoint(checkpoint)
    payload["architecture"] = None
    save_atomic(payload, tmp_path / "none.pt")
    with pytest.raises(UserError, match=r"none\.pt: the sparse head is NoneType, not a mapping"):
        load_model(tmp_path / "none.pt")


def test_the_rng_state_is_the_cpu_generator_only():
    state = {"torch": torch.get_rng_state()}
    expected = torch.rand(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(2), expected)
