"""Hugging Face Hub model ids (`org/name`, `org/name@revision`) -> a local snapshot folder.

`jpeft.load("meta-llama/Llama-3.1-8B")` and `--model org/name@rev` go through huggingface_hub's
`snapshot_download` into its own cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
which transformers and peft share: a model downloaded once by any of them is read in place. Only what jpeft
reads is fetched (`allow_patterns`): config and generation config, safetensors shards and their index,
tokenizer and chat-template files; pickle-based `*.bin` weights only when asked for (`allow_torch_bin`); never
code (`*.py`). `HF_TOKEN` (or `hf auth login`) authenticates gated and private repos; with `HF_HUB_OFFLINE=1`
only the local cache is used. The environment is read at call time, not when huggingface_hub is imported.

Snapshot files in that cache are symlinks into the repo's `blobs/` folder, so a sharded index names files
that resolve outside the snapshot folder: `safetensors_io.open_checkpoint` checks index entries by name
(inside the folder, no `..`), not by where their symlinks point.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jpeft.errors import CheckpointError

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
TORCH_BIN_PATTERNS = ("*.bin", "pytorch_model.bin.index.json")
OTHER_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json")

# `org/name` or a legacy `name`, then an optional `@revision` (branch, tag or commit; may hold slashes).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[\w.][\w./-]*))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision or None)` if `spec` has the shape of a Hub model id, else None."""
    m = _HUB_ID.match(spec)
    if m is None or spec.endswith((".gguf", ".safetensors", ".json")) or ".." in spec:
        return None
    return m.group("repo"), m.group("rev")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")


def cache_dir() -> Path:
    """The hub cache huggingface_hub would use with the current environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def snapshot(spec: str, *, allow_torch_bin: bool = False) -> Path:
    """Download (or find in the cache) the files jpeft reads of Hub model `spec` and return the snapshot folder.

    Errors (each a CheckpointError naming the id and what to do): not cached while offline, no such repo or
    revision, gated or private without a token, no network, only pickle-based `*.bin` weights without
    `allow_torch_bin`.
    """
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise CheckpointError(f"{spec!r} is neither an existing file or folder nor a Hugging Face Hub model id "
                              "(org/name or org/name@revision)")
    repo, rev = parsed
    patterns = [*WEIGHT_PATTERNS, *OTHER_PATTERNS, *(TORCH_BIN_PATTERNS if allow_torch_bin else ())]
    folder = _download(spec, repo, rev, patterns)
    _check_weights(spec, folder, allow_torch_bin)
    return folder


def _download(spec: str, repo: str, rev: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import errors, snapshot_download

    offline = _truthy("HF_HUB_OFFLINE")
    where = f"no local folder {spec!r} exists, so it was read as a Hugging Face Hub model id"
    try:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache_dir(), allow_patterns=patterns,
                                      local_files_only=offline, token=os.environ.get("HF_TOKEN") or None))
    except errors.GatedRepoError:
        raise CheckpointError(f"{where}: {repo} is gated; accept its terms on https://huggingface.co/{repo} and "
                              "set HF_TOKEN (or run `hf auth login`) with an account that has access") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{where}: {repo} has no revision {rev!r}; name an existing branch, tag or "
                              "commit after '@'") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no model {repo} on the Hub (or it is private: set HF_TOKEN); check the "
                              "spelling, or pass the path of a local checkpoint folder") from None
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 forbids downloading" if offline else "the Hub could not be reached")
        raise CheckpointError(f"{where}: {repo}{'@' + rev if rev else ''} is not in the local cache "
                              f"{cache_dir()} and {why}; download it first (`hf download {repo}`) where the "
                              "network is available, or point HF_HUB_CACHE/HF_HOME at a cache that has it") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{where}: downloading {repo} failed ({type(e).__name__}: {e}); check the network "
                              "and HF_TOKEN, or pass a local folder") from None


def _check_weights(spec: str, folder: Path, allow_torch_bin: bool) -> None:
    if any(folder.glob("*.safetensors")) or (allow_torch_bin and any(folder.glob("*.bin"))):
        return
    bins = _repo_has_torch_bin(spec, folder)
    if bins and not allow_torch_bin:
        raise CheckpointError(f"Hub model {spec}: its weights are only pickle-based *.bin files ({bins}), which "
                              "jpeft reads only when asked: pass --allow-torch-bin (allow_torch_bin=True) to read "
                              "them with torch.load(weights_only=True), or use a safetensors revision")
    raise CheckpointError(f"Hub model {spec}: the snapshot {folder} has no *.safetensors weights; is it a model "
                          "repository (not a dataset, GGUF-only or adapter repo)?")


def _repo_has_torch_bin(spec: str, folder: Path) -> str | None:
    """The name of a `*.bin` weight file the repo has (looked up in the cache offline, on the Hub otherwise)."""
    names = [p.name for p in folder.glob("*.bin")]
    if not names and not _truthy("HF_HUB_OFFLINE"):
        from huggingface_hub import HfApi

        repo, rev = parse_hub_id(spec) or (spec, None)
        try:
            names = [n for n in HfApi(token=os.environ.get("HF_TOKEN") or None).list_repo_files(repo, revision=rev)
                     if n.endswith(".bin")]
        except Exception:  # noqa: BLE001 - the question is only which error message to give
            names = []
    return sorted(names)[0] if names else None
