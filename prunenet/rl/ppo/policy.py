"""A size-agnostic SB3 actor-critic policy for scoring FFN rows, and its checkpoint format.

DeepSets shape: one small network encodes every row (shared weights), a mean over rows gives
the layer's context, a per-row head turns (row code, context) into a score, and the critic reads
only the pooled context. No parameter depends on the row count, so a checkpoint trained on one
model scores FFNs of any width, and permuting the rows permutes the scores exactly.

Exploration noise is shared by all rows: a Gaussian over how the row features are weighted
(`FeatureSpaceGaussian`), never an independent draw per row index. Its log-probability has a
fixed dimension (the feature count), so the PPO ratio does not explode with the row count.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import safetensors.torch
import torch
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from prunenet.analysis.features import (
    CONTEXT_FEATURES,
    FEATURE_SETS,
    FEATURE_VERSION,
    feature_names,
)
from prunenet.errors import PruneNetError

METADATA_FILE = "prunenet.json"
WEIGHTS_FILE = "policy.safetensors"
LEGACY_WEIGHTS_FILE = "policy.pth"  # SB3's, the only weights of format-1 checkpoints
SB3_DATA_FILE = "data"
# 2: weights in policy.safetensors and constructor arguments in prunenet.json, nothing pickled.
CHECKPOINT_FORMAT = 2
# Constructor arguments a checkpoint may set, each a plain JSON number of this type. `hidden` is
# the only one that shapes the network; anything else would be SB3 machinery PruneNet ignores.
POLICY_KWARGS: dict[str, type] = {"hidden": int}
# Feature sets each trainer's checkpoints may name: PPO policies read `prunenet.analysis.features`
# columns, the REINFORCE baseline (`prunenet.rl.reinforce.train`) the raw rows of the weights.
ALGO_FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "ppo": tuple(FEATURE_SETS),
    "reinforce": ("weights-raw",),
}
# Members PruneNet reads are kilobytes; a larger one (a zip bomb) is refused before inflating it.
MAX_MEMBER_BYTES = 256 * 1024**2


class FeatureSpaceGaussian(DiagGaussianDistribution):
    """Row scores `mean + basis @ noise`, with `noise ~ N(0, std^2 I_k)` shared by all rows.

    `basis` is the layer's `rows x k` feature matrix, so exploration perturbs how features are
    weighted, not each row independently: k (about 10) random directions instead of thousands.
    Independent per-row noise made PPO's gradient signal vanish at 1.5k rows (no learning in
    3k steps on SmolLM2). The log-probability is that of the noise, recovered from an action by
    least squares on the basis (exact, because every action lies in `mean + span(basis)`).
    """

    def proba_distribution(
        self, mean_actions: torch.Tensor, log_std: torch.Tensor, basis: torch.Tensor
    ) -> FeatureSpaceGaussian:
        self.mean = mean_actions
        self.basis = basis
        noise_std = log_std.exp().expand(basis.shape[:-2] + basis.shape[-1:])
        self.distribution = torch.distributions.Normal(torch.zeros_like(noise_std), noise_std)
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the basis is observed data: no gradient flows through it
            projector = torch.linalg.pinv(self.basis)
        noise = (projector @ (actions - self.mean).unsqueeze(-1)).squeeze(-1)
        return self.distribution.log_prob(noise).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        return self.distribution.entropy().sum(dim=-1)

    def sample(self) -> torch.Tensor:
        noise = self.distribution.rsample()
        return self.mean + (self.basis @ noise.unsqueeze(-1)).squeeze(-1)

    def mode(self) -> torch.Tensor:
        return self.mean


class RowsExtractor(BaseFeaturesExtractor):
    """Keeps observations as (batch, rows, columns) instead of flattening them."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=observation_space.shape[-1])

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return observations


