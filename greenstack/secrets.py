"""Secrets in configs: recognised by their key's name, used in memory, never written to a file.

Why: a user who passes `checkpointing.storage_options={key: AKIA..., secret: ...}` would otherwise find
the key in `.hydra/overrides.yaml`, `.hydra/config.yaml`, `.hydra/hydra.yaml`, W&B's config,
`debug.log` and `.wandb` file (which an online run uploads). Three layers keep it out:

* `hide_override_secrets`: before Hydra sees the command line, each secret-looking value of an override
  moves into an environment variable of this process (inherited by its workers and Slurm jobs) and the
  override becomes `${oc.env:GREENSTACK_SECRET_...}`, which is what Hydra saves; the value is resolved
  in memory when the config is read.
* `scrub_hydra_dir`: a secret written literally in a YAML config file is replaced by `***` in the
  `.hydra` files of the run (and the sweep's `multirun.yaml`) before training starts.
* `redact`: every config greenstack hands to a tracker is redacted first.

The better way is not to put secrets in configs at all: fsspec/botocore read `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` and `~/.aws/credentials` themselves.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

REDACTED = "***"
ENV_PREFIX = "GREENSTACK_SECRET_"
#: key names that hold secrets: exact names, and any name ending in one of the suffixes
_SECRET_NAMES = re.compile(
    r"^(key|secret|token|password|passwd|pwd|passphrase|credentials?|apikey|api_key|auth_token|"
    r"access_token|refresh_token|session_token|security_token|client_secret|private_key|"
    r"aws_access_key_id|aws_secret_access_key|aws_session_token|.*_(key|secret|token|password|passwd))$",
    re.IGNORECASE)
#: names that match the pattern but hold a reference to a secret, not the secret itself
_NOT_SECRET = frozenset({"key_env", "key_file", "key_id", "key_path", "tokenizer", "max_tokens", "num_tokens"})


def is_secret_key(name: Any) -> bool:
    """True for config keys whose values are secrets (`key`, `secret`, `token`, `password`, `*_key`, ...)."""
    text = str(name).strip().lower()
    return text not in _NOT_SECRET and bool(_SECRET_NAMES.match(text))


def _is_reference(value: Any) -> bool:
    """An interpolation (`${oc.env:VAR}`) or nothing: safe to show, it names where the secret lives."""
    return value is None or (isinstance(value, str) and (value.startswith("${") or value in ("", REDACTED)))


def redact(obj: Any) -> Any:
    """A copy of a (nested) config container with every secret-looking key's value replaced by ***."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(k) and not _is_reference(v) and not isinstance(v, Mapping)
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def _env_name(path: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]+", "_", path.upper()).strip("_")


def hide_override_secrets(argv: list[str], env: MutableMapping[str, str] | None = None) -> list[str]:
    """The command line with each secret value of an override moved into `env` (default os.environ).

    `checkpointing.storage_options={key: AKIA, secret: s}` becomes
    `checkpointing.storage_options={key:'${oc.env:GREENSTACK_SECRET_..._KEY}',secret:'${oc.env:...}'}`.
    Flags, sweeps and overrides Hydra cannot parse are left as they are (Hydra reports those).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Override, Quote, QuotedString

    env = os.environ if env is None else env
    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            out.append(arg)
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra's own error message is the better one
            out.append(arg)
            continue
        if override.is_sweep_override() or override.is_delete():
            out.append(arg)
            continue
        path = override.key_or_group
        changed = False

        def hide(value: Any, where: str, secret: bool) -> Any:
            nonlocal changed
            if isinstance(value, dict):
                return {k: hide(v, f"{where}.{k}", is_secret_key(k)) for k, v in value.items()}
            if isinstance(value, list):
                return [hide(v, f"{where}.{i}", secret) for i, v in enumerate(value)]
            text = value.text if isinstance(value, QuotedString) else value
            if not secret or isinstance(text, bool) or _is_reference(text):
                return value
            name = _env_name(where)
            env[name] = str(text)
            changed = True
            return QuotedString(text="${oc.env:" + name + "}", quote=Quote.single)

        value = hide(override._value, path, is_secret_key(path.rsplit(".", 1)[-1]))
        out.append(arg.split("=", 1)[0] + "=" + Override._get_value_element_as_str(value) if changed else arg)
    return out


def _redact_override(text: str) -> str:
    """One saved override string with its secret values replaced by *** (for `.hydra/overrides.yaml`)."""
    scratch: dict[str, str] = {}
    hidden = hide_override_secrets([text], scratch)[0]
    for name in scratch:
        hidden = hidden.replace("${oc.env:" + name + "}", REDACTED)
    return hidden


def scrub_hydra_dir(hydra_dir: str | Path, extra_files: tuple[str | Path, ...] = ()) -> list[Path]:
    """Replace literal secrets in a run's `.hydra/*.yaml` (and e.g. a sweep's `multirun.yaml`) by ***.

    Returns the files that were rewritten (atomically). Interpolations such as `${oc.env:VAR}` stay.
    """
    from omegaconf import OmegaConf

    from greenstack.io import atomic_write_bytes

    files = [Path(hydra_dir) / n for n in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    files += [Path(f) for f in extra_files]
    changed = []
    for path in files:
        if not path.is_file():
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        clean = _scrub(data)
        if clean != data:
            atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.create(clean)).encode())
            changed.append(path)
    return changed


def _scrub(obj: Any) -> Any:
    """`redact`, plus override strings (lists of `key=value` in hydra.yaml/overrides.yaml) redacted too."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(k) and not _is_reference(v) and not isinstance(v, Mapping)
                    else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_override(v) if isinstance(v, str) and "=" in v else _scrub(v) for v in obj]
    return obj
