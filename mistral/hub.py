"""Fetching a checkpoint from the Hugging Face Hub: one format's files, never both.

The official repository (mistralai/Mistral-7B-Instruct-v0.3) holds the Mistral-format file
(consolidated.safetensors, 14.5 GB) and the same weights again as three Hugging Face shards: a
snapshot of everything is 29 GB. We ask for one format's files only.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

FORMAT_FILES = {
    "consolidated": ["params.json", "consolidated.safetensors", "tokenizer.model.v3", "tokenizer.model"],
    "hf": ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
           "tokenizer.model.v3", "tokenizer.model"],
}


def looks_like_repo_id(text: str) -> bool:
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not str(text).startswith((".", "~"))


def download(repo_id: str, format: str = "consolidated", local_dir: str | Path | None = None,
             token: str | None = None, revision: str | None = None) -> Path:
    """Download one format of `repo_id` (with the Hub's progress bars); returns the folder."""
    if format not in FORMAT_FILES:
        raise ValueError(f"format must be one of {', '.join(FORMAT_FILES)}, got {format!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = token or os.environ.get("HF_TOKEN")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=FORMAT_FILES[format],
                                   local_dir=str(local_dir) if local_dir else None, token=token)
    except GatedRepoError:
        hint = "your token has no access yet: accept the model's terms on its Hub page" if token else \
            "it is gated: accept its terms on the Hub, then set HF_TOKEN (or pass token=...)"
        raise CheckpointError(f"{repo_id}: cannot download, {hint}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repository on the Hub (or it is private and needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set and it is not in the local cache; unset HF_HUB_OFFLINE to download it"
        else:
            why = ("the Hub cannot be reached (no network? a proxy: HTTPS_PROXY; a mirror: HF_ENDPOINT) and it is "
                   "not in the local cache; connect and run this again, or run `mistral download "
                   f"{repo_id} --dir DIR` on a connected machine and copy DIR here")
        raise CheckpointError(f"{repo_id}: cannot download, {why}") from None
    except OSError as e:
        raise CheckpointError(f"{repo_id}: download failed ({e})") from None
    return Path(folder)


def resolve_weights(path_or_repo_id: str | Path, format: str | None = None, token: str | None = None,
                    revision: str | None = None) -> Path:
    """A local folder as is; a Hub repo id downloaded (Mistral format unless `format` says hf)."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    if isinstance(path_or_repo_id, str) and looks_like_repo_id(path_or_repo_id):
        try:
            folder = download(path_or_repo_id, format or "consolidated", token=token, revision=revision)
        except CheckpointError:
            owner = Path(path_or_repo_id.split("/")[0])
            if owner.is_dir():  # `weights/Mistral-7B-...` before downloading: a path, not a repo id
                name = path_or_repo_id.split("/")[1]
                repo = f"mistralai/{name}" if name.startswith("Mistral-") else "OWNER/NAME"
                raise CheckpointError(f"{path_or_repo_id}: no such folder; to download a checkpoint into it: "
                                      f"mistral download {repo} --dir {path_or_repo_id}") from None
            raise
        from .loader import find_checkpoint

        find_checkpoint(folder, format)  # a repo without a usable checkpoint fails here, clearly
        return folder
    raise CheckpointError(f"{path_or_repo_id}: no such folder, and not a Hub repo id (owner/name)")