class RowSetEncoder(nn.Module):
    """Shared per-row encoder with pooled context; SB3's `mlp_extractor` slot.

    :param columns: features per row (including the context columns).
    :param hidden: width of the row code.
    """

    def __init__(self, columns: int, hidden: int) -> None:
        super().__init__()
        self.noise_columns = columns - len(CONTEXT_FEATURES)
        self.latent_dim_pi = hidden
        self.latent_dim_vf = hidden
        self.row = nn.Sequential(
            nn.Linear(columns, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.mix = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh())
        self.critic = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(rows), self.forward_critic(rows)

    def forward_actor(self, rows: torch.Tensor) -> torch.Tensor:
        """Row codes, with the raw row features appended as the exploration-noise basis."""
        codes = self.row(rows)
        context = codes.mean(dim=-2, keepdim=True).expand_as(codes)
        latent = self.mix(torch.cat([codes, context], dim=-1))
        return torch.cat([latent, rows[..., : self.noise_columns]], dim=-1)

    def forward_critic(self, rows: torch.Tensor) -> torch.Tensor:
        return self.critic(self.row(rows).mean(dim=-2))


class RowScoringPolicy(ActorCriticPolicy):
    """SB3 `ActorCriticPolicy` that scores a variable number of rows with shared weights.

    :param hidden: width of the per-row code (the only size parameter).
    Other parameters are `ActorCriticPolicy`'s; `net_arch` is ignored.
    """

    def __init__(self, *args, hidden: int = 32, **kwargs) -> None:
        self.hidden = hidden
        kwargs.setdefault("features_extractor_class", RowsExtractor)
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = RowSetEncoder(self.features_dim, self.hidden)

    def _build(self, lr_schedule) -> None:
        self.action_dist = FeatureSpaceGaussian(int(np.prod(self.action_space.shape)))
        self._build_mlp_extractor()
        self.action_net = nn.Linear(self.hidden, 1)
        self.log_std = nn.Parameter(torch.tensor(float(self.log_std_init)))
        self.value_net = nn.Linear(self.hidden, 1)
        if self.ortho_init:
            gains = {self.mlp_extractor: np.sqrt(2), self.action_net: 0.01, self.value_net: 1.0}
            for module, gain in gains.items():
                module.apply(lambda m, gain=gain: self.init_weights(m, gain=gain))
        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> FeatureSpaceGaussian:
        codes, basis = latent_pi[..., : self.hidden], latent_pi[..., self.hidden :]
        mean_scores = self.action_net(codes).squeeze(-1)
        return self.action_dist.proba_distribution(mean_scores, self.log_std, basis)

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data["hidden"] = self.hidden
        return data

    @torch.no_grad()
    def row_scores(self, observation: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Deterministic scores (the Gaussian means) for one layer's `rows x columns` matrix."""
        rows = torch.as_tensor(np.asarray(observation), dtype=torch.float32, device=self.device)
        return self.get_distribution(rows.unsqueeze(0)).mode().squeeze(0).cpu()


def spaces_for(width: int, feature_set: str) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation and action spaces for an FFN of `width` rows (the env's, without an env)."""
    from envs.ffn_prune import BOUND

    columns = len(feature_names(feature_set)) + len(CONTEXT_FEATURES)
    observation = gym.spaces.Box(-BOUND, BOUND, (width, columns), np.float32)
    action = gym.spaces.Box(-BOUND, BOUND, (width,), np.float32)
    return observation, action


# --------------------------------------------------------------------------- checkpoints
#
# A checkpoint is SB3's zip (written by `agent.save`, so a user who trusts the file can still
# `PPO.load` it) plus two members PruneNet writes and is the only thing it ever reads:
# `prunenet.json` (metadata and the policy's constructor arguments, plain JSON) and
# `policy.safetensors` (the weights). SB3's own members hold cloudpickled objects, and unpickling
# runs whatever code the file's author put there, so PruneNet never unpickles anything: format-1
# checkpoints (before `policy.safetensors`) are read with `torch.load(weights_only=True)` and
# plain `json.loads`, and refused where that is not enough.


def write_metadata(
    checkpoint: str | Path, metadata: dict, policy: RowScoringPolicy | None = None
) -> None:
    """Add PruneNet's metadata (feature version, ratios, source model, ...) into the zip.

    :param checkpoint: the zip to append to (SB3's archive, or a new one).
    :param metadata: JSON-serialisable facts about the run; `format` and `feature_version` are
        added.
    :param policy: when given, its weights go in as `policy.safetensors` and its constructor
        arguments as `policy_kwargs`, which is all `load_policy` needs.
    """
    full = {"format": CHECKPOINT_FORMAT, "feature_version": FEATURE_VERSION, **metadata}
    with zipfile.ZipFile(checkpoint, "a") as archive:
        if policy is not None:
            full["policy_kwargs"] = {name: getattr(policy, name) for name in POLICY_KWARGS}
            archive.writestr(WEIGHTS_FILE, tensors_to_bytes(policy.state_dict()))
        archive.writestr(METADATA_FILE, json.dumps(full, indent=2))


def read_metadata(checkpoint: str | Path) -> dict:
    """The checkpoint's metadata, validated; clear errors for missing, corrupt or foreign files."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise PruneNetError(
            f"Policy checkpoint {path} does not exist. Train one with `prunenet train`."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_FILE not in archive.namelist():
                raise PruneNetError(
                    f"{path} is a zip file but not a PruneNet policy checkpoint (no "
                    f"{METADATA_FILE}). Train one with `prunenet train`."
                )
            metadata = json.loads(_read_checked(archive, METADATA_FILE))
    except (zipfile.BadZipFile, OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8
        raise PruneNetError(
            f"Policy checkpoint {path} is corrupt or not a zip file ({error}). "
            "Re-train it with `prunenet train` or restore the file."
        ) from None
    _validate_metadata(path, metadata)
    return metadata


def load_policy(
    checkpoint: str | Path, width: int, device: str = "cpu"
) -> tuple[RowScoringPolicy, dict]:
    """A `RowScoringPolicy` for FFNs of `width` rows, loaded from any-width checkpoint.

    Reads only `prunenet.json` and the weights, never unpickling anything (module comment above).

    :param checkpoint: a `prunenet train` zip, format 2 or (read safely) format 1.
    :param width: row count of the FFNs it will score (shapes the spaces, not the weights).
    :param device: where the returned policy lives.
    :return: the policy in eval mode and the checkpoint's metadata.
    """
    metadata = read_metadata(checkpoint)
    if metadata["algo"] != "ppo":
        raise PruneNetError(
            f"{checkpoint} is a {metadata['algo']!r} checkpoint, not a PPO policy; load it with "
            "prunenet.rl.ppo.scorer.load_scorer_from_checkpoint."
        )
    state, kwargs = _read_policy(Path(checkpoint).expanduser(), metadata)
    observation_space, action_space = spaces_for(width, metadata["feature_set"])
    policy = RowScoringPolicy(observation_space, action_space, lambda _: 0.0, **kwargs)
    try:
        policy.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        raise PruneNetError(
            f"Policy checkpoint {checkpoint} does not match this PruneNet's policy network "
            f"({error}). Re-train it with `prunenet train`."
        ) from None
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
    metadata = read_metadata(old)
    if metadata["algo"] != "ppo":
        raise PruneNetError(
            f"{old} is a {metadata['algo']!r} checkpoint; convert REINFORCE baselines with "
            "prunenet.rl.reinforce.train.resave_reinforce (scripts/convert_policy.py picks the right one)."
        )
    state, kwargs = _read_policy(old, metadata)
    metadata = {**metadata, "format": CHECKPOINT_FORMAT, "policy_kwargs": kwargs}
    new.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=new.parent, prefix=f".{new.name}.partial-") as staging:
        path = Path(staging) / "policy.zip"
        with zipfile.ZipFile(old) as source, zipfile.ZipFile(path, "w") as target:
            for item in source.infolist():
                if item.filename not in (METADATA_FILE, WEIGHTS_FILE):
                    target.writestr(item, source.read(item.filename))
            target.writestr(WEIGHTS_FILE, tensors_to_bytes(state))
            target.writestr(METADATA_FILE, json.dumps(metadata, indent=2))
        shutil.move(str(path), new)


def refuse_existing_checkpoint(out: str | Path, overwrite: bool) -> None:
    """Refuse to train into `out` if a file is there already, unless `overwrite`.

    :param out: the checkpoint path a training run will write its best policy to.
    :param overwrite: replace an existing file at `out`.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise PruneNetError(f"Checkpoint path {path} is a folder; give a file path ending in .zip.")
    if path.exists() and not overwrite:
        raise PruneNetError(
            f"Checkpoint {path} already exists. Pass --overwrite (overwrite=True) to replace it "
            "with this run's best policy, or choose another --out."
        )


def read_state_dict(checkpoint: str | Path, member: str) -> dict[str, torch.Tensor]:
    """The tensors stored in `member` of the zip `checkpoint`, on the CPU, never unpickled.

    `.safetensors` members are parsed by safetensors; `.pt`/`.pth` members (older checkpoints)
    by `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers and
    refuses anything else instead of running it.

    :param checkpoint: the zip.
    :param member: the member's name inside it.
    """
    data = _read_member(Path(checkpoint).expanduser(), member)
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
        state = _torch_load_weights_only(checkpoint, member, data)
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


def _validate_metadata(path: Path, metadata: object) -> None:
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
        _policy_kwargs(path, metadata["policy_kwargs"], METADATA_FILE)


def _read_policy(path: Path, metadata: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and constructor arguments of a PPO checkpoint, read safely for its format."""
    names = _member_names(path)
    if WEIGHTS_FILE in names:
        if "policy_kwargs" not in metadata:
            raise PruneNetError(
                f"Policy checkpoint {path} has {WEIGHTS_FILE} but no 'policy_kwargs' in its "
                f"{METADATA_FILE}, so the network's shape is unknown. Re-train it with "
                "`prunenet train`."
            )
        kwargs = _policy_kwargs(path, metadata["policy_kwargs"], METADATA_FILE)
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
        sb3_data = json.loads(_read_member(path, SB3_DATA_FILE))
    except ValueError as error:
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
    kwargs = _policy_kwargs(path, {} if value is None else value, f"SB3 '{SB3_DATA_FILE}'")
    return read_state_dict(path, LEGACY_WEIGHTS_FILE), kwargs


def _policy_kwargs(path: Path, value: object, where: str) -> dict:
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
        # bool is an int to Python but not a width; every argument is a positive count so far.
        if not isinstance(number, POLICY_KWARGS[name]) or isinstance(number, bool) or number < 1:
            raise PruneNetError(
                f"Policy checkpoint {path} sets the policy argument {name}={number!r} (in "
                f"{where}); it must be a positive JSON integer. Re-train it with "
                "`prunenet train`."
            )
    return dict(value)


def _torch_load_weights_only(checkpoint: str | Path, member: str, data: bytes) -> object:
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


def _member_names(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        raise PruneNetError(
            f"Policy checkpoint {path} is corrupt or not a zip file ({error}). "
            "Re-train it with `prunenet train` or restore the file."
        ) from None


def _read_member(path: Path, member: str) -> bytes:
    """The bytes of `member`, checked against its CRC; damage becomes a PruneNetError."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_checked(archive, member)
    except (zipfile.BadZipFile, OSError, KeyError, EOFError, ValueError) as error:
        # BadZipFile: bad CRC or header; KeyError: no such member; EOFError: truncated data;
        # ValueError/zlib.error: a damaged compressed stream.
        raise PruneNetError(
            f"Policy checkpoint {path} could not be read ({type(error).__name__}: {error}). "
            "Re-train it with `prunenet train` or restore the file."
        ) from None


def _read_checked(archive: zipfile.ZipFile, member: str) -> bytes:
    """`archive.read(member)`, refusing a declared size no PruneNet member has (zipfile never
    inflates past the declared size, so the check bounds the memory used)."""
    size = archive.getinfo(member).file_size
    if size > MAX_MEMBER_BYTES:
        raise zipfile.BadZipFile(
            f"{member} declares {size} bytes, more than any PruneNet checkpoint member"
        )
    return archive.read(member)
