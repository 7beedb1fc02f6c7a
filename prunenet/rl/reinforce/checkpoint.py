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
from prunenet.rl.checkpoint import CHECKPOINT_FORMAT, read_metadata, read_state_dict, write_metadata
from prunenet.rl.reinforce.policy import ALGO, FEATURE_SET, RowLogitPolicy

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
    `reinforce_policy.pt` with `torch.load(weights_only=True)`: never unpickled.

    :param checkpoint: a `prunenet train --algo reinforce` zip.
    :param device: where the returned policy lives.
    """
    metadata = read_metadata(checkpoint, ALGO)
    state = read_state_dict(checkpoint, _state_member(checkpoint))
    try:
        policy = RowLogitPolicy(_positive_int(metadata, "d_model"), _positive_int(metadata, "d_ff"))
        policy.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise PruneNetError(
            f"REINFORCE checkpoint {checkpoint} could not be read ({type(error).__name__}: "
            f"{error}). Re-train it with `prunenet train --algo reinforce`."
        ) from None
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
    except (zipfile.BadZipFile, OSError) as error:
        raise PruneNetError(
            f"REINFORCE checkpoint {checkpoint} is corrupt or not a zip file ({error})."
        ) from None
    for member in (STATE_FILE, LEGACY_STATE_FILE):
        if member in names:
            return member
    raise PruneNetError(
        f"REINFORCE checkpoint {checkpoint} has PruneNet metadata but no policy inside (no "
        f"{STATE_FILE}). Re-train it with `prunenet train --algo reinforce`."
    )


def _positive_int(metadata: dict, key: str) -> int:
    value = metadata[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value
