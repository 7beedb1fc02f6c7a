"""Convert policy checkpoints to the current format (weights in safetensors, nothing pickled).

Format-1 checkpoints kept their weights only in pickled torch files (SB3's `policy.pth`, the
REINFORCE baseline's `reinforce_policy.pt`). This reads them the safe way PruneNet loads them
(`torch.load(weights_only=True)`, plain JSON; a file that needs real unpickling is refused),
writes the weights as safetensors, keeps every metadata key, and then checks that the converted
file holds exactly the same tensors and metadata as the original.

    .venv/bin/python scripts/convert_policy.py OLD.zip             # in place
    .venv/bin/python scripts/convert_policy.py OLD.zip --out NEW.zip
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import torch

from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import CHECKPOINT_FORMAT, read_metadata, read_state_dict
from prunenet.rl.ppo.checkpoint import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, resave_checkpoint
from prunenet.rl.reinforce.checkpoint import LEGACY_STATE_FILE, STATE_FILE, resave_reinforce

# algo -> (converter, weights member before, weights member after)
CONVERTERS = {
    "ppo": (resave_checkpoint, LEGACY_WEIGHTS_FILE, WEIGHTS_FILE),
    "reinforce": (resave_reinforce, LEGACY_STATE_FILE, STATE_FILE),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for checkpoint in args.checkpoints:
            print(convert(checkpoint, args.out or checkpoint))
    except PruneNetError as error:
        print(f"convert_policy: error: {error}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint zips to convert")
    parser.add_argument("--out", type=Path, help="where to write (one checkpoint only)")
    args = parser.parse_args(argv)
    if args.out is not None and len(args.checkpoints) != 1:
        parser.error("--out needs exactly one checkpoint")
    return args


def convert(old: Path, new: Path) -> str:
    """Convert `old` into `new` (may be the same path), verify it, and describe what changed.

    :param old: a PPO or REINFORCE checkpoint of any supported format.
    :param new: where the converted checkpoint goes.
    """
    before = read_metadata(old)
    resave, legacy, current = CONVERTERS[before["algo"]]
    with zipfile.ZipFile(old) as archive:
        member = current if current in archive.namelist() else legacy
    weights = read_state_dict(old, member)  # read before `new` may replace `old`
    resave(old, new)
    after = read_metadata(new)
    converted = read_state_dict(new, current)
    same_tensors = weights.keys() == converted.keys() and all(
        weights[k].dtype == converted[k].dtype and torch.equal(weights[k], converted[k])
        for k in weights
    )
    added = ("format", "policy_kwargs")  # the only keys a conversion may change

    def kept(metadata: dict) -> dict:
        return {k: v for k, v in metadata.items() if k not in added}

    if not same_tensors or kept(after) != kept(before):
        raise PruneNetError(f"{new} does not hold the same policy as {old}; left for inspection.")
    return (
        f"{old} (format {before.get('format', 1)}, {member}) -> {new} (format "
        f"{CHECKPOINT_FORMAT}, {current}): {len(converted)} tensors identical, metadata kept"
    )


if __name__ == "__main__":
    sys.exit(main())
