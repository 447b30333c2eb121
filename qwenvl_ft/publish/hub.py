"""Uploading a finished folder (`final/` or `merged/`, card included) to the Hugging Face Hub with huggingface_hub.

The upload runs after the folder is complete on disk, so a failure (offline, no token, no write access) loses
nothing: it becomes a HubError whose one-screen message says why, where the folder is and how to upload it later.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from qwenvl_ft.config.hub import HubConfig
from qwenvl_ft.errors import HubError

log = logging.getLogger("qwenvl_ft")


def push_folder(folder: Path, hub: HubConfig, retry: str) -> str:
    """Upload `folder` to hub.repo_id (created when missing, hub.private) and return the repository URL.
    `retry` says how qwenvl-ft uploads it again (named in the error message)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
        if hub.revision:
            api.create_branch(repo.repo_id, branch=hub.revision, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), revision=hub.revision,
                          commit_message=hub.commit_message or f"qwenvl-ft: {folder.parent.name}/{folder.name}",
                          ignore_patterns=[".*"])  # staging leftovers (.README.md.partial) never go up
    except Exception as err:  # every failure of the upload gets the same plain message; the folder is intact
        raise HubError(failure_message(folder, hub, err, retry)) from None
    url = str(repo)
    log.info("uploaded %s to %s", folder, url)
    return url


def failure_message(folder: Path, hub: HubConfig, err: BaseException, retry: str) -> str:
    upload = ["hf", "upload", hub.repo_id, str(folder), ".", "--private" if hub.private else "--no-private"]
    if hub.revision:
        upload += ["--revision", hub.revision]
    return (f"hub.push: uploading {folder} to {hub.repo_id} failed: {reason(err)}\n"
            f"Nothing is lost: {folder} is complete on disk. To upload it later, {retry}\n"
            f"or upload the folder with huggingface_hub's CLI:\n"
            f"  {shlex.join(upload)}")


def reason(err: BaseException) -> str:
    """What went wrong, in one line a user can act on."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1); unset it to upload"
    status = getattr(getattr(err, "response", None), "status_code", None) if isinstance(err, HfHubHTTPError) else None
    if status == 401:
        return "not logged in to the Hub: run `hf auth login` or set HF_TOKEN"
    if status == 403:
        return "the Hub token may not write to this repository (a read-only token, or another owner)"
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    if status is not None:
        return f"the Hub answered HTTP {status}: {first_line}"
    if isinstance(err, (ConnectionError, OSError)) or "connect" in type(err).__name__.lower():
        return f"the Hub could not be reached ({type(err).__name__}: {first_line})"
    return f"{type(err).__name__}: {first_line}"
