"""The policy checkpoint format shared by every trainer: a zip PruneNet reads without pickle.

A checkpoint is a zip with `prunenet.json` (metadata: algorithm, feature set, training facts and
the network's constructor arguments, plain JSON) and one safetensors member with the weights
(`policy.safetensors` for PPO, `reinforce_policy.safetensors` for the REINFORCE baseline). PPO
zips also keep SB3's own members (written by `agent.save`), so that a user who trusts the file
can still `PPO.load` it; those hold cloudpickled objects, and unpickling runs whatever code the
file's author put there, so PruneNet never opens them. Format-1 checkpoints (before the
safetensors members) are read with `torch.load(weights_only=True)` and plain `json.loads`, and
refused where that is not enough.

Writing goes through `prunenet.io.saving.atomic_file`, so a crash never leaves half a zip.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import safetensors.torch
import torch

from prunenet.analysis.features import FEATURE_SETS, FEATURE_VERSION
from prunenet.errors import PruneNetError, clip
from prunenet.rl.checks import MAX_HIDDEN, count_problem

METADATA_FILE = "prunenet.json"
# 2: weights in safetensors and constructor arguments in prunenet.json, nothing pickled.
CHECKPOINT_FORMAT = 2
# Constructor arguments a checkpoint may set, each a plain JSON number of this type. `hidden` is
# the only one that shapes the PPO network; anything else would be SB3 machinery PruneNet ignores.
POLICY_KWARGS: dict[str, type] = {"hidden": int}
# Feature sets each trainer's checkpoints may name: PPO policies read `prunenet.analysis.features`
# columns, the REINFORCE baseline (`prunenet.rl.reinforce`) the raw rows of the weights.
ALGO_FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "ppo": tuple(FEATURE_SETS),
    "reinforce": ("weights-raw",),
}
# Members PruneNet reads are kilobytes; a larger one (a zip bomb) is refused before inflating it.
MAX_MEMBER_BYTES = 256 * 1024**2
# What reading a zip can raise besides PruneNetError: BadZipFile (bad CRC or header), OSError,
# KeyError (no such member), EOFError (truncated data), ValueError (bad JSON or UTF-8),
# zlib/lzma errors (a damaged compressed stream), RecursionError (JSON nested thousands deep),
# NotImplementedError (an unsupported compression method), RuntimeError (an encrypted member).
ZIP_ERRORS = (zipfile.BadZipFile, OSError, KeyError, EOFError, ValueError, zlib.error,
              lzma.LZMAError, RecursionError, NotImplementedError, RuntimeError)  # fmt: skip


def write_metadata(
    checkpoint: str | Path,
    metadata: dict,
    weights: dict[str, torch.Tensor] | None = None,
    weights_member: str = "policy.safetensors",
) -> None:
    """Add PruneNet's metadata, and optionally the weights as safetensors, into the zip.

    :param checkpoint: the zip to append to (SB3's archive, or a new one).
    :param metadata: JSON-serialisable facts about the run (including `policy_kwargs` where the
        network has constructor arguments); `format` and `feature_version` are added.
    :param weights: the policy's state dict, written as `weights_member`.
    :param weights_member: the member name the algorithm's loader reads.
    """
    full = {"format": CHECKPOINT_FORMAT, "feature_version": FEATURE_VERSION, **metadata}
    with zipfile.ZipFile(checkpoint, "a") as archive:
        if weights is not None:
            archive.writestr(weights_member, tensors_to_bytes(weights))
        archive.writestr(METADATA_FILE, json.dumps(full, indent=2))


def read_metadata(checkpoint: str | Path, algo: str | None = None) -> dict:
    """The checkpoint's metadata, validated; clear errors for missing, corrupt or foreign files.

    :param checkpoint: a `prunenet train` zip.
    :param algo: the algorithm the caller loads (`ppo`, `reinforce`); another one is refused
        with a pointer to the loader that picks the right one.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise PruneNetError(
            f"Policy checkpoint {path} does not exist. Train one with `prunenet train`."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_FILE not in archive.namelist():
                # A truncated checkpoint can look like this too: its SB3 members are zips.
                raise PruneNetError(
                    f"{path} is corrupt or not a PruneNet policy checkpoint (no {METADATA_FILE} "
                    "in it). Train one with `prunenet train`, or restore the file."
                )
            metadata = json.loads(read_checked(archive, METADATA_FILE))
    except PruneNetError:  # a ValueError too, but already says what is wrong
        raise
    except ZIP_ERRORS as error:
        raise PruneNetError(
            f"Policy checkpoint {path} is corrupt or not a zip file ({_reason(error)}). "
            "Re-train it with `prunenet train` or restore the file."
        ) from None
    validate_metadata(path, metadata)
    if algo is not None and metadata["algo"] != algo:
        raise PruneNetError(
            f"{path} is a {metadata['algo']!r} checkpoint, not a {algo!r} one; load it with "
            "prunenet.scoring.registry.load_scorer_from_checkpoint, which picks the right loader "
            "(scripts/convert_policy.py converts either)."
        )
    return metadata


def refuse_existing_checkpoint(out: str | Path, overwrite: bool) -> None:
    """Refuse to train into `out` if a file is there already, unless `overwrite`.

    :param out: the checkpoint path a training run will write its best policy to.
    :param overwrite: replace an existing file at `out`.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise PruneNetError(f"Checkpoint path {path} is a folder; give a file path ending in .zip.")
    if os.path.lexists(path) and not overwrite:
        raise PruneNetError(
            f"Checkpoint {path} already exists. Pass --overwrite (overwrite=True) to replace it "
            "with this run's best policy, or choose another --out."
        )
    if os.path.lexists(path) and not is_policy_checkpoint(path):
        # --overwrite replaces a checkpoint, never a user's other file that happens to be there.
        raise PruneNetError(
            f"{path} is not a policy checkpoint PruneNet wrote (a zip holding {METADATA_FILE}"
            " or an older SB3 policy), so --overwrite does not replace it. Choose another --out."
        )


def is_policy_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a regular file that is a policy zip: PruneNet's format (with its JSON
    metadata member) or an older SB3 zip (`data` and `policy.pth`). Only the zip's directory
    is read.

    :param path: the file.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return METADATA_FILE in names or {"data", "policy.pth"} <= names


def read_state_dict(checkpoint: str | Path, member: str) -> dict[str, torch.Tensor]:
    """The tensors stored in `member` of the zip `checkpoint`, on the CPU, never unpickled.

    `.safetensors` members are parsed by safetensors; `.pt`/`.pth` members (older checkpoints)
    by `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers and
    refuses anything else instead of running it.

    :param checkpoint: the zip.
    :param member: the member's name inside it.
    """
    data = read_member(Path(checkpoint).expanduser(), member)
    if member.endswith(".safetensors"):
        try:
            state = safetensors.torch.load(data)
        except Exception as error:  # safetensors raises its own SafetensorError and others
            raise PruneNetError(
                f"Policy checkpoint {checkpoint} could not be read: {member} is not a valid "
                f"safetensors file ({type(error).__name__}: {error}). Re-train it with "
                "`prunenet train` or restore the file."
            ) from None
    else:
        state = torch_load_weights_only(checkpoint, member, data)
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise PruneNetError(
            f"Policy checkpoint {checkpoint} could not be read: {member} holds "
            f"{type(state).__name__}, not a dict of named tensors. Re-train it with "
            "`prunenet train`."
        )
    return state


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (contiguous CPU copies: safetensors needs both)."""
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def validate_metadata(path: Path, metadata: object) -> None:
    """Refuse metadata PruneNet cannot act on, saying what is wrong (never a KeyError later)."""
    retrain = "Re-train it with `prunenet train`."
    if not isinstance(metadata, dict):
        raise PruneNetError(
            f"Policy checkpoint {path} has a {METADATA_FILE} that is a JSON "
            f"{type(metadata).__name__}, not an object of metadata. {retrain}"
        )
    if metadata.get("feature_version") != FEATURE_VERSION:
        raise PruneNetError(
            f"Policy checkpoint {path} was trained with feature version "
            f"{metadata.get('feature_version')}, this PruneNet computes version "
            f"{FEATURE_VERSION}: its scores would be meaningless. {retrain}"
        )
    version = metadata.get("format", 1)  # format 1 did not always record itself
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PruneNetError(
            f"Policy checkpoint {path} has an invalid format {version!r}. {retrain}"
        )
    if version > CHECKPOINT_FORMAT:
        raise PruneNetError(
            f"Policy checkpoint {path} is in format {version}, newer than this PruneNet reads "
            f"(up to {CHECKPOINT_FORMAT}). Upgrade PruneNet."
        )
    algo = metadata.get("algo")
    if algo not in ALGO_FEATURE_SETS:
        known = ", ".join(ALGO_FEATURE_SETS)
        found = "has no 'algo'" if algo is None else f"names the algo {algo!r}"
        raise PruneNetError(
            f"Policy checkpoint {path} {found} in its {METADATA_FILE}, so PruneNet cannot tell "
            f"which policy it holds (known: {known}). {retrain}"
        )
    feature_set = metadata.get("feature_set")
    if feature_set not in ALGO_FEATURE_SETS[algo]:
        known = ", ".join(ALGO_FEATURE_SETS[algo])
        found = "has no 'feature_set'" if feature_set is None else f"names {feature_set!r}"
        raise PruneNetError(
            f"Policy checkpoint {path} {found} as its feature set; a {algo} policy reads one of "
            f"{known}, so PruneNet cannot compute its inputs. {retrain}"
        )
    if "policy_kwargs" in metadata:
        policy_kwargs(path, metadata["policy_kwargs"], METADATA_FILE)


def policy_kwargs(path: Path, value: object, where: str) -> dict:
    """Constructor arguments, accepted only as a JSON object of the known numeric arguments."""
    if isinstance(value, dict) and ":serialized:" in value:
        raise PruneNetError(
            f"Policy checkpoint {path} stores its policy_kwargs (in {where}) as a cloudpickle. "
            f"Reading them would need unpickling, which PruneNet never does because a pickle can "
            "run code. Re-train it with `prunenet train`; or, only if you trust whoever made "
            "the file, load it with stable_baselines3's PPO.load and save it again with "
            "`agent.save(path)` and `prunenet.rl.ppo.policy.write_metadata(path, metadata, "
            "policy=agent.policy)`."
        )
    if not isinstance(value, dict):
        raise PruneNetError(
            f"Policy checkpoint {path} has policy_kwargs (in {where}) that are a JSON "
            f"{type(value).__name__}, not an object of numbers. Re-train it with `prunenet train`."
        )
    for name, number in value.items():
        if name not in POLICY_KWARGS:
            raise PruneNetError(
                f"Policy checkpoint {path} sets the policy argument {name!r} (in {where}); "
                f"PruneNet only reads {', '.join(POLICY_KWARGS)}. Re-train it with "
                "`prunenet train`."
            )
        # Every argument is a width so far: checked before the network is built (MAX_HIDDEN).
        if problem := count_problem(name, number, MAX_HIDDEN):
            raise PruneNetError(
                f"Policy checkpoint {path} has an unusable policy argument in {where}: "
                f"{problem}. Re-train it with `prunenet train`."
            )
    return dict(value)


def _reason(error: BaseException) -> str:
    """An exception for a message: its type where its text alone would not say what failed."""
    text = clip(str(error), 200)
    if isinstance(error, (zipfile.BadZipFile, OSError)):
        return text
    return f"{type(error).__name__}: {text}"


def torch_load_weights_only(checkpoint: str | Path, member: str, data: bytes) -> object:
    """`torch.load` that rebuilds only tensors and plain containers, never other objects."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
        reason = found.group(1).split(". ")[0] if found else type(error).__name__
        raise PruneNetError(
            f"Policy checkpoint {checkpoint} could not be read: {member} is not plain tensors "
            f"({reason}). It is damaged, or holds other objects, and rebuilding those would need "
            "unpickling, which PruneNet never does because a pickle can run code. Re-train it "
            "with `prunenet train`; checkpoints PruneNet writes hold only tensors."
        ) from None
    except Exception as error:  # torch raises assorted types for damaged or foreign files
        raise PruneNetError(
            f"Policy checkpoint {checkpoint} could not be read: {member} is damaged or not a "
            f"torch file ({type(error).__name__}: {error}). Re-train it with `prunenet train` "
            "or restore the file."
        ) from None


def member_names(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return set(archive.namelist())
    except ZIP_ERRORS as error:
        raise PruneNetError(
            f"Policy checkpoint {path} is corrupt or not a zip file ({_reason(error)}). "
            "Re-train it with `prunenet train` or restore the file."
        ) from None


def read_member(path: Path, member: str) -> bytes:
    """The bytes of `member`, checked against its CRC; damage becomes a PruneNetError."""
    try:
        with zipfile.ZipFile(path) as archive:
            return read_checked(archive, member)
    except ZIP_ERRORS as error:
        raise PruneNetError(
            f"Policy checkpoint {path} could not be read ({_reason(error)}). "
            "Re-train it with `prunenet train` or restore the file."
        ) from None


def read_checked(archive: zipfile.ZipFile, member: str) -> bytes:
    """`archive.read(member)`, refusing a declared size no PruneNet member has (zipfile never
    inflates past the declared size, so the check bounds the memory used)."""
    size = archive.getinfo(member).file_size
    if size > MAX_MEMBER_BYTES:
        raise zipfile.BadZipFile(
            f"{member} declares {size} bytes, more than any PruneNet checkpoint member"
        )
    return archive.read(member)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training, with where the best checkpoint so far was saved.

    Still a `KeyboardInterrupt`, so callers that stop on one keep doing so.

    :param checkpoint: path of the best checkpoint saved by this run, None if none was yet.
    :param step: the PPO step (or REINFORCE episode) that checkpoint is from.
    :param reward: its evaluation reward.
    :param unit: what `step` counts ("step" or "episode").
    """

    def __init__(
        self, checkpoint: str | None, step: int = 0, reward: float = 0.0, unit: str = "step"
    ) -> None:
        super().__init__(checkpoint)
        self.checkpoint, self.step, self.reward, self.unit = checkpoint, step, reward, unit

    def summary(self) -> str:
        """One line for the user: where the best policy so far is, or that none was saved."""
        if self.checkpoint is None:
            return "no checkpoint was saved yet (none before the first evaluation)"
        return (
            f"the best checkpoint so far ({self.unit} {self.step}, eval reward "
            f"{self.reward:.4f}) is saved at {self.checkpoint}"
        )
