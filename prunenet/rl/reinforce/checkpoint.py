"""BASELINE: REINFORCE checkpoints: the shared zip format with `reinforce_policy.safetensors`.

Nothing in them is pickled (`prunenet.rl.checkpoint`); format-1 zips held a `torch.save`d state
dict, read only with `weights_only=True`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from prunenet import __version__
from prunenet.errors import PruneNetError
from prunenet.io.saving import atomic_file
from prunenet.rl.checkpoint import (
    CHECKPOINT_FORMAT,
    ZIP_ERRORS,
    read_metadata,
    read_state_dict,
    write_metadata,
)
from prunenet.rl.checks import count_problem, tensor_problem
from prunenet.rl.reinforce.policy import ALGO, FEATURE_SET, MAX_WIDTH, RowLogitPolicy, state_shapes

RETRAIN = "Re-train it with `prunenet train --algo reinforce`."

STATE_FILE = "reinforce_policy.safetensors"
LEGACY_STATE_FILE = "reinforce_policy.pt"  # format 1: torch.save, read with weights_only=True


def save_reinforce(policy: RowLogitPolicy, out: str | Path, metadata: dict) -> None:
    """Zip with the state dict (safetensors) and PruneNet metadata, written beside `out`.

    Nothing in it is pickled, so loading it cannot run code (`prunenet.rl.checkpoint`).

    :param policy: the baseline policy to save.
    :param out: the checkpoint path (.zip); replaced atomically (staged beside it, renamed).
    :param metadata: training facts (`ratio` is required); kept in `prunenet.json`.
    """
    with atomic_file(out) as path:
        write_metadata(
            path,
            {
                "algo": ALGO,
                "feature_set": FEATURE_SET,
                "ratios": [metadata["ratio"], metadata["ratio"]],
                "d_model": policy.d_model,
                "d_ff": policy.d_ff,
                "prunenet_version": __version__,
                **metadata,
            },
            weights=policy.state_dict(),
            weights_member=STATE_FILE,
        )


def load_reinforce(checkpoint: str | Path, device: str = "cpu") -> tuple[RowLogitPolicy, dict]:
    """The baseline policy and its metadata; clear errors for foreign or damaged files.

    The weights are read from `reinforce_policy.safetensors`, or in format-1 checkpoints from
    `reinforce_policy.pt` with `torch.load(weights_only=True)`: never unpickled. The sizes in
    the metadata and the tensors' names, shapes and values are checked before the policy is built.

    :param checkpoint: a `prunenet train --algo reinforce` zip.
    :param device: where the returned policy lives.
    """
    metadata = read_metadata(checkpoint, ALGO)
    for key in ("d_model", "d_ff"):
        if problem := count_problem(key, metadata.get(key), MAX_WIDTH):
            raise PruneNetError(
                f"REINFORCE checkpoint {checkpoint} cannot be used: its prunenet.json has "
                f"{problem}. {RETRAIN}"
            )
    state = read_state_dict(checkpoint, _state_member(checkpoint))
    network = f"a linear policy over rows of {metadata['d_model']} (its d_model)"
    if problem := tensor_problem(state, state_shapes(metadata["d_model"]), network):
        raise PruneNetError(
            f"REINFORCE checkpoint {checkpoint} cannot be used: {problem}. {RETRAIN}"
        )
    policy = RowLogitPolicy(metadata["d_model"], metadata["d_ff"])
    policy.load_state_dict(state)
    return policy.to(device).eval(), metadata


def resave_reinforce(old: str | Path, new: str | Path) -> None:
    """Write the REINFORCE checkpoint `old` in the current format at `new` (may be the same).

    The weights are read as `load_reinforce` reads them (a format-1 `.pt` only with
    `weights_only=True`) and written as safetensors; all metadata is kept.

    :param old: a REINFORCE checkpoint of any supported format.
    :param new: where the converted zip goes; written beside it, then renamed into place.
    """
    policy, metadata = load_reinforce(old)
    save_reinforce(policy, new, {**metadata, "format": CHECKPOINT_FORMAT})


def _state_member(checkpoint: str | Path) -> str:
    try:
        with zipfile.ZipFile(Path(checkpoint).expanduser()) as archive:
            names = set(archive.namelist())
    except ZIP_ERRORS as error:
        raise PruneNetError(
            f"REINFORCE checkpoint {checkpoint} is corrupt or not a zip file ({error}). {RETRAIN}"
        ) from None
    for member in (STATE_FILE, LEGACY_STATE_FILE):
        if member in names:
            return member
    raise PruneNetError(
        f"REINFORCE checkpoint {checkpoint} has PruneNet metadata but no policy inside (no "
        f"{STATE_FILE}). Re-train it with `prunenet train --algo reinforce`."
    )
