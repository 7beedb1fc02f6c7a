"""PPO policy checkpoints: load a `RowScoringPolicy` for any width, convert format-1 zips.

The format is `prunenet.rl.checkpoint`'s; this module knows what a PPO zip holds (SB3's members
plus `policy.safetensors`) and how to rebuild the network from it without unpickling.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from prunenet.errors import PruneNetError
from prunenet.io.saving import atomic_file
from prunenet.rl.checkpoint import (
    CHECKPOINT_FORMAT,
    METADATA_FILE,
    POLICY_KWARGS,
    member_names,
    policy_kwargs,
    read_member,
    read_metadata,
    read_state_dict,
    tensors_to_bytes,
    write_metadata,
)
from prunenet.rl.checks import tensor_problem
from prunenet.rl.observation import spaces_for
from prunenet.rl.ppo.policy import DEFAULT_HIDDEN, RowScoringPolicy, state_shapes

WEIGHTS_FILE = "policy.safetensors"
LEGACY_WEIGHTS_FILE = "policy.pth"  # SB3's, the only weights of format-1 checkpoints
SB3_DATA_FILE = "data"


def write_policy_members(checkpoint: str | Path, metadata: dict, policy: RowScoringPolicy) -> None:
    """Add what PruneNet loads from a PPO zip: `policy.safetensors` and `prunenet.json`.

    :param checkpoint: the zip (usually SB3's archive from `agent.save`).
    :param metadata: JSON facts about the run; the policy's constructor arguments are added.
    :param policy: the trained policy.
    """
    kwargs = {name: getattr(policy, name) for name in POLICY_KWARGS}
    write_metadata(
        checkpoint,
        {**metadata, "policy_kwargs": kwargs},
        weights=policy.state_dict(),
        weights_member=WEIGHTS_FILE,
    )


def load_policy(
    checkpoint: str | Path, width: int, device: str = "cpu"
) -> tuple[RowScoringPolicy, dict]:
    """A `RowScoringPolicy` for FFNs of `width` rows, loaded from any-width checkpoint.

    Reads only `prunenet.json` and the weights, never unpickling anything (module comment above);
    the weights are checked against the network the metadata declares before it is built.

    :param checkpoint: a `prunenet train` zip, format 2 or (read safely) format 1.
    :param width: row count of the FFNs it will score (shapes the spaces, not the weights).
    :param device: where the returned policy lives.
    :return: the policy in eval mode and the checkpoint's metadata.
    """
    metadata = read_metadata(checkpoint, "ppo")
    state, kwargs = _read_policy(Path(checkpoint).expanduser(), metadata)
    observation_space, action_space = spaces_for(width, metadata["feature_set"])
    policy = RowScoringPolicy(observation_space, action_space, lambda _: 0.0, **kwargs)
    policy.load_state_dict(state)  # names and shapes are checked (`_read_policy`)
    return policy.to(device).eval(), metadata


def resave_checkpoint(old: str | Path, new: str | Path) -> None:
    """Write the PPO checkpoint `old` in the current format at `new` (the same path is fine).

    Every member of `old` is copied byte for byte (SB3's too, so `PPO.load` keeps working for
    users who trust the file) and all metadata is kept; the weights are added as
    `policy.safetensors` and the constructor arguments as `policy_kwargs`. The weights are read
    the way `load_policy` reads them, so a checkpoint it refuses is refused here too, and what
    was written scores exactly as before (the tensors are copied, not recomputed).

    :param old: a PPO checkpoint of any supported format.
    :param new: where the converted zip goes; written beside it, then renamed into place.
    """
    old, new = Path(old).expanduser(), Path(new).expanduser()
    metadata = read_metadata(old, "ppo")
    state, kwargs = _read_policy(old, metadata)
    metadata = {**metadata, "format": CHECKPOINT_FORMAT, "policy_kwargs": kwargs}
    with (
        atomic_file(new) as path,
        zipfile.ZipFile(old) as source,
        zipfile.ZipFile(path, "w") as target,
    ):
        for item in source.infolist():
            if item.filename not in (METADATA_FILE, WEIGHTS_FILE):
                target.writestr(item, source.read(item.filename))
        target.writestr(WEIGHTS_FILE, tensors_to_bytes(state))
        target.writestr(METADATA_FILE, json.dumps(metadata, indent=2))


def _read_policy(path: Path, metadata: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and constructor arguments of a PPO checkpoint, read safely for its format and
    checked against the network they declare (so nothing is built from a file's bad claims)."""
    state, kwargs = _read_members(path, metadata)
    hidden = kwargs.get("hidden", DEFAULT_HIDDEN)
    columns = spaces_for(1, metadata["feature_set"])[0].shape[-1]
    network = (
        f"this PruneNet's policy network (hidden={hidden}, {columns} feature columns for "
        f"feature set {metadata['feature_set']!r})"
    )
    if problem := tensor_problem(state, state_shapes(columns, hidden), network):
        raise PruneNetError(
            f"Policy checkpoint {path} cannot be used: {problem}. Re-train it with "
            "`prunenet train`."
        )
    return state, kwargs


def _read_members(path: Path, metadata: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and constructor arguments as stored, by the checkpoint's format."""
    names = member_names(path)
    if WEIGHTS_FILE in names:
        if "policy_kwargs" not in metadata:
            raise PruneNetError(
                f"Policy checkpoint {path} has {WEIGHTS_FILE} but no 'policy_kwargs' in its "
                f"{METADATA_FILE}, so the network's shape is unknown. Re-train it with "
                "`prunenet train`."
            )
        kwargs = policy_kwargs(path, metadata["policy_kwargs"], METADATA_FILE)
        return read_state_dict(path, WEIGHTS_FILE), kwargs
    if SB3_DATA_FILE not in names or LEGACY_WEIGHTS_FILE not in names:
        raise PruneNetError(
            f"Policy checkpoint {path} has PruneNet metadata but no policy inside (neither "
            f"{WEIGHTS_FILE} nor SB3's '{SB3_DATA_FILE}' and '{LEGACY_WEIGHTS_FILE}'). "
            "Re-train it with `prunenet train`."
        )
    # Format 1: SB3's `data` is JSON in which every value SB3 could not write as plain JSON is a
    # cloudpickle ({":serialized:": ...}). We parse the JSON and look only at `policy_kwargs`.
    try:
        sb3_data = json.loads(read_member(path, SB3_DATA_FILE))
    except (ValueError, RecursionError) as error:
        raise PruneNetError(
            f"Policy checkpoint {path} could not be read: its SB3 '{SB3_DATA_FILE}' is not "
            f"JSON ({error}). Re-train it with `prunenet train`."
        ) from None
    if not isinstance(sb3_data, dict):
        raise PruneNetError(
            f"Policy checkpoint {path} could not be read: its SB3 '{SB3_DATA_FILE}' is a JSON "
            f"{type(sb3_data).__name__}, not an object. Re-train it with `prunenet train`."
        )
    value = sb3_data.get("policy_kwargs")
    kwargs = policy_kwargs(path, {} if value is None else value, f"SB3 '{SB3_DATA_FILE}'")
    return read_state_dict(path, LEGACY_WEIGHTS_FILE), kwargs
